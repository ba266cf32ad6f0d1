"""Rho schedulers (python_api.schedulers): closed-form values, training, resume, validation."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from _optim_table import Net, batches, build, make_closure
from torch import nn

from python_api import (
    GSAM,
    SAM,
    ConstantRho,
    CosineRho,
    LinearRho,
    ProportionalRho,
    RhoScheduler,
    SequentialRho,
    WarmupCosineRho,
)

STEPS = 12
#: Net.groups()'s rho under SAM's spec (rho=0.05): group 1 is excluded (rho 0)
RHOS = [0.05, 0.0, 0.02]


def sam(model=None, **kw):
    torch.manual_seed(0)
    model = model or Net()
    return model, build("SAM", "sgd", model, **kw)


def linear(s, e, n):
    return lambda t: s + (e - s) * min(t, n) / n


def cosine(n, m=0.0):
    return lambda t: m + (1 - m) * (1 + math.cos(math.pi * min(t, n) / n)) / 2


def warmup_cosine(w, n, s=0.0, m=0.0):
    def f(t):
        if t < w:
            return s + (1 - s) * t / w
        return m + (1 - m) * (1 + math.cos(math.pi * min(t - w, n - w) / (n - w))) / 2

    return f


CASES = {
    "constant": (lambda o: ConstantRho(o), lambda t: 1.0),
    "constant-factor": (
        lambda o: ConstantRho(o, factor=0.5, total_iters=4),
        lambda t: 0.5 if t < 4 else 1.0,
    ),
    "linear-warmup": (lambda o: LinearRho(o, 0.0, 1.0, 5), linear(0.0, 1.0, 5)),
    "linear-decay": (lambda o: LinearRho(o, 1.0, 0.1, 8), linear(1.0, 0.1, 8)),
    "cosine": (lambda o: CosineRho(o, T_max=7, eta_min_factor=0.2), cosine(7, 0.2)),
    "warmup-cosine": (
        lambda o: WarmupCosineRho(o, 3, 10, start_factor=0.1, eta_min_factor=0.05),
        warmup_cosine(3, 10, 0.1, 0.05),
    ),
    "sequential": (
        lambda o: SequentialRho(o, [LinearRho(o, 0.0, 1.0, 3), CosineRho(o, T_max=5)], [3]),
        warmup_cosine(3, 8),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_values_follow_the_closed_form(case):
    """Every group's rho is initial_rho * f(t) at each step; the rho=0 group stays 0."""
    make, f = CASES[case]
    _, opt = sam()
    sched = make(opt)
    for t in range(STEPS):
        want = [r * f(t) for r in RHOS]
        got = [g["rho"] for g in opt.param_groups]
        assert got == pytest.approx(want, rel=1e-12, abs=0), (case, t)
        assert sched.get_last_rho() == got and sched.last_epoch == t
        assert got[1] == 0.0 and min(got) >= 0.0
        sched.step()
    assert [g["initial_rho"] for g in opt.param_groups] == RHOS


def _train(model, opt, rhos_or_sched, name="SAM", data=None):
    """Steps over the batches; rho set by hand from a list of per-step values, or a scheduler."""
    data = data or batches(STEPS)
    for t, (x, y) in enumerate(data):
        if isinstance(rhos_or_sched, list):
            for g, r in zip(opt.param_groups, rhos_or_sched[t], strict=True):
                g["rho"] = r
        opt.zero_grad()
        opt.step(make_closure(name, model, x, y))
        if not isinstance(rhos_or_sched, list):
            rhos_or_sched.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["SAM", "CRSAM", "ASAM"])
