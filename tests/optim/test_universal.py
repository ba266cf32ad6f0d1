"""Frob-SAM, Trace-SAM and Det-SAM against an independent float64 implementation of the spec.

The reference below draws its noise like dbahri/universal_sam (per parameter with a gradient, in
parameter order, sample after sample, from the global generator), and both runs are seeded
identically before every step: agreement checks the random stream as well as the equations.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _checks import (
    check_raise_leaves_no_trace,
    check_resume,
    check_skip_leaves_no_trace,
    check_sparse_refused,
)
from _dist_setup import all_reduces_counted
from _helpers import SCALAR_AND_NONZERO, RefBase, rel_err
from _models import (
    BASES,
    STEPS,
    GroupedBNNet,
    bn_buffers,
    bw,
    data,
    eval_grads,
    loss_fn,
    opt_step,
    poisoned_closure,
    run_with_ref,
    spied_step,
)
from torch import nn

import python_api.universal as universal
from python_api._base import NonFiniteError
from python_api.universal import DetSAM, FrobSAM, TraceSAM

Net = GroupedBNNet


# per class: constructor, rho per group (one rho = 0 group), own hyper-parameters for the test
CASES = {
    "frob": (FrobSAM, (0.01, 0.02, 0.0), dict(n_samples=3, lam=0.05)),
    "trace": (TraceSAM, (0.01, 0.03, 0.0), dict(n_samples=2, lam=1.0)),
    "det": (DetSAM, (1.0, 0.5, 0.0), dict(n_samples=2, lam=1.0, half_cube_len=0.01)),
}


# ---------------------------------------------------------------- the independent reference
class RefUniversal:
    """Per-parameter float64 Frob/Trace/Det-SAM over hand-written SGD-momentum / AdamW.

    Noise as dbahri/universal_sam draws it: ``torch.normal(0, 1, size=s)`` (Frob, Trace) or
    ``(high - low) * torch.rand(*size) + low`` with ``low, high = -a, a`` (Det), per parameter
    with a gradient in each perturbed group, in order, sample after sample.
    """

    def __init__(self, model, kind, rhos, n_samples, lam, base, hp, half_cube_len=None):
        self.model, self.kind, self.n, self.lam, self.a = model, kind, n_samples, lam, half_cube_len
        self.base, self.hp = base, hp
        self.groups = list(zip(rhos, model.group_params()))
        self.ref_base = RefBase(base, hp)

    def _eval(self, x, y, keep_bn):
        return eval_grads(self.model, self.groups, x, y, keep_bn)

    def _sample(self, shape):
        if self.kind == "det":
            low, high = -self.a, self.a
            return (high - low) * torch.rand(*shape) + low
        return torch.normal(0, 1, size=shape)

    @torch.no_grad()
    def step(self, x, y):
        l0, g0 = self._eval(x, y, keep_bn=False)
        ps = [p for _, g in self.groups for p in g if p in g0]
        w = {p: p.clone() for p in ps}
        pert = [(rho, [p for p in g if p in g0]) for rho, g in self.groups if rho != 0]
        n = self.n
        cross = {p: torch.zeros_like(p) for _, g in pert for p in g}
        gsum = {p: torch.zeros_like(p) for _, g in pert for p in g}
        acc = {p: torch.zeros_like(p) for _, g in pert for p in g}
        lsum = 0.0
        xs = [0.0] * len(pert)
        for _ in range(n):
            for rho, g in pert:
                for p in g:
                    # the reference code's arithmetic: e_w = rho * s in the noise dtype (fp32)
                    p.copy_(w[p] + (rho * self._sample(tuple(p.shape))).double())
            li, gi = self._eval(x, y, keep_bn=True)
            li = li.item()
            lsum += li
            for k, (rho, g) in enumerate(pert):
                d = (li - l0.item()) / rho**2
                psi, psi_p = (
                    (math.exp(-d / 2), -math.exp(-d / 2) / 2) if self.kind == "det" else (d, 1.0)
                )
                xs[k] += psi / n
                for p in g:
                    cross[p] += li * gi[p]
                    gsum[p] += gi[p]
                    acc[p] += psi_p / n * (gi[p] - g0[p])
        for p in ps:
            p.copy_(w[p])
        final = {}
        for _, g in self.groups:
            for p in g:
                if p in g0:
                    final[p] = g0[p]  # rho = 0: not perturbed, gradient g0
        for k, (rho, g) in enumerate(pert):
            for p in g:
                if self.kind == "frob":
                    cov = cross[p] / (n - 1) - (lsum / n) * gsum[p] / (n - 1)
                    final[p] = g0[p] + self.lam / rho**2 * cov
                else:
                    phi_p = -2 / xs[k] ** 3 if self.kind == "det" else 1.0
                    final[p] = g0[p] + self.lam * phi_p * acc[p]
        for p, g in final.items():
            self.ref_base.step(p, g)
        return l0


def make_ref(name, model, base, hp, **over):
    _, rhos, own = CASES[name]
    own = dict(own, **over)
    return RefUniversal(
        model, name, rhos, own["n_samples"], own["lam"], base, hp, own.get("half_cube_len")
    )


def make_opt(name, net, base, **over):
    """The optimizer ``name`` over ``net``'s groups (``model=net`` unless overridden)."""
    cls, rhos, own = CASES[name]
    bcls, hp = BASES[base]
    kw = dict(hp, model=net, **own)
    kw.update(over)
    return cls(net.groups(rhos), bcls, **kw)


