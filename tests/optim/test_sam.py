"""SAM and ASAM against an independent float64 implementation of davda54/sam's equations."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _checks import (
    check_sparse_refused,
)
from _helpers import SCALAR_AND_NONZERO, HostReads, RefBase, rel_err, same
from _models import BASES, GroupedBNNet, bw, data, loss_fn, opt_step
from torch import nn

from python_api import SAM, NonFiniteError, disable_running_stats, enable_running_stats

torch.set_default_dtype(torch.float32)


class Net(GroupedBNNet):
    """The shared awkward model with its three groups, without batch norm unless asked."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__(bn)


# ---------------------------------------------------------------- the independent reference
class RefSAM:
    """Per-parameter float64 SAM/ASAM over hand-written SGD-momentum or AdamW (no sam_kernels)."""

    def __init__(self, model, rhos, adaptive, eta, base, hp):
        self.model, self.adaptive, self.eta, self.base, self.hp = model, adaptive, eta, base, hp
        names = [["w1", "b1", "unused"], ["w2t", "empty"], ["b2"]]
        self.groups = [(rho, [getattr(model, n) for n in ns]) for rho, ns in zip(rhos, names)]
        self.ref_base = RefBase(base, hp)

    def _grads(self, x, y):
        self.model.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, x, y)
        loss.backward()
        return loss

    @torch.no_grad()
    def step(self, x, y):
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self._grads(x, y)
        ps = [p for _, g in self.groups for p in g if p.grad is not None]
        T = lambda p: (p.abs() + self.eta) if self.adaptive else torch.ones_like(p)  # noqa: E731
        norm = torch.sqrt(sum(((T(p) * p.grad) ** 2).sum() for p in ps))
        saved = {p: p.clone() for p in ps}
        for rho, group in self.groups:
            for p in group:
                if p.grad is not None and rho != 0:
                    p.add_(rho / (norm + 1e-12) * T(p) ** 2 * p.grad)
        with torch.enable_grad():
            self._grads(x, y)
        for p in ps:
            p.copy_(saved[p])
        for p in ps:
            self.ref_base.step(p, p.grad)
        return loss


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
@pytest.mark.parametrize("form", ["closure", "two_step", "grads_present"])
def test_sam_matches_reference(base, adaptive, eta, form):
    torch.manual_seed(0)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    rhos = (0.05, 0.2, 0.0) if not adaptive else (0.5, 1.0, 0.0)
    cls, hp = BASES[base]
    opt = SAM(model.groups(rhos), cls, adaptive=adaptive, eta=eta, **hp)
    ref = RefSAM(ref_model, rhos, adaptive, eta, base, hp)
    for step in range(20):
        x, y = data(seed=step)
        if form != "two_step":
            got = opt_step(opt, model, x, y, "grads" if form == "grads_present" else "closure")
        else:  # davda54/sam's training loop, unchanged
            opt.zero_grad()
            got = loss_fn(model, x, y)
            got.backward()
            opt.first_step(zero_grad=True)
            loss_fn(model, x, y).backward()
            opt.second_step(zero_grad=True)
        want = ref.step(x, y)
        assert got.item() == pytest.approx(want.item(), rel=1e-9)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6, name
    assert model.unused.grad is None or not opt.base_optimizer.state.get(model.unused)


def test_sam_fp32_matches_reference_loosely():
    """Same equations with fp32 parameters: agreement to fp32 rounding after 20 steps."""
    torch.manual_seed(1)
    model = Net()
    ref_model = copy.deepcopy(model).double()
    cls, hp = BASES["sgd"]
    opt = SAM(model.groups(), cls, **hp)
    ref = RefSAM(ref_model, (0.05, 0.2, 0.0), False, 0.0, "sgd", hp)
    for step in range(20):
        x, y = data(seed=step)
        opt.zero_grad()
        opt.step(lambda: bw(loss_fn(model, x.float(), y)))
        ref.step(x, y)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach().double(), q.detach()) < 1e-4


