"""FriendlySAM against an independent float64 implementation of the reference's equations.

``RefFriendlySAM`` re-implements nblt/F-SAM ``utils.py::FriendlySAM`` per parameter in float64
(its first step included: ``m`` starts as a copy of a parameter's first gradient, and that step
perturbs along ``g0``), with hand-written SGD-momentum / AdamW; it was checked against the real
reference code over 20 steps (SGD and AdamW, plain and adaptive, three groups with a rho=0 one)
in a scratch folder outside the project.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _clip_ref import clip_by_hand, clip_grads, recording, unclipped_twin
from _helpers import RefBase, rel_err, same
from _models import (
    BASES,
    STEPS,
    GroupedBNNet,
    bn_buffers,
    data,
    eval_grads,
    opt_step,
    poisoned_closure,
    run_with_ref,
    snapshot,
    spied_step,
)
from torch import nn

from python_api._base import NonFiniteError
from python_api.friendly_sam import FriendlySAM

Net = GroupedBNNet
EPS = 1e-12
RHOS = (0.05, 0.2, 0.0)


# ---------------------------------------------------------------- the independent reference
class RefFriendlySAM:
    """Per-parameter float64 FriendlySAM over hand-written SGD-momentum / AdamW (no sam_kernels).

    ``rhos``: one rho per group of ``model.group_params()``; ``sigma`` and ``lmbda`` shared.
    ``clip``: ``torch.nn.utils.clip_grad_norm_`` applied by hand to ``g1`` before the base step.
    """

    def __init__(self, model, rhos, sigma, lmbda, base, hp, *, adaptive=False, clip=None):
        self.model, self.sigma, self.lmbda, self.base, self.hp = model, sigma, lmbda, base, hp
        self.adaptive, self.clip = adaptive, clip
        self.groups = list(zip(rhos, model.group_params()))
        self.ref_base = RefBase(base, hp)
        self.m = {}

    @torch.no_grad()
    def step(self, x, y, lr):
        l0, g0 = eval_grads(self.model, self.groups, x, y, keep_bn=False)
        ps = [p for _, g in self.groups for p in g if p in g0]
        d = {}
        for p in ps:
            if p not in self.m:  # the reference's first step of this parameter
                self.m[p] = g0[p].clone()
                d[p] = g0[p]
            else:
                d[p] = g0[p] - self.sigma * self.m[p]
                self.m[p] = self.lmbda * self.m[p] + (1 - self.lmbda) * g0[p]
        t = {p: (p.abs() if self.adaptive else torch.ones_like(p)) for p in ps}
        n = torch.sqrt(sum(((t[p] * d[p]) ** 2).sum() for p in ps))
        w = {p: p.clone() for p in ps}
        for rho, g in self.groups:
            for p in g:
                if p in g0:
                    p.add_(rho / (n + EPS) * t[p] ** 2 * d[p])
        _, g1 = eval_grads(self.model, self.groups, x, y, keep_bn=True)
        for p in ps:
            p.copy_(w[p])
        g1 = clip_grads(g1, ps, self.clip)
        for p in ps:
            self.ref_base.step(p, g1[p], lr)
        return l0


# ---------------------------------------------------------------- exactness vs the reference
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("sigma,lmbda", [(1.0, 0.9), (0.5, 0.6)])
def test_friendly_sam_matches_reference(base, adaptive, sigma, lmbda):
    torch.manual_seed(0)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    rhos = (0.5, 1.0, 0.0) if adaptive else RHOS
    cls, hp = BASES[base]
    opt = FriendlySAM(
        model.groups(rhos),
        cls,
        rho=rhos[0],
        sigma=sigma,
        lmbda=lmbda,
        adaptive=adaptive,
        model=model,
        **hp,
    )
    ref = RefFriendlySAM(ref_model, rhos, sigma, lmbda, base, hp, adaptive=adaptive)
    for step in range(STEPS):
        x, y = data(seed=step)
        got = opt_step(opt, model, x, y, "closure" if step % 2 else "grads")
        want = ref.step(x, y, hp["lr"])
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6, name
    # m of every parameter together (b1's gradient is ~1e-18 rounding noise under BN)
    pairs = [
        (opt.state[p]["m"], ref.m[q])
        for p, q in zip(model.parameters(), ref_model.parameters())
        if q in ref.m
    ]
    assert len(pairs) == 7  # every parameter but `unused`
    assert (
        rel_err(
            torch.cat([a.flatten() for a, _ in pairs]), torch.cat([b.flatten() for _, b in pairs])
        )
        < 1e-6
    )
    for a, b in zip(bn_buffers(model), bn_buffers(ref_model)):
        assert rel_err(a.double(), b.double()) < 1e-6
    assert model.unused.grad is None and "m" not in opt.state[model.unused]
    assert model.unused not in opt.base_optimizer.state
    assert model.empty.numel() == 0 and not model.w2t.is_contiguous()
    assert opt.steps_taken == STEPS and opt.skipped_steps == 0
    # the moving average matters: sigma = 0 (SAM) ends elsewhere
    torch.manual_seed(0)
    plain = Net().double()
    sam_ref = RefFriendlySAM(plain, rhos, 0.0, lmbda, base, hp, adaptive=adaptive)
    for step in range(STEPS):
        sam_ref.step(*data(seed=step), hp["lr"])
    assert rel_err(plain.w1.detach(), ref_model.w1.detach()) > 1e-5


def test_first_step_is_sam_and_m_is_a_copy_of_g0():
    """The reference's first step: d = g0 (plain SAM) and m = g0."""
    torch.manual_seed(1)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    opt = FriendlySAM(model.groups(), torch.optim.SGD, model=model, lr=0.1)
    x, y = data(seed=0)
    _, g0 = eval_grads(ref_model, [(0, list(ref_model.parameters()))], x, y, keep_bn=False)
    opt_step(opt, model, x, y, "closure")
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if q in g0:
            assert torch.equal(opt.state[p]["m"], g0[q])
    order = [p for g in opt.param_groups for p in g["params"]]
    assert opt._m_init.tolist() == [float(p is not model.unused) for p in order]