# ---------------------------------------------------------------- exactness vs the reference
@pytest.mark.parametrize(
    "name,base,form",
    [(n, b, f) for n in CASES for b in BASES for f in ("closure", "grads_loss")]
    + [("det", "sgd", "grads_only"), ("frob", "adamw", "grads_only")],
)
def test_matches_reference(name, base, form):
    torch.manual_seed(0)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    opt = make_opt(name, model, base)
    ref = make_ref(name, ref_model, base, BASES[base][1])
    for step in range(STEPS):
        x, y = data(seed=step)
        got = opt_step(opt, model, x, y, form, seed=100 + step)
        torch.manual_seed(100 + step)
        want = ref.step(x, y)
        if got is not None:
            assert got.item() == pytest.approx(want.item(), rel=1e-9)
    for (pname, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6, pname
    for a, b in zip(bn_buffers(model), bn_buffers(ref_model)):
        assert rel_err(a.double(), b.double()) < 1e-6
    assert model.unused.grad is None and model.unused not in opt.base_optimizer.state
    assert opt.steps_taken == STEPS and opt.skipped_steps == 0
    # eager: the user's generator only
    assert "noise_seed" not in opt.state_dict()["param_groups"][0]["sam_state"]
    if form == "closure" and base == "sgd":
        # the sharpness term matters: lam = 0 (plain SGD on g0) ends elsewhere
        torch.manual_seed(0)
        plain = Net().double()
        plain_ref = make_ref(name, plain, base, BASES[base][1], lam=0.0)
        for step in range(STEPS):
            torch.manual_seed(100 + step)
            plain_ref.step(*data(seed=step))
        assert rel_err(plain.w1.detach(), ref_model.w1.detach()) > 1e-4


@pytest.mark.parametrize("name", ["frob", "trace", "det"])
def test_fp32_close_to_reference(name):
    torch.manual_seed(1)
    model = Net()
    ref_model = copy.deepcopy(model).double()
    opt = make_opt(name, model, "sgd")
    ref = make_ref(name, ref_model, "sgd", BASES["sgd"][1])
    run_with_ref(opt, model, ref, 5, fp32=True, seed=100)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-4


@pytest.mark.parametrize("name", ["frob", "trace", "det"])
def test_noise_hook_reproduces_the_stream(name):
    """``step(..., noise=)`` with the values the global generator would draw: bit-identical."""
    torch.manual_seed(2)
    m1 = Net().double()
    m2 = copy.deepcopy(m1)
    o1, o2 = make_opt(name, m1, "adamw"), make_opt(name, m2, "adamw")
    n = CASES[name][2]["n_samples"]
    a = CASES[name][2].get("half_cube_len")
    pert = [p for g in o2.param_groups if g["rho"] != 0 for p in g["params"] if p is not m2.unused]
    for step in range(3):
        x, y = data(seed=step)
        opt_step(o1, m1, x, y, "grads_loss", seed=7 + step)
        torch.manual_seed(7 + step)
        if name == "det":
            noise = [[2 * a * torch.rand(p.shape) - a for p in pert] for _ in range(n)]
        else:
            noise = [[torch.normal(0.0, 1.0, size=p.shape) for p in pert] for _ in range(n)]
        torch.manual_seed(12345)  # the hook must not draw from the global generator
        opt_step(o2, m2, x, y, "grads_loss", noise=noise)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="noise"):
        opt_step(o2, m2, *data(), "grads_loss", noise=noise[:-1] if n > 1 else [[]])