def test_training_bit_identical_to_hand_set_rho(name):
    f = warmup_cosine(3, 10, 0.0, 0.1)
    torch.manual_seed(0)
    m1 = Net()
    m2 = copy.deepcopy(m1)
    w0 = m1.l1.weight.detach().clone()
    o1 = build(name, "sgd", m1)
    o2 = build(name, "sgd", m2)
    base = [g["rho"] for g in o1.param_groups]
    assert base[1] == 0.0
    sched = WarmupCosineRho(o1, 3, 10, eta_min_factor=0.1)
    hand = [[r * f(t) for r in base] for t in range(STEPS)]
    w1 = _train(m1, o1, sched, name)
    w2 = _train(m2, o2, hand, name)
    for a, b in zip(w1, w2, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(w1[0], w0)  # it trained


def test_state_dict_round_trip_continues_identically():
    """Stop after k steps, rebuild optimizer + both schedulers, load, continue: same run."""
    data = batches(STEPS)
    k = 5

    def make(model):
        opt = build("SAM", "sgd", model)
        lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
        rho = SequentialRho(
            opt, [LinearRho(opt, 0.0, 1.0, 3), CosineRho(opt, T_max=6, eta_min_factor=0.1)], [3]
        )
        return opt, lr, rho

    def run(model, opt, lr, rho, part):
        for x, y in part:
            opt.zero_grad()
            opt.step(make_closure("SAM", model, x, y))
            lr.step()
            rho.step()

    torch.manual_seed(0)
    m1 = Net()
    m2 = copy.deepcopy(m1)
    o1, l1, r1 = make(m1)
    run(m1, o1, l1, r1, data)

    o2, l2, r2 = make(m2)
    run(m2, o2, l2, r2, data[:k])
    ckpt = copy.deepcopy(
        {"model": m2.state_dict(), "opt": o2.state_dict(), "lr": l2.state_dict(),
         "rho": r2.state_dict()}
    )  # fmt: skip
    torch.manual_seed(1)
    m3 = Net()
    m3.load_state_dict(ckpt["model"])
    o3, l3, r3 = make(m3)  # fresh schedulers write step 0's values ...
    o3.load_state_dict(ckpt["opt"])
    l3.load_state_dict(ckpt["lr"])
    r3.load_state_dict(ckpt["rho"])  # ... which the checkpoint replaces
    assert [g["rho"] for g in o3.param_groups] == r2.get_last_rho()
    assert r3.last_epoch == k and r3.state_dict().keys() == r2.state_dict().keys()
    run(m3, o3, l3, r3, data[k:])
    for a, b in zip(m1.parameters(), m3.parameters(), strict=True):
        assert torch.equal(a, b)
    assert r3.get_last_rho() == r1.get_last_rho()
    assert [g["rho"] for g in o3.param_groups] == [g["rho"] for g in o1.param_groups]


def test_resume_by_last_epoch_needs_initial_rho():
    _, opt = sam()
    with pytest.raises(KeyError, match=r"initial_rho.*param_groups\[0\]"):
        LinearRho(opt, 0.0, 1.0, 5, last_epoch=3)
    LinearRho(opt, 0.0, 1.0, 5)  # records initial_rho
    s = LinearRho(opt, 0.0, 1.0, 5, last_epoch=3)  # as torch: the constructor steps once
    assert s.last_epoch == 4 and [g["rho"] for g in opt.param_groups] == pytest.approx(
        [r * 0.8 for r in RHOS]
    )


# ----------------------------------------------------------------- proportional to the lr
def _one_group(cls, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return model, cls(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9, **kw)


# these step only the schedulers (values, no training): torch warns about the order
NO_OPT_STEP = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


@NO_OPT_STEP
@pytest.mark.parametrize("warmup", [False, True])
def test_proportional_matches_gsam_builtin_schedule(warmup):
    """ProportionalRho + CosineAnnealingLR gives GSAM(rho_min=, lr_max=)'s rho_t per step, for
    GSAM itself (rho_min unset) and for SAM; with a warm-up lr below lr_min rho clamps at 0."""
    lr_min = 0.05 if warmup else 0.0

    def lr_sched(o):
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=0.01)
        if not warmup:
            return cos
        lin = torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, total_iters=4)
        return torch.optim.lr_scheduler.SequentialLR(o, [lin, cos], milestones=[4])

    _, ref = _one_group(GSAM, rho=0.6, alpha=0.4, rho_min=0.1, lr_min=lr_min)
    _, gs = _one_group(GSAM, rho=0.6, alpha=0.4)
    _, sm = _one_group(SAM, rho=0.6)
    lrs = [lr_sched(o) for o in (ref, gs, sm)]
    rhos = [ProportionalRho(o, rho_min=0.1, lr_min=lr_min) for o in (gs, sm)]
    zeros = 0
    for _ in range(STEPS + 3):
        want = float(ref.rho_t())
        assert want >= 0.0
        zeros += want == 0.0
        for o in (gs, sm):
            assert o.param_groups[0]["rho"] == pytest.approx(want, rel=1e-12, abs=1e-15)
        for s in lrs:
            s.step()
        for r in rhos:
            r.step()
    assert (zeros > 0) == warmup


def test_proportional_trains_as_gsam_builtin():
    """GSAM's own schedule and ProportionalRho give the same training (float rounding apart)."""
    m1, ref = _one_group(GSAM, rho=0.6, alpha=0.4, rho_min=0.1)
    m2, gs = _one_group(GSAM, rho=0.6, alpha=0.4)
    l1 = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=STEPS)
    l2 = torch.optim.lr_scheduler.CosineAnnealingLR(gs, T_max=STEPS)
    r2 = ProportionalRho(gs, rho_min=0.1)
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's scheduler-order warnings
        for _ in range(STEPS):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            for m, o in ((m1, ref), (m2, gs)):
                o.zero_grad()
                o.step(make_closure("GSAM", m, x, y))
            l1.step()
            l2.step()
            r2.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@NO_OPT_STEP