class JoiningNet(Net):
    """The awkward model whose ``unused`` parameter joins the loss once ``join`` is set."""

    join = False

    def forward(self, x):
        out = super().forward(x)
        if not self.join:
            return out
        shift = torch.tanh(self.unused).sum() * 0.3  # on one logit (softmax ignores a common one)
        return torch.cat([out[:, :1] + shift, out[:, 1:]], dim=1)


def test_parameter_joining_later_starts_its_own_m():
    """ "First step" is per parameter: one whose first gradient comes at a later step starts
    its m as a copy of that gradient then (the reference's per-parameter state)."""
    torch.manual_seed(2)
    model = JoiningNet().double()
    ref_model = copy.deepcopy(model)
    cls, hp = BASES["sgd"]
    opt = FriendlySAM(model.groups(), cls, model=model, **hp)
    ref = RefFriendlySAM(ref_model, RHOS, 1.0, 0.9, "sgd", hp)
    for step in range(8):
        if step == 3:
            model.join = ref_model.join = True
        x, y = data(seed=step)
        opt_step(opt, model, x, y, "closure")
        ref.step(x, y, hp["lr"])
        if step == 3:
            assert opt._m_init[2].item() == 1.0  # unused: position 2 of the parameter order
            assert rel_err(opt.state[model.unused]["m"], ref.m[ref_model.unused]) < 1e-12
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6
    assert rel_err(opt.state[model.unused]["m"], ref.m[ref_model.unused]) < 1e-6