def test_defaults_and_one_sample():
    """The spec's defaults, and the single-sample default runs of Trace/Det-SAM."""
    model = Net(bn=False).double()
    f = FrobSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    t = TraceSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    d = DetSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert (f.defaults["rho"], f.n_samples, f.defaults["lam"]) == (0.005, 2, 0.005)
    assert (t.defaults["rho"], t.n_samples, t.defaults["lam"]) == (0.01, 1, 1.0)
    assert (d.defaults["rho"], d.n_samples, d.defaults["lam"]) == (1.0, 1, 1.0)
    assert d.half_cube_len == 0.01
    for name in ("trace", "det"):
        torch.manual_seed(3)
        m = Net().double()
        r = copy.deepcopy(m)
        opt = make_opt(name, m, "sgd", n_samples=1)
        ref = make_ref(name, r, "sgd", BASES["sgd"][1], n_samples=1)
        run_with_ref(opt, m, ref, 3, seed=0)
        for p, q in zip(m.parameters(), r.parameters()):
            assert rel_err(p.detach(), q.detach()) < 1e-6


# ---------------------------------------------------------------- batch norm
@pytest.mark.parametrize("name", ["frob", "trace", "det"])
@pytest.mark.parametrize("form", ["closure", "grads_only"])
def test_bn_stats_only_updated_at_w(name, form):
    torch.manual_seed(3)
    model = Net().double()
    ref = copy.deepcopy(model)
    free = copy.deepcopy(model)
    x, y = data()
    opt_step(make_opt(name, model, "sgd"), model, x, y, form)
    loss_fn(ref, x, y)  # one forward at w: what the statistics must show
    assert all(torch.equal(a, b) for a, b in zip(bn_buffers(model), bn_buffers(ref)))
    assert model.bn.momentum == 0.1 and not hasattr(model.bn, "backup_momentum")
    # without model= the noisy evaluations do move them (the test can fail)
    opt = make_opt(name, free, "sgd", model=None)
    opt_step(opt, free, x, y, form)
    assert not torch.equal(free.bn.running_var, ref.bn.running_var)


# ---------------------------------------------------------------- exactness and safety
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ["frob", "trace", "det"])
def test_exact_restore(name, base):
    model = Net()
    opt = make_opt(name, model, base, lr=0.0, weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    for s in range(4):
        opt_step(opt, model, *data(seed=s, dtype=torch.float32), "closure")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["frob", "trace", "det"])
@pytest.mark.parametrize(
    "call,kind,base", [(1, "grad", "sgd"), (2, "loss", "adamw"), (3, "grad", "adamw")]
)
def test_nonfinite_step_leaves_no_trace(name, base, call, kind):
    torch.manual_seed(4)
    # the global generator is the user's: re-seeded identically, as the spec says
    check_skip_leaves_no_trace(lambda m: make_opt(name, m, base), call, kind, seeded=True)


@pytest.mark.parametrize("name", ["frob", "trace", "det"])
@pytest.mark.parametrize("call,what", [(1, "at w \\("), (2, "sample 1 of"), (3, "sample 2 of")])
def test_on_nonfinite_raise(name, call, what):
    model = Net()
    opt = make_opt(name, model, "sgd", on_nonfinite="raise")
    check_raise_leaves_no_trace(model, opt, call, what)


def test_no_host_reads_in_step():
    model = Net()
    x, y = data(dtype=torch.float32)
    for name in CASES:
        for base in BASES:
            opt = make_opt(name, model, base)
            for form in ("closure", "grads_loss"):
                spy = spied_step(opt, model, x, y, form, SCALAR_AND_NONZERO)
                bad = spy.found
                assert not bad, (name, base, bad)
                assert "aten._foreach_copy_" in spy.ops  # the spy saw the step
                assert "aten.mm" in spy.ops  # ... and the closure's own ops


