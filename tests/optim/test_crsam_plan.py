"""CR-SAM's planned step on the compiled extension (python_api/crsam.py, csrc/step_plan.cpp).

Every case trains two copies from the same weights, one with planned steps (the default) and
one with ``plan_steps = False`` (the unplanned path, itself checked against the spec's
equations in tests/optim/test_crsam.py), and requires the weights, the base optimizer's state
and the counters to be bit-identical after every step; and that the plan ran (three dispatched
ops of its own per step) where it may, and did not where it may not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import DispatchedOps
from _helpers import assert_same_training as _same
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

from python_api import CRSAM
from python_api import _step_plan as sp
from sam_kernels import step_plan

pytestmark = pytest.mark.skipif(
    not step_plan.crsam_available("cpu"),
    reason="the compiled extension (with CR-SAM's step plan) is not built",
)
#: the GPU run checks the plan on CUDA tensors too (the extension is not the default there: asked
#: for by name)
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and step_plan.crsam_available("cuda") else []
)

OWN_OPS = [
    "sam_kernels_C.crsam_ascent.default",
    "sam_kernels_C.crsam_middle.default",
    "sam_kernels_C.crsam_descent.default",
]


def _train(pairs, steps, dtype=torch.float32, user_backward=False, **closure_kw) -> int:
    """``steps`` steps of both; returns how many of the planned one's ran on its plan."""
    return train_pair(
        pairs, steps, descent=OWN_OPS[2], plan_ops=tuple(OWN_OPS), same=_same, dtype=dtype,
        user_backward=user_backward, **closure_kw,
    )  # fmt: skip


def _pair(base="sgd", groups=None, dtype=torch.float32, device="cpu", **kw):
    return make_pair(Net, CRSAM, BASES[base], groups, dtype, device, **kw)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("user_backward", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_bit_identical_to_the_unplanned_step(device, base, user_backward):
    pairs = _pair(base, device=device)
    assert _train(pairs, 6, user_backward=user_backward) == 4  # from the third step on
    assert _planned(pairs[2]) and not _planned(pairs[3])
    assert pairs[2].steps_taken == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    pairs = _pair("adamw", dtype=dtype)
    _train(pairs, 4, dtype=dtype)
    assert _planned(pairs[2])


def test_groups_with_their_own_rho_and_lr():
    def groups(model):
        return [
            {"params": [model.conv.weight, model.fc.weight], "rho": 0.5},
            {"params": [model.conv.bias, model.fc.bias, model.scale], "lr": 0.01, "rho": 0.2},
            {"params": [model.t, model.gated], "weight_decay": 0.0},
        ]

    pairs = _pair("sgd", groups=groups, alpha=0.3, beta=0.05)
    _train(pairs, 5)
    assert _planned(pairs[2])


def test_three_own_ops_per_step():
    m, r, opt, ref = _pair("sgd")
    _train((m, r, opt, ref), 3)
    x, y = _data(9)
    with DispatchedOps() as seen:
        opt.step(_closure(m, opt, x, y))
    own = [op for op in seen.ops if op.startswith("sam_kernels")]
    assert own == OWN_OPS


@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_skips_on_the_device(where, kind):
    """A non-finite loss or gradient at ``w``, ``w + e`` or ``w - e`` (closure call 0, 1, 2)
    skips the step: weights and state as before, the skip counted, as on the unplanned path."""
    m, r, opt, ref = _pair("adamw")
    _train((m, r, opt, ref), 3)
    before = [p.clone() for p in m.parameters()]
    x, y = _data(50)
    for model, o in ((m, opt), (r, ref)):
        closure = nonfinite_closure(model, o, x, y, where, kind)
        with DispatchedOps() as seen:
            o.step(closure)
        assert (OWN_OPS[0] in seen.ops) == (o is opt)
    _same(m, r, opt, ref)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert opt._counters.tolist() == [3.0, 1.0]


def test_gradients_missing_or_new_at_perturbed_points():
    """A parameter the loss stops depending on at ``w + e`` gets zeros; one without a gradient
    at ``w`` that gets one at ``w - e`` has it dropped (``_collect_grads``), on the plan too."""
    pairs = _pair("sgd")
    _train(pairs, 3)
    # closure calls 0 (w), 1 (w + e), 2 (w - e) of each step
    assert _train(pairs, 4, calls=[], use_gated=lambda k: k % 3 != 1) == 4
    assert _planned(pairs[2])


def test_learning_rate_made_a_tensor_during_the_step():
    """The groups changed during the closures: the plan's descent is not taken, the base step
    runs unplanned from the gradients the plan kept (the same bits), and the plan is rebuilt."""
    pairs = _pair("adamw")
    _train(pairs, 3)
    lr_made_a_tensor(pairs, _same)
    opt = pairs[2]
    assert not _planned(opt)
    assert opt._step_plan is None or isinstance(opt._step_plan, sp.Unplanned)


@pytest.mark.parametrize("at", [1, 2])
def test_a_closure_that_raises_leaves_the_weights(at):
    m, r, opt, ref = _pair("sgd")
    _train((m, r, opt, ref), 3)
    plan = opt._step_plan
    raise_at_call(m, opt, at)
    assert plan.plan.kept() == []  # the kept gradients were dropped
    # the reference did not take that step either: the next steps give the same bits
    _train((m, r, opt, ref), 2)


@pytest.mark.parametrize(
    "kw", [dict(log_form=True), dict(max_grad_norm=1.0), dict(on_nonfinite="raise")]
)
def test_not_planned_where_it_may_not(kw):
    m, r, opt, ref = _pair("sgd", **kw)
    _train((m, r, opt, ref), 4)
    x, y = _data(9)
    with DispatchedOps() as seen:
        opt.step(_closure(m, opt, x, y))
    assert not any(op.startswith("sam_kernels_C.crsam") for op in seen.ops)


def test_state_dict_round_trip_between_planned_steps():
    m, r, opt, ref = _pair("adamw")
    _train((m, r, opt, ref), 3)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train((m, r, opt, ref), 3)
    assert _planned(opt)
