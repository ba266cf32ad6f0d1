"""SAM's planned step on the compiled extension (python_api/_step_plan.py, csrc/step_plan.cpp).

Every case runs the same training twice from the same weights, once with planned steps (the
default) and once with ``plan_steps = False`` (the unplanned path, itself checked against the
spec's equations in tests/optim/test_sam.py), and requires the weights, the base optimizer's
state and the counters to be bit-identical after every step. The cases also check that the plan
is used (two dispatched ops per step), rebuilt when it must be and reused when it may.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _helpers import DispatchedOps
from _helpers import assert_same_training as _same
from _plan_training import make_pair
from torch import nn
from torch.overrides import TorchFunctionMode

import python_api._step_plan as sp
from python_api import SAM
from sam_kernels import identity, step_plan

pytestmark = pytest.mark.skipif(
    not step_plan.available("cpu"),
    reason="the compiled extension (with its step plan) is not built",
)
#: the GPU run checks the plan on CUDA tensors too (the extension is not the default there: asked
#: for by name)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and step_plan.available("cuda") else [])

#: the plans' identity checks (sam_kernels/identity.py): the C loops, and the Python versions
#: they replace where the C module is not built; the tests that change what a plan holds run both
IDENTITY = ["python"] + (["c"] if identity.compiled() else [])


@pytest.fixture(params=IDENTITY)
def identity_checks(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(identity, "_c", None)
    return request.param


SGD = (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3))
BASES = {
    "sgd": SGD,
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True)),
    "sgd-dampening-maximize": (
        torch.optim.SGD,
        dict(lr=1e-3, momentum=0.7, dampening=0.3, maximize=True, weight_decay=1e-2),
    ),
    "sgd-no-momentum": (torch.optim.SGD, dict(lr=0.1)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.95), amsgrad=True)),
}


class Net(nn.Module):
    """Odd shapes, a one-element parameter, an empty one and a non-contiguous one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.scale = nn.Parameter(torch.ones(1))
        self.empty = nn.Parameter(torch.zeros(0, 3))
        self.t = nn.Parameter(torch.randn(7, 3).t())  # a transposed (non-contiguous) weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        out = self.fc(h) * self.scale
        return out @ self.t.t() + self.empty.sum()


def _data(seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, 6, 6, generator=g).to(dtype), torch.randn(6, 3, generator=g)
    return x.to(device), y.to(device)


def _loss(model: nn.Module, x, y) -> torch.Tensor:
    x, y = x.to(model.fc.weight.device), y.to(model.fc.weight.device)
    return (model(x).float() - y).square().mean()


def _pair(base: str = "sgd", groups=None, dtype=torch.float32, device="cpu", **kw):
    """Two identical models and optimizers: planned (default) and unplanned."""
    return make_pair(Net, SAM, BASES[base], groups, dtype, device, **kw)


def _grads(model, opt, seed, dtype=torch.float32):
    opt.zero_grad()
    _loss(model, *_data(seed, dtype)).backward()


def _two_call(pairs, seed, dtype=torch.float32):
    for model, opt in pairs:
        _grads(model, opt, seed, dtype)
        opt.first_step(zero_grad=True)
        _grads(model, opt, seed + 1000, dtype)
        opt.second_step(zero_grad=True)


def _closure_step(pairs, seed, dtype=torch.float32):
    for model, opt in pairs:
        x, y = _data(seed, dtype)

        def closure():
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)


def _closure_of(model, o, x, y, before=None):
    """A closure of these tests: ``before()`` (a count, an edit), zero_grad, loss, backward."""

    def closure():
        if before is not None:
            before()
        o.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    return closure


def _ops_of_one_step(m, opt) -> tuple[list[str], list[str]]:
    """The ops dispatched by ``first_step`` and by ``second_step`` (gradients set outside)."""
    _grads(m, opt, 7)
    with DispatchedOps() as first:
        opt.first_step()
    _grads(m, opt, 8)
    with DispatchedOps() as second:
        opt.second_step()
    return first.ops, second.ops


def _planned(opt) -> bool:
    return isinstance(opt._step_plan, sp.PlannedStep)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("form", ["two-call", "closure"])