def test_proportional_per_group():
    """Each group's own lr, lr_max (its initial lr) and rho; the rho=0 group stays 0."""
    model, opt = sam()
    opt.param_groups[2]["lr"] = 0.2
    lr = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=10)
    rho = ProportionalRho(opt, rho_min=[0.01, 0.0, 0.005])
    assert rho.lr_maxs == [0.05, 0.05, 0.2]
    for t in range(STEPS):
        frac = 1.0 - min(t, 10) / 10
        want = [0.01 + 0.04 * frac, 0.0, 0.005 + 0.015 * frac]
        assert [g["rho"] for g in opt.param_groups] == pytest.approx(want, rel=1e-12, abs=1e-15)
        lr.step()
        rho.step()


# ----------------------------------------------------------------- validation
def test_refuses_non_sam_optimizers_and_groups_without_rho():
    model = Net()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    for make in (
        lambda o: ConstantRho(o),
        lambda o: CosineRho(o, 5),
        lambda o: ProportionalRho(o, rho_min=0.0),
    ):
        with pytest.raises(TypeError, match="SAM-family.*SGD"):
            make(plain)
    _, opt = sam()
    del opt.param_groups[1]["rho"]
    with pytest.raises(KeyError, match=r"param_groups\[1\] has no 'rho'"):
        LinearRho(opt)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda o: ConstantRho(o, factor=-0.5), "factor"),
        (lambda o: ConstantRho(o, total_iters=-1), "total_iters"),
        (lambda o: LinearRho(o, start_factor=float("nan")), "start_factor"),
        (lambda o: LinearRho(o, end_factor=-1.0), "end_factor"),
        (lambda o: LinearRho(o, total_iters=0), "total_iters"),
        (lambda o: CosineRho(o, T_max=0), "T_max"),
        (lambda o: CosineRho(o, T_max=3.0), "T_max"),
        (lambda o: CosineRho(o, T_max=3, eta_min_factor=-0.1), "eta_min_factor"),
        (lambda o: WarmupCosineRho(o, 5, 5), "total_iters"),
        (lambda o: WarmupCosineRho(o, -1, 5), "warmup_iters"),
        (lambda o: ProportionalRho(o, rho_min=-0.1), "rho_min"),
        (lambda o: ProportionalRho(o, rho_min=0.03), r"rho_min.*param_groups\[2\]"),
        (lambda o: ProportionalRho(o, rho_min=[0.0, 0.0]), "rho_min has 2 values for 3"),
        (lambda o: ProportionalRho(o, rho_min=0.0, lr_max=0.0), "lr_max"),
        (lambda o: ProportionalRho(o, rho_min=0.0, lr_min=0.05), "lr_max"),
        (lambda o: LinearRho(o, last_epoch=-2), "last_epoch"),
        (lambda o: SequentialRho(o, [ConstantRho(o), ConstantRho(o)], []), "milestones"),
        (lambda o: SequentialRho(o, [ConstantRho(o), ConstantRho(o)], [0]), "milestones"),
        (lambda o: SequentialRho(o, [], []), "at least one"),
    ],
)
def test_bad_arguments(make, match):
    _, opt = sam()
    with pytest.raises(ValueError, match=match):
        make(opt)


def test_sequential_refuses_lr_schedulers_and_other_optimizers():
    _, opt = sam()
    _, other = sam()
    lr = torch.optim.lr_scheduler.StepLR(opt, 3)
    with pytest.raises(TypeError, match="RhoScheduler"):
        SequentialRho(opt, [ConstantRho(opt), lr], [2])
    with pytest.raises(ValueError, match="another optimizer"):
        SequentialRho(opt, [ConstantRho(opt), ConstantRho(other)], [2])


def test_negative_initial_rho_and_added_groups():
    _, opt = sam()
    opt.param_groups[0]["initial_rho"] = -0.1
    with pytest.raises(ValueError, match=r"initial_rho"):
        ConstantRho(opt)
    model, opt = sam()
    s = CosineRho(opt, 5)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="add_param_group"):
        s.step()


def test_never_negative():
    """Closed-form factors are >= 0 and ProportionalRho clamps below lr_min."""
    _, opt = sam()
    for g in opt.param_groups:
        g["lr"] = 0.0  # below lr_min
    s = ProportionalRho(opt, rho_min=0.0, lr_max=0.1, lr_min=0.01)
    assert s.get_last_rho() == [0.0, 0.0, 0.0]
    assert all(g["rho"] == 0.0 for g in opt.param_groups)
    for make in (lambda o: LinearRho(o, 1.0, 0.0, 3), lambda o: CosineRho(o, 3)):
        _, opt = sam()
        s = make(opt)
        for _ in range(6):
            s.step()
            assert min(s.get_last_rho()) == 0.0 or min(s.get_last_rho()) > 0.0
            assert all(r >= 0.0 for r in s.get_last_rho())


def test_base_class_is_abstract_and_repr():
    _, opt = sam()
    with pytest.raises(NotImplementedError):
        RhoScheduler(opt)
    assert "LinearRho(last_epoch=0" in repr(LinearRho(opt))