def test_fp32_close_to_reference():
    torch.manual_seed(3)
    model = Net()
    ref_model = copy.deepcopy(model).double()
    cls, hp = BASES["sgd"]
    opt = FriendlySAM(model.groups(), cls, model=model, **hp)
    ref = RefFriendlySAM(ref_model, RHOS, 1.0, 0.9, "sgd", hp)
    run_with_ref(opt, model, ref, 5, hp["lr"], fp32=True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-5


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_clipping_is_clip_grad_norm_of_g1(base):
    """``max_grad_norm`` clips g1 as ``clip_grad_norm_`` would (the reference: by hand)."""
    torch.manual_seed(4)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    cls, hp = BASES[base]
    clip = 0.05
    opt = FriendlySAM(model.groups(), cls, model=model, max_grad_norm=clip, **hp)
    ref = RefFriendlySAM(ref_model, RHOS, 1.0, 0.9, base, hp, clip=clip)
    unclipped = copy.deepcopy(model)
    opt_plain = FriendlySAM(unclipped.groups(), cls, model=unclipped, **hp)
    for step in range(STEPS):
        x, y = data(seed=step)
        opt_step(opt, model, x, y, "closure")
        opt_step(opt_plain, unclipped, x, y, "closure")
        ref.step(x, y, hp["lr"])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6
    assert rel_err(model.w1.detach(), unclipped.w1.detach()) > 1e-4  # the bound clipped


def test_clipped_gradient_equals_clip_grad_norm_applied_by_hand():
    """Through a generic base (its own step sees p.grad): the gradient it gets is
    ``clip_grad_norm_`` of the unclipped twin's."""

    torch.manual_seed(5)
    model = Net().double()
    opt = FriendlySAM(
        model.groups(), recording(torch.optim.SGD), model=model, max_grad_norm=0.05, lr=0.1
    )
    for step in range(4):
        x, y = data(seed=step)
        twin_model, twin = unclipped_twin(model, opt)
        opt_step(twin, twin_model, x, y, "closure")
        opt_step(opt, model, x, y, "closure")
        clipped, total = clip_by_hand(twin.base_optimizer.seen[0], 0.05)
        assert total > 0.05
        for got, want in zip(opt.base_optimizer.seen[0], clipped):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


def test_bn_stats_only_updated_at_w():
    torch.manual_seed(6)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    opt = FriendlySAM(model.groups(), torch.optim.SGD, model=model, lr=0.1)
    ref = RefFriendlySAM(ref_model, RHOS, 1.0, 0.9, "sgd", dict(momentum=0.0, weight_decay=0.0))
    run_with_ref(opt, model, ref, 3, 0.1)
    for a, b in zip(bn_buffers(model), bn_buffers(ref_model)):
        assert torch.equal(a, b) if not a.is_floating_point() else rel_err(a, b) < 1e-12
    assert model.bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_exact_restore(base):
    torch.manual_seed(7)
    model = Net()
    model.eval()
    cls, hp = BASES[base]
    opt = FriendlySAM(model.groups(), cls, rho=0.3, **{**hp, "lr": 0.0, "weight_decay": 0.0})
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(5):
        opt_step(opt, model, *data(seed=step, dtype=torch.float32), "closure")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.steps_taken == 5


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("call,kind", [(1, "grad"), (2, "grad"), (1, "loss"), (2, "loss")])
@pytest.mark.parametrize("at_step", [0, 2])
def test_nonfinite_step_leaves_no_trace(base, call, kind, at_step):
    """Weights, base state, m, the first-step flags and the counters stay bit-identical; a
    skipped first step stays a first step (the next step matches a run that never saw it)."""
    torch.manual_seed(8)
    model = Net().double()
    clean = copy.deepcopy(model)
    cls, hp = BASES[base]
    opt = FriendlySAM(model.groups(), cls, model=model, **hp)
    opt_clean = FriendlySAM(clean.groups(), cls, model=clean, **hp)
    for step in range(at_step):
        opt_step(opt, model, *data(seed=step), "closure")
        opt_step(opt_clean, clean, *data(seed=step), "closure")
    snap = snapshot(model, opt)
    flags = opt._m_init.clone()
    opt.zero_grad()
    opt.step(poisoned_closure(model, *data(seed=9), call, kind))
    after = snapshot(model, opt)
    assert same(snap[0], after[0])
    if at_step:  # (a skipped very first step leaves zero-valued state entries, as every class)
        assert same(snap[1], after[1])
    assert torch.equal(flags, opt._m_init)
    assert opt.skipped_steps == 1 and opt.steps_taken == at_step
    for step in range(at_step, at_step + 3):
        opt_step(opt, model, *data(seed=step), "closure")
        opt_step(opt_clean, clean, *data(seed=step), "closure")
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("call,what", [(1, "w \\("), (2, "w \\+ e")])
def test_on_nonfinite_raise(call, what):
    torch.manual_seed(9)
    model = Net().double()
    opt = FriendlySAM(model.groups(), torch.optim.SGD, model=model, on_nonfinite="raise", lr=0.1)
    opt_step(opt, model, *data(seed=0), "closure")
    before = [p.detach().clone() for p in model.parameters()]
    m_before = {p: opt.state[p]["m"].clone() for p in model.parameters() if "m" in opt.state[p]}
    opt.zero_grad()
    with pytest.raises(NonFiniteError, match=what):
        opt.step(poisoned_closure(model, *data(seed=1), call, "grad"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(opt.state[p]["m"], m) for p, m in m_before.items())
    assert opt.steps_taken == 1


def test_bad_inputs():
    ps = lambda: [nn.Parameter(torch.zeros(2))]  # noqa: E731
    sgd = torch.optim.SGD
    for r in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="rho"):
            FriendlySAM(ps(), sgd, rho=r, lr=0.1)
    for s in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="sigma"):
            FriendlySAM(ps(), sgd, sigma=s, lr=0.1)
    for lm in (-0.1, 1.0, 1.5, float("nan"), "0.9", True):
        with pytest.raises(ValueError, match="lmbda"):
            FriendlySAM(ps(), sgd, lmbda=lm, lr=0.1)
    with pytest.raises(TypeError, match="adaptive"):
        FriendlySAM(ps(), sgd, adaptive="yes", lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        FriendlySAM([{"params": ps(), "rho": -1.0}], sgd, lr=0.1)
    with pytest.raises(ValueError, match="lmbda"):
        FriendlySAM([{"params": ps(), "lmbda": 1.0}], sgd, lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        FriendlySAM(ps(), sgd, max_grad_norm=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="on_nonfinite"):
        FriendlySAM(ps(), sgd, on_nonfinite="ignore", lr=0.1)
    # a group edited after construction is checked at the step, before anything runs
    p = nn.Parameter(torch.ones(2))
    opt = FriendlySAM([p], sgd, lr=0.1)
    opt.param_groups[0]["sigma"] = -2.0
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="sigma"):
        opt.step(lambda: None)
    assert torch.equal(p, torch.ones(2))
    opt.param_groups[0]["sigma"] = 0.5  # (the groups are checked first, at every step)
    with pytest.raises(TypeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_bit_identical(base):
    torch.manual_seed(10)
    model = Net()
    cls, hp = BASES[base]
    kw = dict(rho=0.1, sigma=0.8, lmbda=0.7, **hp)
    opt = FriendlySAM(model.groups(), cls, model=model, **kw)
    batches = [data(seed=s, dtype=torch.float32) for s in range(6)]
    for x, y in batches[:3]:
        opt_step(opt, model, x, y, "closure")
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    for x, y in batches[3:]:
        opt_step(opt, model, x, y, "closure")
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    assert "m" in ck["o"]["state"][0] and "backup" not in ck["o"]["state"][0]
    fresh = Net()
    fresh.load_state_dict(ck["m"])
    opt2 = FriendlySAM(fresh.groups(), cls, model=fresh, **kw)
    opt2.load_state_dict(ck["o"])
    for x, y in batches[3:]:
        opt_step(opt2, fresh, x, y, "closure")
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), fresh.parameters()):
        if "m" in opt.state[p]:
            assert torch.equal(opt.state[p]["m"], opt2.state[q]["m"])
    # without the algorithm's state (a plain torch checkpoint) m starts again: not the same run
    opt3 = FriendlySAM(Net().groups(), cls, **kw)
    plain = {"state": {}, "param_groups": [dict(g) for g in ck["o"]["param_groups"]]}
    plain["param_groups"][0].pop("sam_state")
    opt3.load_state_dict(plain)
    assert opt3._m_init.sum().item() == 0


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_no_host_reads(base, clip):
    torch.manual_seed(11)
    model = Net()
    cls, hp = BASES[base]
    opt = FriendlySAM(model.groups(), cls, model=model, max_grad_norm=clip, **hp)
    for step in range(3):
        spy = spied_step(opt, model, *data(seed=step, dtype=torch.float32))
        assert len(spy.ops) > 10
        assert spy.reads == 0, f"{spy.reads} host reads in step {step}"


