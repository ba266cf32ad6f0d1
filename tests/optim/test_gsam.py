"""GSAM against an independent float64 implementation of the reference's equations.

``RefGSAM`` re-implements juntang-zhuang/GSAM ``gsam/gsam.py`` (and its ``ProportionScheduler``)
per parameter in float64, with hand-written SGD-momentum / AdamW; it was checked against the real
reference code over 20 steps (constant and lr-proportional rho, SGD and AdamW, plain and
adaptive) in a scratch folder outside the project.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _helpers import RefBase, rel_err, same
from _models import (
    BASES,
    STEPS,
    GroupedBNNet,
    bn_buffers,
    data,
    eval_grads,
    loss_fn,
    opt_step,
    poisoned_closure,
    run_with_ref,
    snapshot,
)
from torch import nn

from python_api._base import NonFiniteError
from python_api.gsam import GSAM

Net = GroupedBNNet
EPS = 1e-12


# ---------------------------------------------------------------- the independent reference
class RefGSAM:
    """Per-parameter float64 GSAM over hand-written SGD-momentum / AdamW (no sam_kernels).

    ``rhos``: one rho per group of ``model.group_params()``; with ``rho_min``, every group's rho
    is scaled by ``rho_t / rho`` where ``rho_t`` follows the lr given to :meth:`step`.
    """

    def __init__(
        self,
        model,
        rhos,
        alpha,
        base,
        hp,
        *,
        adaptive=False,
        rho=None,
        rho_min=None,
        lr_max=None,
        lr_min=0.0,
    ):
        self.model, self.alpha, self.base, self.hp = model, alpha, base, hp
        self.adaptive = adaptive
        self.rho, self.rho_min, self.lr_max, self.lr_min = rho, rho_min, lr_max, lr_min
        self.groups = list(zip(rhos, model.group_params()))
        self.ref_base = RefBase(base, hp)

    def rho_scale(self, lr):
        if self.rho_min is None:
            return 1.0
        rho_t = self.rho_min + (self.rho - self.rho_min) * (lr - self.lr_min) / (
            self.lr_max - self.lr_min
        )
        return max(0.0, rho_t) / self.rho

    def _eval(self, x, y, keep_bn):
        return eval_grads(self.model, self.groups, x, y, keep_bn)

    @torch.no_grad()
    def step(self, x, y, lr):
        l0, g0 = self._eval(x, y, keep_bn=False)
        ps = [p for _, g in self.groups for p in g if p in g0]
        t = {p: (p.abs() if self.adaptive else torch.ones_like(p)) for p in ps}
        n0 = torch.sqrt(sum(((t[p] * g0[p]) ** 2).sum() for p in ps))
        w = {p: p.clone() for p in ps}
        s = self.rho_scale(lr)
        for rho, g in self.groups:
            for p in g:
                if p in g0:
                    p.add_(rho * s / (n0 + EPS) * t[p] ** 2 * g0[p])
        _, g1 = self._eval(x, y, keep_bn=True)
        for p in ps:
            p.copy_(w[p])
        dot = sum((g0[p] * g1[p]).sum() for p in ps)
        n1 = torch.sqrt(sum((g1[p] ** 2).sum() for p in ps))
        n0p = torch.sqrt(sum((g0[p] ** 2).sum() for p in ps))
        cos = dot / (n1 * n0p + EPS)
        for p in ps:
            vertical = g0[p] - cos * n0p * g1[p] / (n1 + EPS)
            self.ref_base.step(p, g1[p] - self.alpha * vertical, lr)
        return l0


SCHEDULES = {
    "constant": None,
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
}


# ---------------------------------------------------------------- exactness vs the reference
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_matches_reference(base, schedule, adaptive):
    torch.manual_seed(0)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    rhos, alpha = (0.05, 0.2, 0.0), 0.3
    if adaptive:
        rhos = (0.5, 1.0, 0.0)
    cls, hp = BASES[base]
    sched_kw = {} if schedule == "constant" else dict(rho_min=rhos[0] / 5, lr_min=0.0)
    opt = GSAM(
        model.groups(rhos),
        cls,
        rho=rhos[0],
        alpha=alpha,
        adaptive=adaptive,
        model=model,
        **sched_kw,
        **hp,
    )
    sched = SCHEDULES[schedule](opt) if SCHEDULES[schedule] else None
    ref = RefGSAM(
        ref_model,
        rhos,
        alpha,
        base,
        hp,
        adaptive=adaptive,
        rho=rhos[0],
        lr_max=hp["lr"],
        **sched_kw,
    )
    seen_lr = set()
    for step in range(STEPS):
        x, y = data(seed=step)
        lr = opt.param_groups[0]["lr"]
        seen_lr.add(lr)
        assert all(g["lr"] == lr for g in opt.param_groups)
        got = opt_step(opt, model, x, y, "closure" if step % 2 else "grads")
        want = ref.step(x, y, lr)
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        if sched is not None:
            sched.step()
    assert len(seen_lr) > 1 or schedule == "constant"
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6, name
    for a, b in zip(bn_buffers(model), bn_buffers(ref_model)):
        assert rel_err(a.double(), b.double()) < 1e-6
    assert model.unused.grad is None and model.unused not in opt.base_optimizer.state
    assert model.empty.numel() == 0 and not model.w2t.is_contiguous()
    assert opt.steps_taken == STEPS and opt.skipped_steps == 0
    # the decomposition matters: alpha = 0 (SAM) ends elsewhere
    torch.manual_seed(0)
    plain = Net().double()
    sam_ref = RefGSAM(plain, rhos, 0.0, base, hp, adaptive=adaptive)
    for step in range(STEPS):
        sam_ref.step(*data(seed=step), hp["lr"])
    assert rel_err(plain.w1.detach(), ref_model.w1.detach()) > 1e-4


def test_fp32_close_to_reference():
    torch.manual_seed(1)
    model = Net()
    ref_model = copy.deepcopy(model).double()
    cls, hp = BASES["sgd"]
    opt = GSAM(model.groups(), cls, alpha=0.4, model=model, **hp)
    ref = RefGSAM(ref_model, (0.05, 0.2, 0.0), 0.4, "sgd", hp)
    run_with_ref(opt, model, ref, 5, hp["lr"], fp32=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-5


def test_rho_schedule_values():
    p = nn.Parameter(torch.zeros(2))
    opt = GSAM([p], torch.optim.SGD, rho=0.6, rho_min=0.1, lr=0.2, lr_min=0.0)
    assert opt.lr_max == 0.2 and opt.rho_t() == pytest.approx(0.6)
    opt.param_groups[0]["lr"] = 0.1
    assert opt.rho_t() == pytest.approx(0.35)
    opt.param_groups[0]["lr"] = 0.0
    assert opt.rho_t() == pytest.approx(0.1)
    # below lr_min (a warm-up from 0 with lr_min > 0): clamped at 0, never negative
    opt2 = GSAM([nn.Parameter(torch.zeros(2))], torch.optim.SGD, rho=0.6, rho_min=0.1, lr=0.2)
    opt2.lr_min = 0.1
    opt2.param_groups[0]["lr"] = 0.0
    assert opt2.rho_t() == 0.0
    # the default lr_max is the initial lr an LR scheduler recorded, not the current one
    q = nn.Parameter(torch.zeros(2))
    base = torch.optim.SGD([q], lr=1.0)
    torch.optim.lr_scheduler.LambdaLR(base, lambda s: (s + 1) / 10)
    assert base.param_groups[0]["lr"] == pytest.approx(0.1)
    opt3 = GSAM(None, base, rho=0.5, rho_min=0.0)
    assert opt3.lr_max == 1.0 and opt3.rho_t() == pytest.approx(0.05)
    # constant rho without rho_min
    opt4 = GSAM([nn.Parameter(torch.zeros(2))], torch.optim.SGD, rho=0.3, lr=0.2)
    opt4.param_groups[0]["lr"] = 0.01
    assert opt4.rho_t() == 0.3


def test_zero_rho_schedule_does_not_perturb():
    """rho_t = 0 (lr at lr_min, rho_min = 0): the step is the decomposition at w itself:
    g1 = g0, so the vertical component vanishes and the step is plain SGD."""
    torch.manual_seed(2)
    model = Net().double()
    sgd_model = copy.deepcopy(model)
    opt = GSAM(model.groups(), torch.optim.SGD, rho=0.05, rho_min=0.0, lr_max=1.0, lr=0.1)
    opt.lr_min = 0.1
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1)
    for step in range(3):
        x, y = data(seed=step)
        opt_step(opt, model, x, y, "closure")
        sgd.zero_grad()
        loss_fn(sgd_model, x, y).backward()
        sgd.step()
    for p, q in zip(model.parameters(), sgd_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-9  # cos = 1 up to fp64 rounding


def test_bn_stats_only_updated_at_w():
    torch.manual_seed(3)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    opt = GSAM(model.groups(), torch.optim.SGD, model=model, lr=0.1)
    ref = RefGSAM(ref_model, (0.05, 0.2, 0.0), 0.4, "sgd", dict(momentum=0.0, weight_decay=0.0))
    run_with_ref(opt, model, ref, 3, 0.1)
    for a, b in zip(bn_buffers(model), bn_buffers(ref_model)):
        assert torch.equal(a, b) if not a.is_floating_point() else rel_err(a, b) < 1e-12
    assert model.bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_exact_restore(base):
    torch.manual_seed(4)
    model = Net()
    model.eval()
    cls, hp = BASES[base]
    opt = GSAM(
        model.groups(), cls, rho_min=0.01, lr_max=1.0, **{**hp, "lr": 0.0, "weight_decay": 0.0}
    )
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(5):
        opt_step(opt, model, *data(seed=step, dtype=torch.float32), "closure")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("call,kind", [(1, "grad"), (2, "grad"), (1, "loss"), (2, "loss")])
def test_nonfinite_step_leaves_no_trace(base, call, kind):
    torch.manual_seed(5)
    model = Net().double()
    cls, hp = BASES[base]
    opt = GSAM(model.groups(), cls, model=model, **hp)
    for step in range(2):
        opt_step(opt, model, *data(seed=step), "closure")
    snap = snapshot(model, opt)
    opt.zero_grad()
    opt.step(poisoned_closure(model, *data(seed=9), call, kind))
    after = snapshot(model, opt)
    assert same(snap[0], after[0]) and same(snap[1], after[1])
    assert opt.skipped_steps == 1 and opt.steps_taken == 2


@pytest.mark.parametrize("call,what", [(1, "w \\("), (2, "w \\+ e")])
def test_on_nonfinite_raise(call, what):
    torch.manual_seed(6)
    model = Net().double()
    opt = GSAM(model.groups(), torch.optim.SGD, model=model, on_nonfinite="raise", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with pytest.raises(NonFiniteError, match=what):
        opt.step(poisoned_closure(model, *data(seed=0), call, "grad"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_inputs():
    ps = lambda: [nn.Parameter(torch.zeros(2))]  # noqa: E731
    sgd = torch.optim.SGD
    with pytest.raises(ValueError, match="rho"):
        GSAM(ps(), sgd, rho=-0.1, lr=0.1)
    for a in (-0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="alpha"):
            GSAM(ps(), sgd, alpha=a, lr=0.1)
    for rm in (-0.01, 0.1, float("nan")):  # rho_min in [0, rho]
        with pytest.raises(ValueError, match="rho_min"):
            GSAM(ps(), sgd, rho=0.05, rho_min=rm, lr=0.1)
    for lm in (0.1, 0.05, float("inf")):  # lr_max > lr_min
        with pytest.raises(ValueError, match="lr_max"):
            GSAM(ps(), sgd, rho=0.05, rho_min=0.01, lr_max=lm, lr_min=0.1, lr=0.1)
    with pytest.raises(ValueError, match="lr_max"):  # the default lr_max (the lr) <= lr_min
        GSAM(ps(), sgd, rho=0.05, rho_min=0.01, lr_min=0.1, lr=0.1)
    with pytest.raises(ValueError, match="lr_min"):
        GSAM(ps(), sgd, rho=0.05, rho_min=0.01, lr_min=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="lr_max"):  # a schedule bound without a schedule
        GSAM(ps(), sgd, lr_max=1.0, lr=0.1)
    with pytest.raises(TypeError, match="adaptive"):
        GSAM(ps(), sgd, adaptive="yes", lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        GSAM([{"params": ps(), "rho": -1.0}], sgd, lr=0.1)
    # attributes changed after construction are checked at the step, before anything runs
    p = nn.Parameter(torch.ones(2))
    opt = GSAM([p], sgd, lr=0.1)
    opt.alpha = 2.0
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="alpha"):
        opt.step(lambda: None)
    assert torch.equal(p, torch.ones(2))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_bit_identical(base):
    torch.manual_seed(7)
    model = Net()
    cls, hp = BASES[base]
    kw = dict(rho=0.1, rho_min=0.02, model=model, **hp)
    opt = GSAM(model.groups(), cls, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    batches = [data(seed=s, dtype=torch.float32) for s in range(6)]
    for x, y in batches[:3]:
        opt_step(opt, model, x, y, "closure")
        sched.step()
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, buf)
    for x, y in batches[3:]:
        opt_step(opt, model, x, y, "closure")
        sched.step()
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    fresh = Net()
    fresh.load_state_dict(ck["m"])
    opt2 = GSAM(fresh.groups(), cls, **{**kw, "model": fresh})
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=8)
    opt2.load_state_dict(ck["o"])
    sched2.load_state_dict(ck["s"])
    assert opt2.lr_max == opt.lr_max
    for x, y in batches[3:]:
        opt_step(opt2, fresh, x, y, "closure")
        sched2.step()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert "gsam_g0" not in str(opt.state_dict()["state"])


def test_generic_base_optimizer():
    """A base other than SGD/AdamW gets the combined gradient in p.grad and its own step."""
    torch.manual_seed(8)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    hp = dict(momentum=0.9, weight_decay=5e-4)
    opt = GSAM(model.groups(), torch.optim.SGD, model=model, lr=0.1, foreach=False, **hp)
    assert opt._fused is None
    ref = RefGSAM(ref_model, (0.05, 0.2, 0.0), 0.4, "sgd", hp)
    run_with_ref(opt, model, ref, 5, 0.1)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-10


def test_refused_per_replica_and_sharded():
    assert GSAM.per_replica_safe is False and GSAM.sharded_safe is False
    assert "inner product" in GSAM._sharded_refusal