def test_base_optimizer_instance_and_generic_base():
    """An optimizer instance, and a base the wrapper cannot fuse (RMSprop: its own step)."""
    torch.manual_seed(2)
    m1 = Net().double()
    m2 = copy.deepcopy(m1)
    o1 = SAM(m1.parameters(), torch.optim.RMSprop, rho=0.1, lr=0.01)
    o2 = SAM(None, torch.optim.RMSprop(m2.parameters(), lr=0.01), rho=0.1)
    for step in range(5):
        x, y = data(seed=step)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            o.step(lambda m=m: bw(loss_fn(m, x, y)))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert o1.base_optimizer.state  # RMSprop's own state was used
    with pytest.raises(ValueError, match="params differ"):
        SAM([m1.w1], torch.optim.SGD(m2.parameters(), lr=0.1))


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
def test_group_added_through_the_base_gets_sams_settings(planned):
    """A group added with ``opt.base_optimizer.add_param_group`` (which knows only the base's
    defaults) gets SAM's rho as ``opt.add_param_group`` gives it: it was read as rho = 0 and
    its parameters silently never perturbed. From the next step on its ascent is SAM's."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    opt = SAM([a], torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    opt.plan_steps = planned
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def closure():
        for p in (a, b):
            p.grad = None
        seen.append((a.detach().clone(), b.detach().clone()))
        loss = a.square().sum() + b.square().sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    b.grad = None  # (its gradients so far were no optimizer's: none left to count as g0)
    opt.base_optimizer.add_param_group({"params": [b]})
    for _ in range(3):
        seen.clear()
        b0 = b.detach().clone()
        opt.step(closure)
        (wa, wb), (pa, pb) = seen  # the evaluations at w and at w + e
        assert torch.equal(wb, b0)
        # e = rho g / ||g||, g = 2 w over both parameters
        g = torch.cat([2 * wa, 2 * wb])
        torch.testing.assert_close(pb - wb, 0.5 * 2 * wb / (g.norm() + 1e-12))
    assert opt.param_groups[1]["rho"] == 0.5
    assert {k: opt.param_groups[1][k] for k in ("adaptive", "eta")} == {
        k: opt.defaults[k] for k in ("adaptive", "eta")
    }


def test_param_groups_shared_with_scheduler():
    model = Net()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data()
    for _ in range(2):
        opt.zero_grad()
        opt.step(lambda: bw(loss_fn(model, x.float(), y)))
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "rho": 0.3})
    assert opt.base_optimizer.param_groups[-1]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[-1]["rho"] == 0.3


# ---------------------------------------------------------------- batch norm
def test_bn_stats_only_updated_at_w():
    torch.manual_seed(3)
    model = Net(bn=True).double()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    x, y = data()
    opt.zero_grad()
    opt.step(lambda: bw(loss_fn(model, x, y)))
    loss_fn(ref, x, y)  # one forward at w: what the statistics must show
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.bn, name), getattr(ref.bn, name)), name
    assert model.bn.momentum == 0.1 and not hasattr(model.bn, "backup_momentum")


def test_davda54_bn_helpers():
    model = Net(bn=True)
    disable_running_stats(model)
    assert model.bn.momentum == 0 and model.bn.backup_momentum == 0.1
    enable_running_stats(model)
    assert model.bn.momentum == 0.1


# ---------------------------------------------------------------- exactness and safety
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_exact_restore(base):
    model = Net()
    cls, hp = BASES[base]
    hp = dict(hp, lr=0.0, weight_decay=0.0)
    opt = SAM(model.groups((0.5, 2.0, 0.0)), cls, **hp)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    for _ in range(5):
        opt.zero_grad()
        opt.step(lambda: bw(loss_fn(model, x.float(), y)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        copy.deepcopy(opt.base_optimizer.state_dict()["state"]),
    )


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("where", ["loss_w", "grad_w", "grad_w_e", "loss_w_e"])
def test_nonfinite_step_leaves_no_trace(base, where):
    torch.manual_seed(4)
    model = Net()
    clean = copy.deepcopy(model)
    cls, hp = BASES[base]
    opt = SAM(model.groups(), cls, **hp)
    opt_clean = SAM(clean.groups(), cls, **hp)
    batches = [data(seed=s) for s in range(6)]

    def run(m, o, x, y, poison=None):
        calls = []

        def closure():
            calls.append(1)
            loss = loss_fn(m, x.float(), y)
            first = len(calls) == 1
            if (
                poison in ("loss_w", "grad_w")
                and first
                or poison in ("loss_w_e", "grad_w_e")
                and not first
            ):
                if poison.startswith("loss"):
                    loss = loss + float("nan") * 0 + torch.tensor(float("nan"))
                    loss.backward()
                    return loss
                loss = loss * torch.tensor(float("inf"))
            loss.backward()
            return loss

        o.zero_grad()
        o.step(closure)

    for s in range(2):
        run(model, opt, *batches[s])
        run(clean, opt_clean, *batches[s])
    snap = _snapshot(model, opt)
    run(model, opt, *batches[2], poison=where)
    after = _snapshot(model, opt)
    assert same(snap, after), "a skipped step must change nothing"
    assert opt.skipped_steps == 1 and opt.steps_taken == 2
    for s in range(3, 6):
        run(model, opt, *batches[s])
        run(clean, opt_clean, *batches[s])
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)


def test_on_nonfinite_raise():
    model = Net()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, on_nonfinite="raise")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model, x.float(), y)
        if len(calls) == 2:
            loss = loss * float("nan")
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError, match="w \\+ e"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_no_host_reads_in_step():
    model = Net()
    x, y = data()
    for kw in (dict(), dict(adaptive=True, eta=0.01)):
        for cls, hp in BASES.values():
            opt = SAM(model.groups(), cls, **kw, **hp)
            for _ in range(2):
                opt.zero_grad()
                with HostReads(SCALAR_AND_NONZERO) as spy:
                    opt.step(lambda: bw(loss_fn(model, x.float(), y)))
                bad = spy.found
                assert not bad, bad
                assert len(spy.ops) > 10  # the spy saw the step


def test_bad_inputs():
    model = Net()
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": [model.w1], "rho": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        SAM(model.parameters(), torch.optim.SGD, adaptive=True, eta=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="on_nonfinite"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="backend"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="fast")
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    check_sparse_refused(SAM)


def test_mixed_devices_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put parameters on two devices")
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3, device="cuda"))
    opt = SAM([a, b], torch.optim.SGD, lr=0.1)
    before = a.detach().clone(), b.detach().clone()
    with pytest.raises(ValueError, match="different devices"):
        opt.step(lambda: bw(a.sum() + b.sum().cpu()))
    assert torch.equal(before[0], a) and torch.equal(before[1], b)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_bit_identical(base):
    torch.manual_seed(5)
    cls, hp = BASES[base]
    model = Net()
    opt = SAM(model.groups(), cls, **hp)
    batches = [data(seed=s) for s in range(6)]

    def step(m, o, x, y):
        o.zero_grad()
        o.step(lambda: bw(loss_fn(m, x.float(), y)))

    for s in range(3):
        step(model, opt, *batches[s])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for s in range(3, 6):
        step(model, opt, *batches[s])

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    fresh = Net()
    fresh.load_state_dict(ckpt["model"])
    opt2 = SAM(fresh.groups(), cls, **hp)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps_taken == 3
    for s in range(3, 6):
        step(fresh, opt2, *batches[s])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    # the base optimizer's state is torch's own format
    st = opt2.base_optimizer.state[fresh.w1]
    assert ("momentum_buffer" in st) if base == "sgd" else ("exp_avg_sq" in st)
