"""CR-SAM (both forms) against an independent float64 implementation of the spec's equations."""

from __future__ import annotations

import copy

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
    run_with_ref,
    spied_step,
)
from torch import nn

from python_api.crsam import CRSAM

Net = GroupedBNNet


# ---------------------------------------------------------------- the independent reference
class RefCRSAM:
    """Per-parameter float64 CR-SAM over hand-written SGD-momentum / AdamW (no sam_kernels)."""

    def __init__(self, model, rhos, alpha, beta, log_form, base, hp):
        """``alpha``, ``beta``: a number or one per group; ``base``: "sgd", "adamw" or a
        torch optimizer class (given the combined gradient in ``p.grad``)."""
        n = len(rhos)
        self.alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha] * n
        self.betas = list(beta) if isinstance(beta, (list, tuple)) else [beta] * n
        self.model, self.log_form, self.base, self.hp = model, log_form, base, hp
        self.groups = list(zip(rhos, model.group_params()))
        self.ref_base = RefBase(base, hp) if isinstance(base, str) else None
        if not isinstance(base, str):
            self.torch_opt = base([p for _, g in self.groups for p in g], **hp)

    def _eval(self, x, y, keep_bn):
        return eval_grads(self.model, self.groups, x, y, keep_bn)

    @torch.no_grad()
    def step(self, x, y):
        l0, g0 = self._eval(x, y, keep_bn=False)
        ps = [p for _, g in self.groups for p in g if p in g0]
        norm = torch.sqrt(sum((g0[p] ** 2).sum() for p in ps))
        w = {p: p.clone() for p in ps}
        e = {}
        for rho, g in self.groups:
            for p in g:
                if p in g0:
                    e[p] = rho / (norm + 1e-12) * g0[p]
        for p in ps:
            p.copy_(w[p] + e[p])
        lp, gp = self._eval(x, y, keep_bn=True)
        for p in ps:
            p.copy_(w[p] - e[p])
        lm, gm = self._eval(x, y, keep_bn=True)
        for p in ps:
            p.copy_(w[p])
        s1, s2 = (lp + lm - 2 * l0).item(), (lp - lm).item()
        final = {}
        for (_, group), alpha, beta in zip(self.groups, self.alphas, self.betas):
            a, b = alpha, beta
            if self.log_form:
                a = alpha / s1 if s1 > 1e-12 else 0.0
                b = beta / s2 if s2 > 1e-12 else 0.0
            for p in group:
                if p in g0:
                    final[p] = gp[p] + a * (gp[p] + gm[p] - 2 * g0[p]) + b * (gp[p] - gm[p])
        if not isinstance(self.base, str):
            self.model.zero_grad(set_to_none=True)
            for p, g in final.items():
                p.grad = g
            self.torch_opt.step()
        else:
            for p, g in final.items():
                self.ref_base.step(p, g)
        return l0


# ---------------------------------------------------------------- exactness vs the reference
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("log_form", [False, True])
@pytest.mark.parametrize("form", ["closure", "grads_loss", "grads_only"])
def test_crsam_matches_reference(base, log_form, form):
    torch.manual_seed(0)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    rhos, alpha, beta = (0.05, 0.2, 0.0), 0.3, 0.05
    cls, hp = BASES[base]
    opt = CRSAM(
        model.groups(rhos), cls, alpha=alpha, beta=beta, log_form=log_form, model=model, **hp
    )
    ref = RefCRSAM(ref_model, rhos, alpha, beta, log_form, base, hp)
    for step in range(STEPS):
        x, y = data(seed=step)
        got = opt_step(opt, model, x, y, form)
        want = ref.step(x, y)
        if got is not None:
            assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6, name
    for a, b in zip(bn_buffers(model), bn_buffers(ref_model)):
        assert rel_err(a.double(), b.double()) < 1e-6
    assert model.unused.grad is None and model.unused not in opt.base_optimizer.state
    assert opt.steps_taken == STEPS and opt.skipped_steps == 0
    # the curvature terms matter: plain SAM (alpha = beta = 0) ends elsewhere
    torch.manual_seed(0)
    plain = Net().double()
    sam_ref = RefCRSAM(plain, rhos, 0.0, 0.0, False, base, hp)
    for step in range(STEPS):
        sam_ref.step(*data(seed=step))
    assert rel_err(plain.w1.detach(), ref_model.w1.detach()) > 1e-4