def test_bad_inputs():
    model = Net()
    params = model.parameters
    sgd = torch.optim.SGD
    for cls, kw, name in [
        (FrobSAM, dict(n_samples=1), "n_samples"),
        (FrobSAM, dict(n_samples=2.0), "n_samples"),
        (TraceSAM, dict(n_samples=0), "n_samples"),
        (DetSAM, dict(n_samples=0), "n_samples"),
        (DetSAM, dict(n_samples=True), "n_samples"),
        (FrobSAM, dict(lam=-0.1), "lam"),
        (TraceSAM, dict(lam=-1.0), "lam"),
        (DetSAM, dict(half_cube_len=0.0), "half_cube_len"),
        (DetSAM, dict(half_cube_len=-1.0), "half_cube_len"),
        (DetSAM, dict(half_cube_len=float("inf")), "half_cube_len"),
        (DetSAM, dict(rho=-1.0), "rho"),
        (FrobSAM, dict(rho=-0.1), "rho"),
    ]:
        with pytest.raises(ValueError, match=name):
            cls(params(), sgd, lr=0.1, **kw)
    for cls in (FrobSAM, TraceSAM, DetSAM):
        for key in ("rho", "lam"):
            with pytest.raises(ValueError, match=key):
                cls([{"params": [model.w1], key: -1.0}], sgd, lr=0.1)
    with pytest.raises(TypeError, match="seed"):
        FrobSAM(params(), sgd, lr=0.1, seed="abc")

    x, y = data(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    for cls in (FrobSAM, TraceSAM, DetSAM):
        opt = cls(params(), sgd, lr=0.1)
        with pytest.raises(TypeError, match="closure"):
            opt.step()
        opt.zero_grad()
        bw(loss_fn(model, x, y))
        with pytest.raises(ValueError, match="loss must be a scalar"):
            opt.step(lambda: bw(loss_fn(model, x, y)), loss=torch.ones(2))
    for cls in (FrobSAM, DetSAM):
        # the noisy losses weight the gradients: a closure returning None is refused and the
        # weights are restored (here at the first noisy evaluation)
        opt = cls(params(), sgd, lr=0.1)
        opt.zero_grad()
        l0 = bw(loss_fn(model, x, y))
        with pytest.raises(TypeError, match="loss value at noisy sample 1"):
            opt.step(lambda: loss_fn(model, x, y).backward(), loss=l0)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert opt.steps_taken == 0 and not opt.base_optimizer.state
    # Trace-SAM's gradient uses no loss value: a closure returning None is fine
    opt = TraceSAM(params(), sgd, lr=0.1)
    opt.zero_grad()
    assert opt.step(lambda: loss_fn(model, x, y).backward()) is None
    assert opt.steps_taken == 1
    before = [p.detach().clone() for p in model.parameters()]
    # Det-SAM needs L0: closure-only form with a closure returning None
    opt = DetSAM(params(), sgd, lr=0.1)
    opt.zero_grad()
    with pytest.raises(TypeError, match="loss value at w"):
        opt.step(lambda: loss_fn(model, x, y).backward())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    check_sparse_refused(FrobSAM)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ["frob", "trace", "det"])
def test_resume_bit_identical(name, base):
    torch.manual_seed(5)
    check_resume(
        lambda m: make_opt(name, m, base),
        scratch={"backup", "usam_g0", "usam_a", "usam_b"},
        seeded=True,
    )


def test_counter_noise_state(monkeypatch):
    """Where a fused backend draws the noise: the optimizer's own (seed, offset) on the device.

    No fused backend runs here, so the decision is forced; the eager op ignores the counters,
    and what is checked is their bookkeeping: the offset advances on the device by the number
    of elements drawn per sample, not on a skipped or refused step, and is checkpointed.
    """
    monkeypatch.setattr(universal, "_uses_counter_noise", lambda params, backend: True)
    model = Net()
    opt = make_opt("frob", model, "sgd", seed=1234)
    drawn = (
        sum(p.numel() for g in opt.param_groups if g["rho"] != 0 for p in g["params"])
        - model.unused.numel()
    )
    n = opt.n_samples
    x, y = data(dtype=torch.float32)
    opt_step(opt, model, x, y, "closure")
    extra = opt.state_dict()["param_groups"][0]["sam_state"]
    assert extra["noise_seed"].dtype == torch.int64 and extra["noise_seed"].item() == 1234
    assert extra["noise_offset"].item() == n * drawn
    opt.zero_grad()
    opt.step(poisoned_closure(model, x, y, 2, "grad"))  # skipped: the offset stays
    assert opt._noise_offset.item() == n * drawn and opt.skipped_steps == 1
    opt.on_nonfinite = "raise"
    opt.zero_grad()
    with pytest.raises(NonFiniteError):
        opt.step(poisoned_closure(model, x, y, 3, "grad"))
    assert opt._noise_offset.item() == n * drawn
    opt_step(opt, model, x, y, "closure")
    assert opt._noise_offset.item() == 2 * n * drawn
    opt2 = make_opt("frob", Net(), "sgd")
    opt2.load_state_dict(opt.state_dict())
    assert opt2._noise_seed.item() == 1234 and opt2._noise_offset.item() == 2 * n * drawn


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_det_overflow_is_skipped(sign):
    """Det-SAM's coefficients exp(-d/2) and -2/x^3 overflow at large |d|: the step is skipped
    (weights and state unchanged, counted) instead of writing inf/NaN into the weights."""
    p = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
    c = torch.full((6,), 5.0)
    opt = DetSAM([p], torch.optim.SGD, rho=1e-3, half_cube_len=1.0, lr=0.1, momentum=0.9)
    before = p.detach().clone()

    def closure():
        loss = (p * c).sum()
        loss.backward()
        return loss

    # d = c . eps / rho = +-3e4: psi = exp(-d/2) underflows to 0 (x = 0, phi' = -inf) or
    # overflows to inf (the accumulation coefficient is inf)
    opt.step(closure, noise=[[torch.full((6,), sign)]])
    assert torch.equal(p, before) and opt.skipped_steps == 1
    st = opt.base_optimizer.state.get(p, {})  # (the fused step may create zero state)
    assert float(st.get("step", 0)) == 0 and not st.get("momentum_buffer", torch.zeros(1)).any()
    opt.zero_grad()
    opt.step(closure, noise=[[torch.full((6,), 1e-6)]])  # d = 0.03: a normal step
    assert opt.skipped_steps == 1 and opt.steps_taken == 1
    assert torch.isfinite(p).all() and not torch.equal(p, before)


