"""The universal class's planned step (Frob-, Trace- and Det-SAM) on the compiled extension
(python_api/_universal_plan.py, csrc/universal_plan.cpp).

Every case, for each class, trains two copies from the same weights and the same noise seed,
one with planned
steps (the default) and one with ``plan_steps = False`` (the unplanned path, itself checked
against the spec's equations in tests/optim/test_universal.py), and requires the weights, the
base optimizer's state, the counters and the noise offset to be bit-identical after every step;
and that the plan ran (its own ops) where it may, and did not where it may not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import DispatchedOps, assert_same_training
from _plan_training import (
    BASES,
    Net,
    lr_made_a_tensor,
    make_pair,
    nonfinite_closure,
    raise_at_call,
    train_pair,
)
from _plan_training import closure_of as _closure
from _plan_training import data as _data
from _plan_training import planned as _planned

from python_api import DetSAM, FrobSAM, TraceSAM
from python_api import _step_plan as sp
from sam_kernels import step_plan

pytestmark = pytest.mark.skipif(
    not step_plan.universal_available("cpu"),
    reason="the compiled extension (with the universal class's step plan) is not built",
)
#: the GPU run checks the plan on CUDA tensors too (the extension is not the default there: asked
#: for by name)
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and step_plan.universal_available("cuda") else []
)

ASCENT, SAMPLE, DESCENT = (
    "sam_kernels_C.universal_ascent.default",
    "sam_kernels_C.universal_sample.default",
    "sam_kernels_C.universal_descent.default",
)
PLAN_OPS = (ASCENT, SAMPLE, DESCENT)
# per class: settings whose sharpness term moves the weights visibly and stays finite
CLASSES = {
    "frob": (FrobSAM, dict(rho=0.05, lam=0.005)),
    "trace": (TraceSAM, dict(rho=0.05, lam=0.5, n_samples=2)),
    "det": (DetSAM, dict(rho=0.5, lam=1e-4, half_cube_len=0.05, n_samples=2)),
}
#: the two noises a plan draws: the counter-based contract on the extension, and the CPU
#: default, the reference's global stream (one draw per tensor from the global generator; both
#: copies' steps start from the same generator state, _reseed)
NOISES = {"counter": dict(backend="ext", seed=1234), "reference": {}}


def _reseed(s: int = 0) -> None:
    torch.manual_seed(10_000 + s)


def _pair(
    base="sgd", groups=None, dtype=torch.float32, algo="frob", noise="counter", device="cpu", **kw
):
    algo_cls, algo_kw = CLASSES[algo]
    kw = {**algo_kw, **NOISES[noise], **kw}
    return make_pair(Net, algo_cls, BASES[base], groups, dtype, device, **kw)


def _same(m, r, opt, ref) -> None:
    assert_same_training(m, r, opt, ref)
    assert (opt._noise_offset is None) == (ref._noise_offset is None)
    if opt._noise_offset is not None:
        assert torch.equal(opt._noise_offset, ref._noise_offset)


def _train(pairs, steps, dtype=torch.float32, user_backward=False, **closure_kw) -> int:
    """``steps`` steps of both; returns how many of the planned one's ran on its plan."""
    return train_pair(
        pairs, steps, descent=DESCENT, plan_ops=PLAN_OPS, same=_same, dtype=dtype,
        user_backward=user_backward, before_step=_reseed, **closure_kw,
    )  # fmt: skip


#: (on CUDA the counter noise only, the extension asked for by name: the reference stream is
#: the CPU default's)
CASES = [("cpu", n) for n in NOISES] + [(d, "counter") for d in DEVICES if d != "cpu"]


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("user_backward", [False, True])
@pytest.mark.parametrize("device, noise", CASES)
@pytest.mark.parametrize("algo", list(CLASSES))
def test_bit_identical_to_the_unplanned_step(algo, device, noise, base, user_backward):
    pairs = _pair(base, algo=algo, noise=noise, device=device)
    before = [p.clone() for p in pairs[0].parameters()]
    assert _train(pairs, 6, user_backward=user_backward) == 4  # from the third step on
    assert _planned(pairs[2]) and not _planned(pairs[3])
    # (maximize climbs the loss until it overflows: its last steps are skipped, on both)
    assert pairs[2]._counters.sum().item() == 6 and pairs[2].steps_taken >= 4
    assert all(not torch.equal(a, b) for a, b in zip(before, pairs[0].parameters()))
    assert (pairs[2]._noise_offset is None) == (noise == "reference")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise", list(NOISES))
