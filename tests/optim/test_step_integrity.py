"""Silent-wrong-result cases of issue 13, through the one table of tests/_optim_table.py.

- stale gradients never become g0: ``zero_grad(set_to_none=False)`` before the step, or a loop
  that zeroes inside its closure (Lightning's automatic optimization), trains exactly as the
  ``set_to_none=True`` loop, with the same number of closure calls;
- a ``torch.compile``d whole training step (zero_grad + step, dynamo's eager backend for every
  class; inductor for SAM/ASAM/CR-SAM) gives the weights of the plain step;
- a step is atomic: an exception inside the base step or a kernel's check leaves weights,
  base-optimizer state, counters and the algorithm's state as before the step;
- parameters re-typed after construction (``model.to(bfloat16)``, ``.to(float64)``) keep
  working, as with ``torch.optim.SGD``: the state follows the parameters;
- a base-optimizer instance already wrapped is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import same
from _optim_table import (
    BASES,
    NAMES,
    SPECS,
    Net,
    batches,
    build,
    make_closure,
    opt_class,
)
from torch import nn

import python_api


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _equal_models(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------- stale g0
STALE = [n for n in NAMES if n != "ESAM"]  # ESAM runs every backward itself


def _loop(name, base, mode, steps=4):
    torch.manual_seed(0)
    model = Net()
    opt = build(name, base, model)
    calls = [0]
    torch.manual_seed(1)  # the eager universal class draws its noise from the global stream
    for x, y in batches(steps):
        inner = make_closure(name, model, x, y)

        def closure():
            calls[0] += 1
            if mode == "inside":
                opt.zero_grad()
            return inner()

        if mode == "none":
            opt.zero_grad()
        elif mode == "false":
            opt.zero_grad(set_to_none=False)
        elif mode == "model_false":
            model.zero_grad(set_to_none=False)
        opt.step(closure)
    return model, calls[0]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["false", "model_false", "inside"])
@pytest.mark.parametrize("name", STALE)
def test_stale_gradients_are_not_g0(name, base, mode):
    ref, ref_calls = _loop(name, base, "none")
    got, calls = _loop(name, base, mode)
    assert calls == ref_calls, f"{calls} closure calls, the set_to_none=True loop made {ref_calls}"
    assert _equal_models(ref, got)


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
def test_stale_gradients_seen_after_the_parameter_order_changed(planned):
    """The marks a step leaves are by place, with the order they were taken in: after a group
    is added in front of the marked parameters' places (here: a new group, and the first
    group's list reversed in place), stale gradients are still found by parameter."""
    runs = []
    for zero in ("none", "false"):
        torch.manual_seed(0)
        model = Net()
        extra = nn.Parameter(torch.zeros(2))
        opt = build("SAM", "sgd", model)
        opt.plan_steps = planned
        calls = [0]
        for s, (x, y) in enumerate(batches(5)):
            if s == 2:
                opt.add_param_group({"params": [extra]})
                opt.param_groups[0]["params"].reverse()
            inner = make_closure("SAM", model, x, y)

            def closure(inner=inner):
                calls[0] += 1
                return inner()

            opt.zero_grad(set_to_none=(zero == "none"))
            opt.step(closure)
        runs.append((model, calls[0]))
    (ref, ref_calls), (got, calls) = runs
    assert calls == ref_calls == 10  # stale gradients dropped: two evaluations every step
    assert _equal_models(ref, got)


@pytest.mark.parametrize("name", ["SAM", "CRSAM", "LookSAM"])
def test_fresh_gradients_still_count(name):
    """davda54/sam's loop (the user's own first backward) keeps one closure call fewer, also
    after ``zero_grad(set_to_none=False)`` (the backward accumulates into zeroed tensors)."""
    for zero in ("none", "false"):
        torch.manual_seed(0)
        model = Net()
        opt = build(name, "sgd", model)
        calls = [0]
        for x, y in batches(3):
            inner = make_closure(name, model, x, y)

            def closure():
                calls[0] += 1
                return inner()

            opt.zero_grad(set_to_none=(zero == "none"))
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step(closure)
        # first pass by the user: SAM 1, CR-SAM 2, LookSAM (k=2) 1 or 0 closure calls per step
        per_step = {"SAM": [1, 1, 1], "CRSAM": [2, 2, 2], "LookSAM": [1, 0, 1]}[name]
        assert calls[0] == sum(per_step), (zero, calls[0])


# ----------------------------------------------------------------- compiled training step
def _compiled_run(name, compile_backend, steps=3, adaptive_rho=None):
    torch.manual_seed(0)
    model = Net()
    model.bn.eval()  # keep the graph small: BN in eval mode
    opt = build(name, "sgd", model)

    def train(x, y):
        opt.zero_grad()
        return opt.step(make_closure(name, model, x, y))

    fn = torch.compile(train, backend=compile_backend) if compile_backend else train
    torch.manual_seed(1)
    for x, y in batches(steps):
        fn(x, y)
    return model, opt