def test_generic_base_optimizer():
    """A base other than SGD/AdamW gets g1 in p.grad and its own step (one host read)."""
    torch.manual_seed(12)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    hp = dict(momentum=0.9, weight_decay=5e-4)
    opt = FriendlySAM(model.groups(), torch.optim.SGD, model=model, lr=0.1, foreach=False, **hp)
    assert opt._fused is None
    ref = RefFriendlySAM(ref_model, RHOS, 1.0, 0.9, "sgd", hp)
    run_with_ref(opt, model, ref, 5, 0.1)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-10


def test_add_param_group_extends_the_flags():
    torch.manual_seed(13)
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(3))
    opt = FriendlySAM([a], torch.optim.SGD, lr=0.1)
    opt.add_param_group({"params": [b], "sigma": 0.5})
    assert opt._m_init.shape == (2,) and opt.param_groups[1]["lmbda"] == 0.9

    def closure():
        loss = (a * b).sum() ** 2
        loss.backward()
        return loss

    opt.step(closure)
    assert opt._m_init.tolist() == [1.0, 1.0]
    assert opt.state_dict()["param_groups"][0]["sam_state"]["m_initialized"].shape == (2,)


def test_sharded_and_per_replica_flags():
    assert FriendlySAM.sharded_safe is True and FriendlySAM.per_replica_safe is False


def test_a_parameter_added_any_way_gets_its_own_first_step_flag():
    """A parameter appended to a group's list in place, or added through the base optimizer,
    trains as one added by ``opt.add_param_group``: its moving average starts at its first
    step (the per-place flags were not extended: an IndexError at the next step)."""
    runs = []
    for mode in ("opt", "group list", "base"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
        extra = nn.Parameter(torch.zeros(3))
        groups = [{"params": [m[0].weight, m[0].bias]}, {"params": [m[2].weight, m[2].bias]}]
        opt = FriendlySAM(groups, torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05)
        g = torch.Generator().manual_seed(7)
        for step in range(6):
            x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
            if step == 3:
                if mode == "opt":
                    opt.add_param_group({"params": [extra]})
                elif mode == "group list":
                    opt.param_groups[0]["params"].append(extra)
                else:
                    opt.base_optimizer.add_param_group({"params": [extra]})

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(m(x), y) + (extra - 1).square().sum()
                loss.backward()
                return loss

            opt.step(closure)
        runs.append([p.detach().clone() for p in [*m.parameters(), extra]])
    assert not torch.equal(runs[0][-1], torch.zeros(3))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
