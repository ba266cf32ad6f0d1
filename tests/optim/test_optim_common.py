"""One table of optimizers drives the generic tests (in the manner of torch's test_optim.py).

Every class of the set, over SGD-momentum and AdamW: awkward parameters (zero-size,
non-contiguous, no gradient), parameter-group isolation (a rho=0 group is never perturbed),
exact restore, non-finite steps leaving no trace, host reads, state-dict resume, and
eager-vs-Triton parity. The algorithm-specific equations are tested in each class's own file.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _helpers import HostReads, same
from _optim_table import (
    BASES,
    FORWARD_ONLY,
    NAMES,
    RANDOM,
    SEEDED,
    SPECS,
    Net,
    batches,
    build,
    make_closure,
    opt_class,
    run_steps,
)
from torch import nn

import sam_kernels as sk


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_awkward_params_and_group_isolation(name, base):
    model = Net()
    opt = build(name, base, model)
    frozen_b2 = []
    unused0 = model.unused.detach().clone()
    # b2's group has rho=0: at every evaluation b2 must hold its value at w
    run_steps(
        name, model, opt, batches(4), hook=lambda: frozen_b2.append(model.b2.detach().clone())
    )
    assert len(frozen_b2) >= 4
    assert torch.equal(model.unused, unused0)
    assert (
        model.unused not in opt.base_optimizer.state or not opt.base_optimizer.state[model.unused]
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not model.w2t.is_contiguous()

    # b2 values seen inside one step are all equal (unperturbed)
    model2 = Net()
    opt2 = build(name, base, model2)
    seen = []
    x, y = batches(1)[0]
    for _ in range(3):
        seen.clear()
        opt2.zero_grad()
        opt2.step(
            make_closure(name, model2, x, y, hook=lambda: seen.append(model2.b2.detach().clone()))
        )
        assert all(torch.equal(s, seen[0]) for s in seen)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_exact_restore(name, base):
    model = Net()
    model.eval()  # BN in eval mode: weights are the only thing that could move
    cls, hp = BASES[base]
    _, _, kw, _ = SPECS[name]
    opt = opt_class(name)(model.groups(), cls, **{**kw, **hp, "lr": 0.0, "weight_decay": 0.0})
    before = [p.detach().clone() for p in model.parameters()]
    run_steps(name, model, opt, batches(5))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _state(model, opt):
    sd = opt.state_dict()
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(sd)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("at", ["first", "later"])
def test_nonfinite_step_leaves_no_trace(name, base, at):
    """A non-finite loss/gradient at the first or a later evaluation: the step changes nothing,
    and three more steps equal a run that never saw the bad step."""
    data = batches(6)
    torch.manual_seed(11)
    model = Net()
    clean = copy.deepcopy(model)
    opt, opt_clean = build(name, base, model), build(name, base, clean)

    def steps(m, o, sl):
        for x, y in data[sl]:
            o.zero_grad()
            o.step(make_closure(name, m, x, y))

    torch.manual_seed(3)
    steps(model, opt, slice(0, 2))
    torch.manual_seed(3)
    steps(clean, opt_clean, slice(0, 2))

    snap = _state(model, opt)
    x, y = data[2]
    calls = []

    def bad_closure():
        calls.append(1)
        poison = len(calls) == 1 if at == "first" else len(calls) > 1
        if name in FORWARD_ONLY:
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            return losses * float("nan") if poison else losses
        loss = nn.functional.cross_entropy(model(x), y)
        if poison:
            loss = loss * float("inf")
        loss.backward()
        return loss

    # the global generator (eager universal class) as if the bad step had not happened
    rng = torch.get_rng_state()
    opt.zero_grad()
    opt.step(bad_closure)
    torch.set_rng_state(rng)
    if at == "later" and len(calls) == 1:
        pytest.skip("this step was a one-pass (ERM/reuse) step: no later evaluation to poison")
    after = _state(model, opt)
    assert same(snap[0], after[0]), "weights changed"
    assert same(snap[1]["state"], after[1]["state"]), "per-parameter state changed"
    extras = [sd["param_groups"][0].pop("sam_state") for sd in (snap[1], after[1])]
    assert same(snap[1]["param_groups"], after[1]["param_groups"]), "groups changed"
    own = ("counters",)
    if name in SEEDED:  # their own generators advance by the step's draws
        own += ("generator", "rng", "gen")
    keep = lambda d: {k: v for k, v in d.items() if not any(o in k for o in own)}  # noqa: E731
    assert same(keep(extras[0]), keep(extras[1])), "algorithm state changed"
    assert opt.skipped_steps == 1
    if name in SEEDED:
        return  # the generator moved on, so later draws differ from the clean run by design
    rng = torch.get_rng_state()
    steps(model, opt, slice(3, 6))
    torch.set_rng_state(rng)
    steps(clean, opt_clean, slice(3, 6))
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("clip", [None, 0.02], ids=["plain", "clipped"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_host_reads_per_step(name, base, clip):
    """No more host reads than the class allows, with and without gradient clipping (the clip
    coefficient stays on the device)."""
    model = Net()
    opt = build(name, base, model, max_grad_norm=clip)
    allowed = SPECS[name][3]
    for x, y in batches(4):
        opt.zero_grad()
        closure = make_closure(name, model, x, y)
        with HostReads() as spy:
            opt.step(closure)
        assert len(spy.ops) > 10
        assert spy.reads <= allowed, f"{spy.reads} host reads in one step (allowed {allowed})"


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_bit_identical(name, base):
    data = batches(6)
    torch.manual_seed(21)
    model = Net()
    opt = build(name, base, model)
    run_steps(name, model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    run_steps(name, model, opt, data[3:])

    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    fresh = Net()
    fresh.load_state_dict(ck["m"])
    opt2 = build(name, base, fresh)
    opt2.load_state_dict(ck["o"])
    torch.set_rng_state(ck["rng"])  # the eager universal class draws from the global stream
    run_steps(name, fresh, opt2, data[3:])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(model.buffers(), fresh.buffers()):
        assert torch.equal(a, b)


def test_bad_rho(name):
    cls = opt_class(name)
    with pytest.raises(ValueError, match="rho"):
        cls(Net().parameters(), torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        cls(Net().parameters(), torch.optim.SGD, lr=0.1).step()
    opt = cls(Net().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": -1.0})
    assert len(opt.param_groups) == 1  # the refused group is not kept


@pytest.mark.skipif(
    not (torch.cuda.is_available() or sk.available("triton", "cpu")),
    reason="Triton cannot run here (no GPU and TRITON_INTERPRET unset)",
)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_triton_matches_eager(name, base):
    """The whole optimizer on the Triton backend agrees with the eager backend."""
    if name in RANDOM:
        pytest.skip("noise streams differ by design; op-level parity is in test_triton_ops")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = [(x.to(device), y.to(device)) for x, y in batches(10)]
    torch.manual_seed(5)
    m_e = Net().to(device)
    # BN in eval mode: in train mode the bias before it has a pure-rounding-noise gradient,
    # which AdamW normalises to +-lr steps whose signs no two backends need agree on
    m_e.bn.eval()
    m_t = copy.deepcopy(m_e)
    o_e = build(name, base, m_e, backend="eager")
    o_t = build(name, base, m_t, backend="triton")
    run_steps(name, m_e, o_e, data)
    run_steps(name, m_t, o_t, data)
    for (n, p), q in zip(m_e.named_parameters(), m_t.parameters()):
        err = (p - q).abs().max().item() if p.numel() else 0.0
        assert err < 1e-4, (n, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move to")
def test_model_moved_after_construction(name):
    """accelerate-style: the optimizer is built on CPU parameters, then the model moves."""
    model = Net()
    opt = build(name, "sgd", model)
    model.cuda()
    data = [(x.cuda(), y.cuda()) for x, y in batches(3)]
    run_steps(name, model, opt, data)
    assert opt.steps_taken == 3 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_a_parameters_state_reset_is_seen(name, base):
    """``base.state[p] = {}`` restarts p's base state, as for torch's own optimizer: the next
    step builds p's state afresh (the planned and cached steps held the old dict and kept
    stepping its tensors, leaving the new one empty)."""
    model = Net()
    opt = build(name, base, model)
    base_opt = getattr(opt, "base_optimizer", None)
    if base_opt is None:
        pytest.skip(f"{name} has no base optimizer")
    run_steps(name, model, opt, batches(4))
    p = next(q for q in model.parameters() if base_opt.state.get(q))
    old = [v for v in base_opt.state[p].values() if isinstance(v, torch.Tensor)]
    base_opt.state[p] = {}
    run_steps(name, model, opt, batches(3)[1:])
    new = base_opt.state[p]
    assert new, f"{name}: the reset state of a parameter was not rebuilt"
    assert not any(v is t for v in new.values() for t in old)


def test_group_added_through_the_base_gets_the_class_settings(name):
    """``opt.base_optimizer.add_param_group`` knows only the base's defaults: the class's own
    (rho, ...) are filled in by the next step, as ``opt.add_param_group`` fills them."""
    model = Net()
    opt = build(name, "sgd", model)
    base_opt = getattr(opt, "base_optimizer", None)
    if base_opt is None:
        pytest.skip(f"{name} has no base optimizer")
    extra = nn.Parameter(torch.zeros(2))
    base_opt.add_param_group({"params": [extra]})
    run_steps(name, model, opt, batches(2))
    group = opt.param_groups[-1]
    missing = {k for k in opt._own_keys if k not in group}
    assert not missing, f"{name}: {sorted(missing)} not filled in"
    assert all(group[k] == opt.defaults[k] for k in opt._own_keys)


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_complex_parameters_refused(name):
    """A complex parameter is refused with an error naming it: at construction, in
    ``add_param_group`` (the groups stay as they were) and at the first step after the model
    was made complex, before anything is written. (The fused norm read a complex gradient as
    its real parts, with only a cast warning, and the base step then failed half way.)"""
    cls = opt_class(name)
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\].*complex"):
        cls([nn.Parameter(torch.randn(2)), z], torch.optim.SGD, lr=0.1)
    model = Net()
    opt = build(name, "sgd", model)
    n_groups = len(opt.param_groups)
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == n_groups
    run_steps(name, model, opt, batches(2))
    model.to(torch.complex64)  # the parameters' data swapped for complex tensors in place
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)

    def closure():
        raise AssertionError("the closure ran before the parameters were checked")

    with pytest.raises(TypeError, match="complex"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _remove(params: list, p: torch.Tensor) -> None:
    params.pop(next(i for i, q in enumerate(params) if q is p))  # by identity, not ==


def test_a_parameter_without_gradient_removed_in_place(name):
    """A parameter that never has a gradient, removed from its group's list in place mid-run,
    changes nothing: the run equals one that never had it. (ESAM's coins and FriendlySAM's
    first-step flags are by place among all parameters: FriendlySAM kept the old places.)"""
    if name in ("ESAM", "RSAM"):
        pytest.skip(
            f"{name} draws by place, or for every parameter that requires grad: a run without "
            "the parameter draws other noise from the start (ESAM: tests/optim/test_esam.py)"
        )
    runs = []
    for removed_at_start in (False, True):
        torch.manual_seed(3)
        model = Net()
        groups = model.groups()
        if removed_at_start:
            _remove(groups[0]["params"], model.unused)
        opt = opt_class(name)(
            groups, BASES["sgd"][0], model=model, **SPECS[name][2], **BASES["sgd"][1]
        )
        for s, (x, y) in enumerate(batches(6)):
            if s == 2 and not removed_at_start:
                _remove(opt.param_groups[0]["params"], model.unused)
            torch.manual_seed(100 + s)  # the global stream of the noise classes
            opt.zero_grad()
            opt.step(make_closure(name, model, x, y))
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(p, q)