def test_crsam_fp32_close_to_reference():
    torch.manual_seed(1)
    model = Net()
    ref_model = copy.deepcopy(model).double()
    cls, hp = BASES["sgd"]
    opt = CRSAM(model.groups(), cls, model=model, **hp)
    ref = RefCRSAM(ref_model, (0.05, 0.2, 0.0), 0.1, 0.01, False, "sgd", hp)
    run_with_ref(opt, model, ref, 5, fp32=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-5


def test_log_form_guards():
    """A log term is used only while its argument is > 1e-12 (device scalars, else 0)."""
    opt = CRSAM([nn.Parameter(torch.zeros(2, dtype=torch.float64))], torch.optim.SGD, lr=0.1)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    cases = [  # (L0, L+, L-) -> (1/(L+ + L- - 2 L0) or 0, 1/(L+ - L-) or 0)
        ((1.0, 1.2, 0.9), (1 / 0.1, 1 / 0.3)),
        ((1.0, 1.0, 1.0), (0.0, 0.0)),
        ((1.0, 0.9, 0.95), (0.0, 0.0)),
        ((1.0, 1.0 + 1e-13, 1.0), (0.0, 0.0)),
        ((1.0, 1.0 + 1e-9, 1.0), (1e9, 1e9)),
    ]
    for (l0, lp, lm), want in cases:
        got = opt._log_inverses(t(l0), t(lp), t(lm), torch.float64)
        for g, w in zip(got, want):
            assert g.dim() == 0 and g.item() == pytest.approx(w, rel=1e-6)


def test_minus_point_is_formed_from_the_saved_weights():
    """w - e is ``backup - e``, not ``(w + e) - 2e``: the two differ in fp32 here.

    w = 3, g0 = 1, rho = 2**24: w + e rounds to 2**24 + 4, so (w + e) - 2e = -(2**24 - 4),
    while w - e = -(2**24 - 3) exactly.
    """
    p = nn.Parameter(torch.tensor([3.0]))
    opt = CRSAM([p], torch.optim.SGD, rho=float(2**24), lr=0.0)
    seen = []

    def closure():
        seen.append(p.detach().clone())
        loss = p.sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert [s.item() for s in seen] == [3.0, 2.0**24 + 4, -(2.0**24) + 3]
    assert p.item() == 3.0


# ---------------------------------------------------------------- batch norm
@pytest.mark.parametrize("log_form", [False, True])
@pytest.mark.parametrize("form", ["closure", "grads_only"])
def test_bn_stats_only_updated_at_w(log_form, form):
    torch.manual_seed(3)
    model = Net().double()
    ref = copy.deepcopy(model)
    free = copy.deepcopy(model)
    x, y = data()
    opt = CRSAM(model.parameters(), torch.optim.SGD, lr=0.1, log_form=log_form, model=model)
    opt_step(opt, model, x, y, form)
    loss_fn(ref, x, y)  # one forward at w: what the statistics must show
    assert all(torch.equal(a, b) for a, b in zip(bn_buffers(model), bn_buffers(ref)))
    assert model.bn.momentum == 0.1 and not hasattr(model.bn, "backup_momentum")
    # without model= the perturbed evaluations do move them (the test can fail)
    opt = CRSAM(free.parameters(), torch.optim.SGD, lr=0.1, log_form=log_form)
    opt_step(opt, free, x, y, form)
    assert not torch.equal(free.bn.running_mean, ref.bn.running_mean)


# ---------------------------------------------------------------- exactness and safety
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("log_form", [False, True])
def test_exact_restore(base, log_form):
    model = Net()
    cls, hp = BASES[base]
    hp = dict(hp, lr=0.0, weight_decay=0.0)
    opt = CRSAM(model.groups((0.5, 2.0, 0.0)), cls, log_form=log_form, **hp)
    before = [p.detach().clone() for p in model.parameters()]
    for s in range(4):
        opt_step(opt, model, *data(seed=s, dtype=torch.float32), "closure")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("log_form", [False, True])
@pytest.mark.parametrize(
    "call,kind,base",
    [(1, "grad", "sgd"), (2, "loss", "adamw"), (2, "grad", "sgd"), (3, "loss", "adamw")],
)
def test_nonfinite_step_leaves_no_trace(base, log_form, call, kind):
    torch.manual_seed(4)
    cls, hp = BASES[base]
    check_skip_leaves_no_trace(
        lambda m: CRSAM(m.groups(), cls, log_form=log_form, model=m, **hp), call, kind
    )


@pytest.mark.parametrize("call,what", [(1, "w \\("), (2, "w \\+ e"), (3, "w - e")])
def test_on_nonfinite_raise(call, what):
    model = Net()
    opt = CRSAM(model.groups(), torch.optim.SGD, lr=0.1, momentum=0.9, on_nonfinite="raise")
    check_raise_leaves_no_trace(model, opt, call, what)


def test_no_host_reads_in_step():
    model = Net()
    x, y = data(dtype=torch.float32)
    for log_form in (False, True):
        for cls, hp in BASES.values():
            opt = CRSAM(model.groups(), cls, log_form=log_form, model=model, **hp)
            for form in ("closure", "grads_loss"):
                spy = spied_step(opt, model, x, y, form, SCALAR_AND_NONZERO)
                bad = spy.found
                assert not bad, bad
                assert spy.ops.count("aten._foreach_copy_") >= 2  # the spy saw the step
                assert "aten.mm" in spy.ops  # ... and the closure's own ops


def test_bad_inputs():
    model = Net()
    params = model.parameters
    for kw, name in [
        (dict(rho=-0.1), "rho"),
        (dict(alpha=-1.0), "alpha"),
        (dict(beta=-0.5), "beta"),
        (dict(rho=float("nan")), "rho"),
    ]:
        with pytest.raises(ValueError, match=name):
            CRSAM(params(), torch.optim.SGD, lr=0.1, **kw)
    with pytest.raises(ValueError, match="rho"):
        CRSAM([{"params": [model.w1], "rho": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="log_form"):
        CRSAM(params(), torch.optim.SGD, lr=0.1, log_form="yes")
    with pytest.raises(TypeError, match="base_optimizer"):
        CRSAM(params(), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="on_nonfinite"):
        CRSAM(params(), torch.optim.SGD, lr=0.1, on_nonfinite="ignore")

    x, y = data(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = CRSAM(params(), torch.optim.SGD, lr=0.1, log_form=True)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    # the paper form needs the losses: a closure returning None is refused, weights unchanged
    with pytest.raises(TypeError, match="loss value at w"):
        opt.step(lambda: loss_fn(model, x, y).backward())
    opt.zero_grad()
    l0 = bw(loss_fn(model, x, y))
    with pytest.raises(TypeError, match="loss value at w \\+ e"):
        opt.step(lambda: loss_fn(model, x, y).backward(), loss=l0)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        opt.step(lambda: bw(loss_fn(model, x, y)), loss=torch.ones(2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.steps_taken == 0 and not opt.base_optimizer.state
    # the reference form needs no loss value: a closure returning None is fine
    opt = CRSAM(params(), torch.optim.SGD, lr=0.1)
    opt.zero_grad()
    assert opt.step(lambda: loss_fn(model, x, y).backward()) is None
    assert opt.steps_taken == 1
    check_sparse_refused(CRSAM)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("log_form", [False, True])
def test_resume_bit_identical(base, log_form):
    torch.manual_seed(5)
    cls, hp = BASES[base]
    check_resume(
        lambda m: CRSAM(m.groups(), cls, log_form=log_form, model=m, **hp),
        scratch={"backup", "crsam_g0", "crsam_gplus"},
    )


@pytest.mark.parametrize("log_form", [False, True])
def test_generic_base(log_form):
    """A base the wrapper cannot fuse (RMSprop: its own step, after one host read).

    alpha and beta are not param-group keys: RMSprop's own ``alpha`` (smoothing) keeps its value.
    """
    torch.manual_seed(6)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    start = copy.deepcopy(model)
    rhos = (0.05, 0.2, 0.0)
    opt = CRSAM(
        model.groups(rhos), torch.optim.RMSprop, alpha=0.5, beta=0.3, log_form=log_form,
        model=model, lr=0.01,
    )  # fmt: skip
    assert all(g["alpha"] == 0.99 for g in opt.param_groups)  # RMSprop's default
    ref = RefCRSAM(ref_model, rhos, 0.5, 0.3, log_form, torch.optim.RMSprop, dict(lr=0.01))
    run_with_ref(opt, model, ref, 5)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6, name
    assert opt.base_optimizer.state  # RMSprop's own state was used
    assert rel_err(model.w1.detach(), start.w1.detach()) > 1e-4


def test_losses_averaged_over_ranks():
    """Under torch.distributed the paper form's three losses are all-reduced (one scalar per
    evaluation, on the device); the reference form reduces none. Both forms add one scalar
    all-reduce per step: the skip vote (every rank skips or steps together). One rank: the
    plain result."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    results = {}
    for distributed in (False, True):
        with all_reduces_counted(distributed) as calls:
            for log_form in (False, True):
                torch.manual_seed(9)
                model = Net()
                opt = CRSAM(model.groups(), torch.optim.SGD, log_form=log_form, lr=0.1)
                calls.clear()
                for s in range(2):
                    opt_step(opt, model, *data(seed=s, dtype=torch.float32), "closure")
                want = 2 * (3 * log_form + 1) if distributed else 0
                assert len(calls) == want and all(t.dim() == 0 for t in calls)
                results[distributed, log_form] = [p.detach().clone() for p in model.parameters()]
    for log_form in (False, True):
        for a, b in zip(results[False, log_form], results[True, log_form]):
            assert torch.equal(a, b)