def test_losses_averaged_over_ranks():
    """Under torch.distributed the losses that weight gradients are all-reduced (one scalar
    per evaluation, on the device), plus one scalar per step: the skip vote (every rank skips
    or steps together); with one rank the result equals the plain run."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    results = {}
    for distributed in (False, True):
        with all_reduces_counted(distributed) as calls:
            for name in CASES:
                torch.manual_seed(9)
                model = Net()
                opt = make_opt(name, model, "sgd")
                calls.clear()
                for s in range(2):
                    opt_step(opt, model, *data(seed=s, dtype=torch.float32), "closure", seed=s)
                n = CASES[name][2]["n_samples"]
                per_step = {"frob": n, "trace": 0, "det": n + 1}[name] + 1
                assert len(calls) == (2 * per_step if distributed else 0), name
                assert all(t.dim() == 0 for t in calls)
                results[distributed, name] = [q.detach().clone() for q in model.parameters()]
    for name in CASES:
        for a, b in zip(results[False, name], results[True, name]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["frob", "trace", "det"])
def test_fused_noise_matches_eager_given_the_same_noise(name):
    """Triton backend (the interpreter without a GPU): noise from the optimizer's own
    (seed, offset), independent of the global generator, checkpointed; fed the same values
    through the ``noise=`` hook, the eager path ends at the same weights."""
    import sam_kernels as sk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not sk.available("triton", device):
        pytest.skip("the Triton backend cannot run here")
    torch.manual_seed(8)
    m_t = Net().to(device)
    m_e = copy.deepcopy(m_t)
    m_r = copy.deepcopy(m_t)
    o_t = make_opt(name, m_t, "sgd", backend="triton", seed=77)
    o_e = make_opt(name, m_e, "sgd", backend="eager")
    o_r = make_opt(name, m_r, "sgd", backend="triton", seed=77)
    assert o_t.state_dict()["param_groups"][0]["sam_state"]["noise_seed"].item() == 77
    assert "noise_seed" not in o_e.state_dict()["param_groups"][0]["sam_state"]
    cls, rhos, own = CASES[name]
    kind = "uniform" if name == "det" else "normal"
    a = own.get("half_cube_len", 1.0)
    pert = [p for ps, r in zip(m_e.group_params(), rhos) if r != 0 for p in ps]
    pert = [p for p in pert if p is not m_e.unused]
    drawn = sum(p.numel() for p in pert)
    for step in range(3):
        x, y = (t.to(device) for t in data(seed=step, dtype=torch.float32))
        # the fused generator's values for this step: (seed, offset + i * drawn)
        noise = []
        for i in range(own["n_samples"]):
            eps = [torch.zeros_like(p) for p in pert]
            off = o_t._noise_offset + i * drawn
            sk.noise_perturb_(
                eps, [torch.empty_like(p) for p in pert], torch.ones((), device=device),
                kind=kind, half_cube_len=a, seed=o_t._noise_seed, offset=off, backend="triton",
            )  # fmt: skip
            noise.append(eps)
        torch.manual_seed(step)
        opt_step(o_t, m_t, x, y, "grads_loss")
        torch.manual_seed(1000 + step)  # the global generator does not matter
        opt_step(o_r, m_r, x, y, "grads_loss")
        opt_step(o_e, m_e, x, y, "grads_loss", noise=noise)
    assert o_t._noise_offset.item() == 3 * own["n_samples"] * drawn
    for p, q, r in zip(m_t.parameters(), m_e.parameters(), m_r.parameters()):
        assert torch.equal(p, r)
        assert rel_err(p.detach(), q.detach()) < 1e-5