@pytest.mark.parametrize("algo", list(CLASSES))
def test_half_precision_parameters(algo, noise, dtype):
    pairs = _pair("adamw", dtype=dtype, algo=algo, noise=noise)
    assert _train(pairs, 4, dtype=dtype) == 2
    assert _planned(pairs[2])


@pytest.mark.parametrize("n_samples", [2, 3])
@pytest.mark.parametrize("noise", list(NOISES))
@pytest.mark.parametrize("algo", list(CLASSES))
def test_own_ops_per_step(algo, noise, n_samples):
    """An ascent, one op per noisy sample and a descent, and nothing else of the package's."""
    m, r, opt, ref = _pair("sgd", n_samples=n_samples, algo=algo, noise=noise)
    _train((m, r, opt, ref), 3)
    x, y = _data(9)
    with DispatchedOps() as seen:
        opt.step(_closure(m, opt, x, y))
    own = [op for op in seen.ops if op.startswith("sam_kernels")]
    assert own == [ASCENT] + [SAMPLE] * n_samples + [DESCENT]
    # and on the unplanned path the package's own ops were many more
    with DispatchedOps() as seen:
        ref.step(_closure(r, ref, x, y))
    assert len([op for op in seen.ops if op.startswith("sam_kernels")]) > 3 * n_samples


@pytest.mark.parametrize("noise", list(NOISES))
@pytest.mark.parametrize("algo", list(CLASSES))
def test_groups_with_their_own_rho_lam_and_lr(algo, noise):
    def groups(model):
        return [
            {"params": [model.conv.weight, model.fc.weight], "rho": 0.1, "lam": 0.02},
            {"params": [model.conv.bias, model.fc.bias, model.scale], "lr": 0.02, "rho": 0.03},
            {"params": [model.t, model.gated], "weight_decay": 0.0, "lam": 0.1},
        ]

    pairs = _pair("sgd", groups=groups, n_samples=3, algo=algo, noise=noise)
    assert _train(pairs, 5) == 3
    # a lam schedule between steps: the plan reads the groups' lam every step
    for o in pairs[2:]:
        o.param_groups[1]["lam"] = 0.2
    assert _train(pairs, 2) == 2


def test_half_cube_length_changed_between_steps():
    """Det-SAM's ``half_cube_len`` is an attribute: a change reaches the planned noise too."""
    pairs = _pair("sgd", algo="det")
    _train(pairs, 3)
    for o in pairs[2:]:
        o.half_cube_len = 0.02
    assert _train(pairs, 2) == 2


@pytest.mark.parametrize("algo", list(CLASSES))
def test_n_samples_changed_between_steps(algo):
    pairs = _pair("adamw", algo=algo)
    _train(pairs, 3)
    for o in pairs[2:]:
        o.n_samples = 4
    assert _train(pairs, 2) == 2


@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.parametrize("noise", list(NOISES))
@pytest.mark.parametrize("algo", list(CLASSES))
def test_nonfinite_skips_on_the_device(algo, noise, where, kind):
    """A non-finite loss or gradient at ``w`` or at a noisy sample (closure call 0, 1, 2) skips
    the step: weights, state and noise offset as before, the skip counted, as unplanned."""
    m, r, opt, ref = _pair("adamw", algo=algo, noise=noise)
    _train((m, r, opt, ref), 3)
    before = [p.clone() for p in m.parameters()]
    offset = None if noise == "reference" else opt._noise_offset.clone()
    x, y = _data(50)
    for model, o in ((m, opt), (r, ref)):
        closure = nonfinite_closure(model, o, x, y, where, kind)
        _reseed(50)
        with DispatchedOps() as seen:
            o.step(closure)
        assert (ASCENT in seen.ops) == (o is opt)
    _same(m, r, opt, ref)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert opt._counters.tolist() == [3.0, 1.0]
    if offset is not None:
        assert torch.equal(opt._noise_offset, offset)  # a skipped step draws nothing
    assert _train((m, r, opt, ref), 2) == 2