@pytest.mark.parametrize("name", NAMES)
def test_compiled_training_step_eager_backend(name):
    torch._dynamo.reset()
    ref, o_ref = _compiled_run(name, None)
    got, o_got = _compiled_run(name, "eager")
    assert o_got.steps_taken == o_ref.steps_taken == 3
    assert _equal_models(ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SAM", "ASAM", "CRSAM"])
def test_compiled_training_step_inductor(name):
    torch._dynamo.reset()
    ref, _ = _compiled_run(name, None)
    got, _ = _compiled_run(name, "inductor")
    for p, q in zip(ref.parameters(), got.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # and not trivially: the step moved the weights
    torch.manual_seed(0)
    assert not _equal_models(Net(), got)


# ----------------------------------------------------------------- atomic steps
def _snapshot(model, opt):
    state = {
        "w": _weights(model),
        "base": copy.deepcopy(opt.base_optimizer.state_dict()),
        # tensor attributes (counters, statistics, offsets), without the scratch copy of the
        # previous statistics that AE-SAM keeps to undo a step
        "own": {
            k: copy.deepcopy(v)
            for k, v in vars(opt).items()
            if isinstance(v, torch.Tensor) and not k.endswith("_prev")
        },
    }
    # the algorithm's per-parameter state, without scratch buffers valid only inside a step
    state["algo"] = copy.deepcopy(
        {
            i: {k: v for k, v in s.items() if k not in opt._transient_state}
            for i, s in enumerate(opt.state.values())
        }
    )
    return state


def _two_steps(name, base, n_batches=4):
    """``name`` over ``base`` after two steps of ``n_batches`` batches: model, opt, batches."""
    torch.manual_seed(0)
    model = Net()
    opt = build(name, base, model)
    data = batches(n_batches)
    torch.manual_seed(1)
    for x, y in data[:2]:
        opt.zero_grad()
        opt.step(make_closure(name, model, x, y))
    return model, opt, data


def _step_raises(name, model, opt, data, match):
    before = _snapshot(model, opt)
    x, y = data[2]
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=match):
        opt.step(make_closure(name, model, x, y))
    after = _snapshot(model, opt)
    for key in ("w", "base", "own", "algo"):
        assert same(before[key], after[key]), f"{key} changed by a step that raised"


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", NAMES)
def test_exception_in_base_step_leaves_everything(name, base, monkeypatch):
    """The base step's launch raises (after every evaluation, with the weights perturbed)."""
    model, opt, data = _two_steps(name, base)
    import sam_kernels as sk

    target = "sgd_step_" if base == "sgd" else "adamw_step_"
    real = getattr(sk, target)

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(sk, target, failing)
    _step_raises(name, model, opt, data, "injected failure")
    monkeypatch.setattr(sk, target, real)
    # and the optimizer keeps working
    x, y = data[3]
    opt.zero_grad()
    opt.step(make_closure(name, model, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", NAMES)
def test_bad_state_in_last_group_is_caught_before_any_launch(name, base):
    """A state buffer that does not match its parameter, in the last group: every group's
    launch is checked before the first one runs, so the first groups are not stepped either."""
    model, opt, data = _two_steps(name, base)
    p = model.bn.bias  # the last group
    key = "momentum_buffer" if base == "sgd" else "exp_avg"
    st = opt.base_optimizer.state[p]
    st[key] = st[key].to(torch.float16)
    _step_raises(name, model, opt, data, key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", NAMES)
def test_parameters_retyped_after_construction(name, base, dtype):
    """``model.to(dtype)`` after some steps: the optimizer keeps stepping, as torch's SGD."""
    model, opt, data = _two_steps(name, base, n_batches=5)
    model.to(dtype)
    for x, y in data[2:]:
        opt.zero_grad()
        opt.step(make_closure(name, model, x.to(dtype), y))
    assert opt.steps_taken + opt.skipped_steps == 5
    assert opt.steps_taken >= 4
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
    for st in list(opt.base_optimizer.state.values()) + list(opt.state.values()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and k != "step":
                assert v.dtype == dtype, k


def test_retyped_sgd_follows_torch_sgd():
    """SAM with rho=0 over SGD after ``model.to(float64)`` equals torch's SGD on the same model
    (whose momentum is cast the same way when its state is loaded). On the eager reference,
    whose arithmetic is torch's own (the extension's fp32 kernels round differently)."""
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    oa = python_api.SAM(a.parameters(), torch.optim.SGD, rho=0.0, backend="eager", **kw)
    ob = torch.optim.SGD(b.parameters(), **kw)
    data = batches(4)
    for i, (x, y) in enumerate(data):
        if i == 2:
            a.to(torch.float64)
            b.to(torch.float64)
            ob.load_state_dict(ob.state_dict())  # torch casts state to the parameters' dtype
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x.to(m.l1.weight.dtype)), y).backward()
        oa.first_step()  # rho = 0: no perturbation, the base step takes g0
        oa.second_step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- one wrapper per base
@pytest.mark.parametrize("name", NAMES)
def test_base_instance_wrapped_twice_is_refused(name):
    model = Net()
    cls, hp = BASES["sgd"]
    base = cls(model.parameters(), **hp)
    kw = SPECS[name][2]
    first = opt_class(name)(None, base, **kw)
    with pytest.raises(ValueError, match="already wrapped"):
        opt_class(name)(None, base, **kw)
    del first
    import gc

    gc.collect()
    opt_class(name)(None, base, **kw)  # once the first wrapper is gone, wrapping again is fine