def test_bit_identical_to_the_unplanned_step(base, form, device):
    m, r, opt, ref = _pair(base, device=device)
    run = _two_call if form == "two-call" else _closure_step
    for s in range(6):
        run([(m, opt), (r, ref)], s)
        _same(m, r, opt, ref)
    assert _planned(opt) and not _planned(ref)
    assert opt.steps_taken == 6


class _SeenOps(TorchFunctionMode):
    """A torch-function mode that records the name of every call it sees and runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(str(getattr(func, "__name__", func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", ["two-call", "closure"])
def test_planned_under_a_torch_function_mode(form):
    # the plan's ops are called with subclass torch functions disabled (the plan's script
    # object answers torch's __torch_function__ probe by raising); a mode must still see them
    m, r, opt, ref = _pair("sgd")
    run = _two_call if form == "two-call" else _closure_step
    for s in range(2):  # the state, the cached plans; the step plan from the third step
        run([(m, opt), (r, ref)], s)
    for s in range(2, 5):
        with _SeenOps() as seen:
            run([(m, opt), (r, ref)], s)
        _same(m, r, opt, ref)
        assert _planned(opt) and not _planned(ref)
        assert any(n.startswith("plan_ascent") for n in seen.names), seen.names
        assert any(n.startswith("plan_descent") for n in seen.names), seen.names
    assert opt.steps_taken == ref.steps_taken == 5


@pytest.mark.parametrize("zeroing", ["set_to_none", "in_place"])
def test_stale_and_fresh_gradients_on_the_plan(zeroing):
    """The plan's stale-gradient marks (drop_stale_watched: by place and by the marked tensor's
    address): davda54's loop, the user's own backward before ``step(closure)``, counts as
    ``g0`` (one closure call per step) whether its gradients are new tensors or accumulated into
    zeroed ones; no backward since the last step (the gradients the step left, unchanged or
    zeroed in place) is stale: the closure runs at ``w`` too (two calls). The same weights and
    state as the unplanned step every time."""
    m, r, opt, ref = _pair("sgd")
    calls = {id(opt): 0, id(ref): 0}
    for s in range(6):
        fresh = s % 2 == 0
        for model, o in ((m, opt), (r, ref)):
            x, y = _data(s)
            o.zero_grad(set_to_none=zeroing == "set_to_none")
            if fresh:
                _loss(model, x, y).backward()

            def count(o=o):
                calls[id(o)] += 1

            o.step(_closure_of(model, o, x, y, before=count))
        _same(m, r, opt, ref)
        assert _planned(opt) or s < 2  # built at the third step (after the state exists)
    # steps 0, 2, 4 fresh (one call each), 1, 3, 5 stale (two each)
    assert calls[id(opt)] == calls[id(ref)] == 9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    m, r, opt, ref = _pair("sgd", dtype=dtype)
    for s in range(4):
        _two_call([(m, opt), (r, ref)], s, dtype)
        _same(m, r, opt, ref)
    assert _planned(opt)


def test_asam_and_groups_with_their_own_settings():
    def groups(model):
        return [
            {"params": [model.conv.weight, model.fc.weight], "rho": 0.5},
            {"params": [model.conv.bias, model.fc.bias, model.scale], "lr": 0.01, "rho": 0.2},
            {"params": [model.empty, model.t], "weight_decay": 0.0},
        ]

    m, r, opt, ref = _pair("sgd", groups=groups, adaptive=True, eta=0.01, rho=0.3)
    for s in range(5):
        _two_call([(m, opt), (r, ref)], s)
        _same(m, r, opt, ref)
    assert _planned(opt)


def test_two_dispatched_ops_per_step():
    m, r, opt, ref = _pair("sgd")
    for s in range(3):
        _two_call([(m, opt)], s)
    first, second = _ops_of_one_step(m, opt)
    assert first == ["sam_kernels_C.plan_ascent.default"]
    assert second == ["sam_kernels_C.plan_descent.default"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["g0", "g1", "loss"])
def test_nonfinite_skips_on_the_device(where, device):
    m, r, opt, ref = _pair("adamw", device=device)
    for s in range(3):
        _closure_step([(m, opt), (r, ref)], s)
    before = [p.clone() for p in m.parameters()]
    for model, o in ((m, opt), (r, ref)):
        x, y = _data(50)
        calls = [0]

        def closure():
            o.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            calls[0] += 1
            if where == "g0" and calls[0] == 1 or where == "g1" and calls[0] == 2:
                model.fc.weight.grad[0, 0] = float("nan")
            if where == "loss":
                return loss * float("inf")
            return loss

        o.step(closure)
    _same(m, r, opt, ref)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert opt.skipped_steps == 1 and opt.steps_taken == 3
    _closure_step([(m, opt), (r, ref)], 60)  # and the next step runs
    _same(m, r, opt, ref)
    assert opt.steps_taken == 4


def test_a_parameter_losing_then_regaining_its_gradient():
    m, r, opt, ref = _pair("sgd")
    for s in range(8):
        for model, o in ((m, opt), (r, ref)):
            _grads(model, o, s)
            if s in (3, 4):
                model.scale.grad = None  # no gradient in either pass of this step
            o.first_step(zero_grad=True)
            _grads(model, o, s + 100)
            if s in (3, 4):
                model.scale.grad = None
            o.second_step(zero_grad=True)
        _same(m, r, opt, ref)
    assert _planned(opt)


def test_gradient_vanishing_in_the_second_pass_runs_unplanned():
    m, r, opt, ref = _pair("sgd")
    for s in range(4):
        _two_call([(m, opt), (r, ref)], s)
    for model, o in ((m, opt), (r, ref)):
        _grads(model, o, 9)
        o.first_step(zero_grad=True)
        _grads(model, o, 10)
        model.fc.bias.grad = None  # perturbed at w, no gradient at w + e: restored, not stepped
        o.second_step(zero_grad=True)
    _same(m, r, opt, ref)
    _two_call([(m, opt), (r, ref)], 11)
    _same(m, r, opt, ref)


def test_reused_across_hyper_parameter_changes_rebuilt_on_rho():
    m, r, opt, ref = _pair("sgd")
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (opt, ref)]
    for s in range(3):
        _two_call([(m, opt), (r, ref)], s)
        for sc in scheds:
            sc.step()
    plan = opt._step_plan
    for s in range(3, 6):
        for o in (opt, ref):
            o.param_groups[0]["momentum"] = 0.5 + 0.1 * s  # a value, not the lists' shape
        _two_call([(m, opt), (r, ref)], s)
        for sc in scheds:
            sc.step()
        _same(m, r, opt, ref)
    assert opt._step_plan is plan  # lr and momentum are read per step
    for o in (opt, ref):
        o.param_groups[0]["rho"] = 0.2  # the rho vector: a new plan
    _two_call([(m, opt), (r, ref)], 7)
    _same(m, r, opt, ref)
    _two_call([(m, opt), (r, ref)], 8)
    assert _planned(opt) and opt._step_plan is not plan


def test_add_param_group_and_load_state_dict():
    def groups(model):
        return [p for n, p in model.named_parameters() if n != "scale"]

    m, r, opt, ref = _pair("adamw", groups=groups)
    for s in range(3):
        _two_call([(m, opt), (r, ref)], s)
    opt.add_param_group({"params": [m.scale], "lr": 0.001})
    ref.add_param_group({"params": [r.scale], "lr": 0.001})
    for s in range(3, 6):
        _two_call([(m, opt), (r, ref)], s)
        _same(m, r, opt, ref)
    assert _planned(opt)
    saved = copy.deepcopy(opt.state_dict())
    plan = opt._step_plan
    for s in range(6, 8):
        _two_call([(m, opt), (r, ref)], s)
    opt.load_state_dict(saved)
    ref.load_state_dict(saved)
    for s in range(8, 11):
        _two_call([(m, opt), (r, ref)], s)
        _same(m, r, opt, ref)
    assert _planned(opt) and opt._step_plan is not plan


def test_a_replaced_state_tensor_is_the_one_stepped(identity_checks):
    m, r, opt, ref = _pair("sgd")
    for s in range(3):
        _two_call([(m, opt), (r, ref)], s)
    for model, o in ((m, opt), (r, ref)):
        st = o.base_optimizer.state[model.fc.weight]
        st["momentum_buffer"] = torch.full_like(st["momentum_buffer"], 0.25)
    _two_call([(m, opt), (r, ref)], 3)
    _same(m, r, opt, ref)
    assert not torch.equal(
        opt.base_optimizer.state[m.fc.weight]["momentum_buffer"],
        torch.full_like(m.fc.weight, 0.25),
    )


def _torch_sam_steps(model, base, steps, reset_at, reset):
    """SAM as davda54/sam's loop over torch's own optimizer ``base`` (the reference of a state
    reset): g0, e = rho g0 / (||g0|| + 1e-12), g at w + e, w restored, ``base.step()``."""
    for s in range(steps):
        if s == reset_at:
            reset(base.state, model.fc.weight)
        x, y = _data(s)
        base.zero_grad()
        _loss(model, x, y).backward()
        with torch.no_grad():
            ps = [p for p in model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps]))
            old = [p.clone() for p in ps]
            for p in ps:
                p.add_(p.grad * (0.05 / (norm + 1e-12)))
        base.zero_grad()
        _loss(model, x, y).backward()
        with torch.no_grad():
            for p, o in zip(ps, old):
                p.copy_(o)
        base.step()


def _replace(state, p):
    state[p] = {}


def _delete(state, p):
    del state[p]


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
@pytest.mark.parametrize("reset", [_replace, _delete], ids=["replaced", "deleted"])
@pytest.mark.parametrize("base", ["SGD", "AdamW"])
def test_a_parameters_state_reset_is_seen(base, reset, planned, identity_checks):
    """``base.state[p] = {}`` (or ``del``) restarts p's base state, as it does for torch's own
    optimizer: the plans held p's old state dict (its momentum, its AdamW moments) and kept
    stepping it, silently (0.135 away from torch's weights after two more SGD steps)."""
    cls, kw = (
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
        if base == "SGD"
        else (torch.optim.AdamW, {"lr": 0.01})
    )
    torch.manual_seed(0)
    m = Net()
    r = copy.deepcopy(m)
    opt = SAM(m.parameters(), cls, rho=0.05, **kw)
    opt.plan_steps = planned
    for s in range(6):
        if s == 4:
            assert _planned(opt) == planned
            reset(opt.base_optimizer.state, m.fc.weight)
        _closure_step([(m, opt)], s)
    _torch_sam_steps(r, cls(r.parameters(), **kw), 6, 4, reset)
    for a, b in zip(m.parameters(), r.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _edit_state(opt, p, edit):
    st = opt.base_optimizer.state
    if edit == "reset":
        st[p] = {}
    else:  # a buffer replaced (a value no step would give)
        for k, v in list(st[p].items()):
            st[p][k] = torch.full_like(v, 0.25)


@pytest.mark.parametrize("edit", ["reset", "replaced"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("form", ["two-call", "closure"])
def test_a_state_edit_inside_a_step_is_seen(form, base, edit, identity_checks):
    """User code runs inside a step: between ``first_step`` and ``second_step``, or in the
    closure. A base state entry replaced or reset there is written by the descent as by the
    unplanned one (the planned descent stepped the tensors the ascent had checked)."""
    m, r, opt, ref = _pair(base)
    for s in range(6):
        pairs = [(m, opt), (r, ref)]
        if form == "two-call":
            for model, o in pairs:
                _grads(model, o, s)
                o.first_step(zero_grad=True)
                if s == 3:
                    _edit_state(o, model.fc.weight, edit)
                _grads(model, o, s + 1000)
                o.second_step(zero_grad=True)
        else:
            for model, o in pairs:
                x, y = _data(s)
                calls = [0]

                def edit_at_w_plus_e(model=model, o=o, calls=calls):
                    calls[0] += 1
                    if s == 3 and calls[0] == 2:  # the evaluation at w + e
                        _edit_state(o, model.fc.weight, edit)

                o.step(_closure_of(model, o, x, y, before=edit_at_w_plus_e))
        _same(m, r, opt, ref)
    assert _planned(opt)


@pytest.mark.parametrize("edit", ["reset", "replaced"])
@pytest.mark.parametrize("algo", ["CRSAM", "FrobSAM"])
def test_a_state_edit_in_the_closure_is_seen_by_the_other_plans(algo, edit):
    """The same for CR-SAM's and the universal class's plans (their descents checked only the
    plans' keys: 0.03 away from the unplanned step after the edit)."""
    import _plan_training as pt

    import python_api

    kw = {"seed": 1234, "backend": "ext"} if algo == "FrobSAM" else {}
    m, r, opt, ref = pt.make_pair(pt.Net, getattr(python_api, algo), pt.BASES["sgd"], **kw)
    for s in range(6):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(6, 3, 6, 6, generator=g), torch.randn(6, 3, generator=g)
        for model, o in ((m, opt), (r, ref)):
            calls = [0]

            def closure(model=model, o=o, calls=calls):
                calls[0] += 1
                if s == 3 and calls[0] == 2:  # an evaluation at a perturbed point
                    _edit_state(o, model.fc.weight, edit)
                o.zero_grad()
                loss = (model(x) - y).square().mean()
                loss.backward()
                return loss

            o.step(closure)
        _same(m, r, opt, ref)
    assert _planned(opt)


def test_parameters_retyped():
    m, r, opt, ref = _pair("sgd")
    for s in range(3):
        _two_call([(m, opt), (r, ref)], s)
    m.to(torch.bfloat16)
    r.to(torch.bfloat16)
    for s in range(3, 7):
        _two_call([(m, opt), (r, ref)], s, torch.bfloat16)
        _same(m, r, opt, ref)
    assert _planned(opt) and m.fc.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("form", ["two-call", "closure"])
def test_gradient_clipping(base, form):
    """Clipped (threshold below the gradient norm) and unclipped (above) steps, and a threshold
    changed between steps (a new plan)."""
    m, r, opt, ref = _pair(base, max_grad_norm=0.05)
    run = _two_call if form == "two-call" else _closure_step
    for s in range(8):
        if s == 4:
            opt.max_grad_norm = ref.max_grad_norm = 100.0
        run([(m, opt), (r, ref)], s)
        _same(m, r, opt, ref)
    assert _planned(opt)


@pytest.mark.parametrize(
    "kw",
    [dict(on_nonfinite="raise"), dict(backend="eager")],
    ids=["raise", "eager"],
)
def test_settings_that_are_not_planned(kw):
    m, r, opt, ref = _pair("sgd", **kw)
    for s in range(4):
        _two_call([(m, opt), (r, ref)], s)
        _same(m, r, opt, ref)
    assert isinstance(opt._step_plan, sp.Unplanned)
    opt.on_nonfinite = "skip"  # settings changed: tried again
    opt.backend = None
    for s in range(4, 7):
        _two_call([(m, opt)], s)
    assert _planned(opt)


def test_fp64_and_other_bases_are_not_planned():
    m, _, opt, _ = _pair("sgd", dtype=torch.float64)
    for s in range(3):
        _two_call([(m, opt)], s, torch.float64)
    assert not _planned(opt)
    torch.manual_seed(0)
    n = Net()
    opt2 = SAM(n.parameters(), torch.optim.Adam, lr=0.01)
    for s in range(3):
        _two_call([(n, opt2)], s)
    assert not _planned(opt2)


def test_copies_and_pickles_start_without_a_plan():
    m, r, opt, ref = _pair("sgd")
    for s in range(3):
        _two_call([(m, opt), (r, ref)], s)
    assert _planned(opt)
    bundle = copy.deepcopy({"m": m, "opt": opt})
    assert bundle["opt"]._step_plan is None
    again = pickle.loads(pickle.dumps({"m": m, "opt": opt}))
    assert again["opt"]._step_plan is None
    m2, opt2 = bundle["m"], bundle["opt"]
    for s in range(3, 6):
        _two_call([(m, opt), (r, ref), (m2, opt2)], s)
        _same(m, r, opt, ref)
        _same(m2, r, opt2, ref)
    assert _planned(opt2)


def test_compiled_training_step_after_planned_steps():
    """Eager steps run planned; a ``torch.compile``d step afterwards traces the unplanned path
    (the plan's ops are not traced) and continues from the same state."""
    m, r, opt, ref = _pair("sgd")
    for s in range(3):
        _closure_step([(m, opt), (r, ref)], s)
    assert _planned(opt)

    def train(model, o, x, y):
        def closure():
            o.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        return o.step(closure)

    torch._dynamo.reset()
    compiled = torch.compile(train, backend="eager")
    for s in range(3, 6):
        x, y = _data(s)
        compiled(m, opt, x, y)
        train(r, ref, x, y)
        _same(m, r, opt, ref)
    _closure_step([(m, opt), (r, ref)], 6)  # eager again: planned again
    _same(m, r, opt, ref)
    assert _planned(opt)


@pytest.mark.parametrize("planned", [True, False])
@pytest.mark.parametrize("how", ["new list", "in place"])
def test_group_params_replaced(how, planned, identity_checks):
    """A group's parameters swapped for others of the same shapes (a new list, or the same list
    changed in place): the new parameters are the ones normed, perturbed and stepped, as a
    fresh optimizer over them would (their state starts empty)."""
    m, _, opt, _ = _pair("sgd")
    opt.plan_steps = planned
    for s in range(3):
        _two_call([(m, opt)], s)
    torch.manual_seed(1)
    new = Net()
    fresh = copy.deepcopy(new)
    old = [p.detach().clone() for p in m.parameters()]
    if how == "new list":
        opt.param_groups[0]["params"] = list(new.parameters())
    else:
        opt.param_groups[0]["params"][:] = list(new.parameters())
    f_opt = SAM(fresh.parameters(), BASES["sgd"][0], **BASES["sgd"][1])
    f_opt.plan_steps = planned
    for s in range(3, 6):
        _two_call([(new, opt), (fresh, f_opt)], s)
        for p, q in zip(new.parameters(), fresh.parameters()):
            assert torch.equal(p, q)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), old))  # the old ones untouched
    assert _planned(opt) == planned


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("form", ["two-call", "closure"])
def test_one_rank_process_group(base, form):
    """torch.distributed initialized (a one-rank gloo group in process; the two-process DDP runs
    are tests/integration/test_step_plan_ddp.py): the planned descent is two ops with the flag's
    MIN all-reduce between them, bit-identical to the unplanned step, and either path performs
    exactly one all-reduce per step."""
    from _dist_setup import all_reduces_counted

    m, r, opt, ref = _pair(base, max_grad_norm=0.5 if base == "adamw" else None)
    run = _two_call if form == "two-call" else _closure_step
    with all_reduces_counted(True) as calls:
        for s in range(6):
            for pair in ((m, opt), (r, ref)):
                n = len(calls)
                run([pair], s)
                assert len(calls) == n + 1
            _same(m, r, opt, ref)
        assert _planned(opt)
        first, second = _ops_of_one_step(m, opt)
    assert first == ["sam_kernels_C.plan_ascent.default"]
    assert second == [
        "sam_kernels_C.plan_descent_flag.default",
        "c10d.allreduce_.default",
        "sam_kernels_C.plan_descent_apply.default",
    ]


def test_descent_in_two_parts():
    """``descent_flag`` then ``descent_apply`` (no all-reduce between: one process) is
    ``descent``; each changes nothing and says so when a gradient is not where the plan
    expects it."""
    m, r, opt, ref = _pair("adamw", max_grad_norm=0.5)
    for s in range(3):
        _two_call([(m, opt), (r, ref)], s)
    plans = []
    for model, o in ((m, opt), (r, ref)):
        o.plan_steps = True
        _grads(model, o, 5)
        o.first_step(zero_grad=True)
        _grads(model, o, 6)
        plans.append(o._step_plan)
    assert _planned(opt) and _planned(ref)
    hyper = plans[0].hyper()
    ok = torch.ones(())
    # a missing gradient: nothing written
    saved = m.fc.bias.grad
    m.fc.bias.grad = None
    before = [p.clone() for p in m.parameters()], opt._counters.clone()
    assert plans[0].plan.descent_flag(ok) is None
    assert plans[0].plan.descent_apply(ok, torch.zeros(()), hyper, 0.5) is False
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before[0]))
    assert torch.equal(opt._counters, before[1])
    m.fc.bias.grad = saved
    flag, n1 = plans[0].plan.descent_flag(ok)
    assert flag.dim() == 0 and flag.item() == 1.0
    assert plans[0].plan.descent_apply(flag, n1, hyper, 0.5) is True
    assert plans[1].plan.descent(ok, hyper, None, 0.5) is True
    _same(m, r, opt, ref)