@pytest.mark.parametrize("algo", list(CLASSES))
def test_overflowing_coefficients_skip_the_step(algo):
    """A ``lam`` that overflows the coefficients in float32 skips the step."""
    m, r, opt, ref = _pair("sgd", algo=algo)
    _train((m, r, opt, ref), 3)
    before = [p.clone() for p in m.parameters()]
    for o in (opt, ref):
        o.param_groups[0]["lam"] = 1e39  # (float32: inf for Trace-SAM's lam itself)
    assert _train((m, r, opt, ref), 1) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert opt._counters.tolist() == [3.0, 1.0]


@pytest.mark.parametrize("algo", list(CLASSES))
def test_gradients_missing_or_new_at_noisy_points(algo):
    """A parameter the loss stops depending on at a noisy point gets zeros; one without a
    gradient at ``w`` that gets one at a noisy point has it dropped, on the plan too."""
    pairs = _pair("sgd", algo=algo)
    _train(pairs, 3)
    # closure calls 0 (w), 1 and 2 (the samples) of each step
    assert _train(pairs, 4, calls=[], use_gated=lambda k: k % 3 != 1) == 4
    assert _planned(pairs[2])


@pytest.mark.parametrize("noise", list(NOISES))
@pytest.mark.parametrize("algo", list(CLASSES))
def test_learning_rate_made_a_tensor_during_the_step(algo, noise):
    """The groups changed during the closures: the plan's descent is not taken, the step ends
    unplanned from what the plan kept (the same bits), and the plan is rebuilt."""
    pairs = _pair("adamw", algo=algo, noise=noise)
    _train(pairs, 3)
    lr_made_a_tensor(pairs, _same, before_step=_reseed)
    opt = pairs[2]
    assert not _planned(opt)
    assert opt.steps_taken == 4


@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("noise", list(NOISES))
@pytest.mark.parametrize("algo", list(CLASSES))
def test_a_closure_that_raises_leaves_weights_state_and_offset(algo, noise, at):
    m, r, opt, ref = _pair("sgd", algo=algo, noise=noise)
    _train((m, r, opt, ref), 3)
    plan = opt._step_plan
    offset = None if noise == "reference" else opt._noise_offset.clone()
    raise_at_call(m, opt, at)
    if offset is not None:
        assert torch.equal(opt._noise_offset, offset)
    assert plan.plan.universal_kept() == []  # what the step kept was dropped
    # the reference did not take that step either: the next steps give the same bits
    assert _train((m, r, opt, ref), 2) == 2


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_grad_norm=1.0),
        dict(on_nonfinite="raise"),
    ],
)
@pytest.mark.parametrize("algo", list(CLASSES))
def test_not_planned_where_it_may_not(algo, kw):
    m, r, opt, ref = _pair("sgd", **kw, algo=algo)
    opt.plan_steps = True
    for s in range(4):
        x, y = _data(s)
        with DispatchedOps() as seen:
            opt.step(_closure(m, opt, x, y))
        assert not any(op in PLAN_OPS for op in seen.ops)
    assert not _planned(opt)


@pytest.mark.parametrize("algo", list(CLASSES))
def test_not_planned_with_an_unperturbed_group(algo):
    def groups(model):
        return [
            {"params": [model.conv.weight, model.fc.weight]},
            {"params": [model.conv.bias, model.fc.bias, model.scale, model.t, model.gated]},
        ]

    pairs = _pair("sgd", groups=groups, algo=algo)
    for o in pairs[2:]:
        o.param_groups[1]["rho"] = 0.0
    assert _train(pairs, 4) == 0
    assert isinstance(pairs[2]._step_plan, sp.Unplanned)


@pytest.mark.parametrize("algo", list(CLASSES))
def test_noise_given_runs_unplanned(algo):
    m, r, opt, ref = _pair("sgd", algo=algo)
    _train((m, r, opt, ref), 3)
    x, y = _data(9)
    pert = [p for p in m.parameters()]
    noise = [[0.05 * torch.randn_like(p) for p in pert] for _ in range(opt.n_samples)]
    with DispatchedOps() as seen:
        opt.step(_closure(m, opt, x, y), noise=noise)
    assert not any(op in PLAN_OPS for op in seen.ops)
    assert opt.steps_taken == 4


@pytest.mark.parametrize("algo", list(CLASSES))
def test_state_dict_round_trip_between_planned_steps(algo):
    m, r, opt, ref = _pair("adamw", algo=algo)
    _train((m, r, opt, ref), 3)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert _train((m, r, opt, ref), 3) >= 2
    assert _planned(opt)
