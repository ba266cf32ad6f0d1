"""AE-SAM and AE-LookSAM against an independent float64 implementation of the spec's equations."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import rel_err
from _switching_ref import (
    BASES,
    RHOS,
    RefSwitching,
    check_bn_untouched,
    check_exact_restore,
    check_host_reads,
    check_no_trace,
    check_raise_leaves_no_trace,
    check_resume,
    data,
    factory_of,
    look_project,
    look_reuse,
    make_closure,
    make_net,
    run_step,
)

from python_api.aesam import AESAM, AELookSAM

BATCHES = [data(seed=s) for s in range(20)]  # the spec: 1e-6 over 20 steps
CLASSES = {"aesam": AESAM, "aelooksam": AELookSAM}


class RefAE(RefSwitching):
    """AE-SAM's decision (statistics from 0, t from 0); ``look``: AE-LookSAM's steps."""

    def __init__(self, model, base, hp, delta, lambda1, lambda2, total_steps, look, alpha=0.7):
        super().__init__(model, base, hp, RHOS)
        self.delta, self.l1, self.l2, self.T = delta, lambda1, lambda2, total_steps
        self.look, self.alpha, self.gv = look, alpha, {}
        self.mu = self.var = 0.0

    def c(self):
        if self.T is None:
            return (self.l1 + self.l2) / 2
        if self.t >= self.T:
            return self.l1
        return (self.t / self.T) * self.l1 + (1 - self.t / self.T) * self.l2

    def decide(self, g0):
        s = sum(float((g**2).sum()) for g in g0.values())
        self.mu = self.delta * self.mu + (1 - self.delta) * s
        self.var = self.delta * self.var + (1 - self.delta) * (s - self.mu) ** 2
        return s >= self.mu + self.c() * math.sqrt(self.var)

    def after_sam(self, g0, gs):
        if self.look:
            for p in gs:
                self.gv[p] = look_project(g0[p], gs[p])

    def cheap(self, g0):
        if not self.look:
            return g0
        return {p: look_reuse(g, self.gv.get(p), self.alpha) for p, g in g0.items()}


def factory(name="aesam", base="sgd", lr=None, **kw):
    return factory_of(CLASSES[name], base, lr, **kw)


@pytest.mark.parametrize("name", ["aesam", "aelooksam"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("form", ["closure", "grads_present"])
@pytest.mark.parametrize("total_steps", [None, 6])
def test_matches_reference(name, base, form, total_steps):
    model, opt = factory(name, base, total_steps=total_steps)()
    ref_model = make_net(0)
    ref = RefAE(ref_model, base, BASES[base][1], 0.9, -1.0, 1.0, total_steps, name != "aesam")
    for x, y in BATCHES:
        got = run_step(model, opt, x, y, form)
        want = ref.step(x, y)
        assert opt.last_decision == int(ref.decisions[-1])
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        mu, var = opt.ae_stats
        assert mu == pytest.approx(ref.mu, rel=1e-6) and var == pytest.approx(ref.var, rel=1e-5)
    assert True in ref.decisions and False in ref.decisions  # both kinds of step were tested
    for (pname, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-10, pname
    n_sam = sum(ref.decisions)
    assert opt.sam_steps == n_sam and opt.cheap_steps == len(BATCHES) - n_sam
    assert opt.sam_fraction == pytest.approx(n_sam / len(BATCHES))  # %SAM
    if name == "aesam":
        assert opt.erm_steps == len(BATCHES) - n_sam
    else:
        for p, q in zip(model.parameters(), ref_model.parameters()):
            if q in ref.gv:
                assert rel_err(opt.state[p]["gv"], ref.gv[q]) < 1e-10


@pytest.mark.parametrize("lambda2,expect_sam", [(1.0, True), (4.0, False)])
def test_first_step_from_zero_statistics(lambda2, expect_sam):
    """mu = var = 0 before the first step; t = 0 so c_0 = lambda2 (total_steps given)."""
    model, opt = factory(lambda2=lambda2, total_steps=100)()
    x, y = BATCHES[0]
    calls = []
    opt.zero_grad()
    opt.step(make_closure(model, x, y, calls=calls))
    probe = make_net(0)
    loss = torch.nn.functional.cross_entropy(probe(x), y)
    grads = torch.autograd.grad(loss, list(probe.parameters()), allow_unused=True)
    s = sum(float((g**2).sum()) for g in grads if g is not None)
    mu = 0.1 * s  # by hand: 0.9 * 0 + 0.1 * s
    var = 0.1 * (s - mu) ** 2  # 0.9 * 0 + 0.1 * (0.9 s)^2
    assert (s >= mu + lambda2 * math.sqrt(var)) == expect_sam  # 0.1 + 0.285 c against 1
    assert opt.ae_stats == (pytest.approx(mu, rel=1e-6), pytest.approx(var, rel=1e-6))
    assert opt.last_decision == int(expect_sam)
    assert len(calls) == (2 if expect_sam else 1)  # an ERM step runs one forward/backward


def test_c_schedule():
    model, opt = factory(lambda1=-1.0, lambda2=2.0, total_steps=4)()
    got = []
    for x, y in BATCHES[:7]:
        got.append(float(opt.c_t()))
        run_step(model, opt, x, y)
    want = [2.0, 1.25, 0.5, -0.25, -1.0, -1.0, -1.0]  # lambda2 -> lambda1 over T, then lambda1
    assert got == pytest.approx(want, abs=1e-6)
    _, const = factory(lambda1=-1.0, lambda2=2.0)()
    assert const.c_t() == 0.5  # total_steps None: (lambda1 + lambda2) / 2


@pytest.mark.parametrize("form", ["closure", "grads_present"])
def test_erm_steps_run_one_closure_call(form):
    model, opt = factory("aelooksam")()
    for x, y in BATCHES:
        calls = []
        closure = make_closure(model, x, y, calls=calls)
        opt.zero_grad()
        if form == "grads_present":
            closure()
            calls.clear()
        opt.step(closure)
        assert len(calls) == (
            opt.last_decision if form == "grads_present" else 1 + opt.last_decision
        )


def test_aelooksam_reuse_before_any_gv_is_erm():
    """Only ERM decisions (c = 4): AE-LookSAM's steps equal AE-SAM's ERM steps bit for bit."""
    m1, o1 = factory("aelooksam", lambda1=4.0, lambda2=4.0)()
    m2, o2 = factory("aesam", lambda1=4.0, lambda2=4.0)()
    for x, y in BATCHES[:4]:
        run_step(m1, o1, x, y)
        run_step(m2, o2, x, y)
        assert o1.last_decision == o2.last_decision == 0
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert not any("gv" in st for st in o1.state.values())


@pytest.mark.parametrize("name", ["aesam", "aelooksam"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_exact_restore(name, base):
    model, opt = factory(name, base, lr=0.0, rho=0.5)()
    decisions = check_exact_restore(model, opt, BATCHES[:6])
    assert 1 in decisions and 0 in decisions


@pytest.mark.parametrize("name", ["aesam", "aelooksam"])
@pytest.mark.parametrize("poison", ["loss_w", "grad_w", "loss_w_e", "grad_w_e"])
def test_nonfinite_step_leaves_no_trace(name, poison):
    # c = -10: every step is a SAM step, so the perturbed evaluation is always reached
    lam = dict(lambda1=-10.0, lambda2=-10.0) if poison.endswith("_e") else {}
    decision = check_no_trace(factory(name, "adamw", **lam), BATCHES[:6], poison, at=3)
    assert decision == (1 if poison.endswith("_e") else -1)


def test_on_nonfinite_raise():
    model, opt = factory("aelooksam", on_nonfinite="raise", lambda1=-10.0, lambda2=-10.0)()
    run_step(model, opt, *BATCHES[0])
    cases = (("grad_w_e", "w \\+ e"), ("loss_w", "at w"), ("grad_w", "at w"))
    check_raise_leaves_no_trace(model, opt, BATCHES[1], cases)  # the state: stats included


@pytest.mark.parametrize("name", ["aesam", "aelooksam"])
@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
def test_at_most_one_host_read_per_step(name, base):
    if base == "rmsprop":
        model = make_net(0)
        opt = CLASSES[name](model.groups(), torch.optim.RMSprop, lr=0.01)
    else:
        model, opt = factory(name, base)()
    decisions = check_host_reads(model, opt, BATCHES[:6], generic=base == "rmsprop")
    assert 1 in decisions and 0 in decisions


@pytest.mark.parametrize("name", ["aesam", "aelooksam"])
def test_bn_stats_untouched_by_perturbed_evaluations(name):
    model, opt = factory(name, model="bn")()
    assert 1 in check_bn_untouched(model, opt, BATCHES[:3])


@pytest.mark.parametrize("name", ["aesam", "aelooksam"])
def test_resume_bit_identical(name):
    check_resume(factory(name, "adamw", total_steps=8), BATCHES, stop=4)


def test_bad_inputs():
    model = make_net(0)
    sgd = torch.optim.SGD
    for cls in (AESAM, AELookSAM):
        for kw, arg in [
            (dict(delta=1.0), "delta"),
            (dict(delta=-0.1), "delta"),
            (dict(total_steps=0), "total_steps"),
            (dict(total_steps=-3), "total_steps"),
            (dict(total_steps=2.5), "total_steps"),
            (dict(lambda1=float("nan")), "lambda1"),
            (dict(lambda2="1"), "lambda2"),
            (dict(rho=-0.1), "rho"),
        ]:
            with pytest.raises(ValueError, match=arg):
                cls(model.parameters(), sgd, lr=0.1, **kw)
    with pytest.raises(ValueError, match="alpha"):
        AELookSAM(model.parameters(), sgd, lr=0.1, alpha=-1.0)
    opt = AESAM(model.parameters(), sgd, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
