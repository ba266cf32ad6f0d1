"""R-SAM against an independent float64 implementation of the spec's update.

The reference code (RSAM-Optimizer/R-SAM ``vit_jax/train.py``) is JAX and not runnable today, so
``RefRSAM`` re-implements the formula of the spec (``ALGORITHMS.md``, "R-SAM"), per parameter in
float64, with hand-written SGD-momentum / AdamW. The noise is replayed: on the eager CPU path the
class draws ``torch.randn(p.shape)`` per parameter that requires grad in a perturbed group, in
parameter order, from the global generator; the reference draws the same after the same
``torch.manual_seed``.
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
    closure_for,
    data,
    eval_grads,
    loss_fn,
    poisoned_closure,
    run_with_ref,
    snapshot,
    spied_step,
)
from torch import nn

from python_api._base import NonFiniteError
from python_api.rsam import RSAM
from python_api.sam import SAM

Net = GroupedBNNet
EPS = 1e-12
RHOS = (0.05, 0.2, 0.0)
SIGMAS = (0.02, 0.05, 0.03)


def noise_scale(w):
    """The spec's ``s_p``: per-output-unit norm (all dims but 0) for ndim > 1; ||p|| + 1e-16."""
    if w.dim() > 1:
        s = (w**2).sum(dim=tuple(range(1, w.dim()))).sqrt()
        return s.reshape(-1, *([1] * (w.dim() - 1)))
    return w.norm() + 1e-16


# ---------------------------------------------------------------- the independent reference
class RefRSAM:
    """Per-parameter float64 R-SAM over hand-written SGD-momentum / AdamW (no sam_kernels).

    ``rhos``/``sigmas``: one per group of ``model.group_params()``. ``clip``:
    ``torch.nn.utils.clip_grad_norm_``'s rule applied by hand to ``g1``.
    """

    def __init__(self, model, rhos, sigmas, base, hp, *, clip=None):
        self.model, self.base, self.hp, self.clip = model, base, hp, clip
        self.groups = list(zip(rhos, sigmas, model.group_params()))
        self.ref_base = RefBase(base, hp)

    @torch.no_grad()
    def step(self, x, y, lr, user_forward=False):
        """``user_forward``: the user ran a forward at ``w`` first (it updates BN; the
        evaluation at ``w + delta`` then leaves BN as it is)."""
        groups = [(rho, g) for rho, _, g in self.groups]
        if user_forward:
            eval_grads(self.model, groups, x, y, keep_bn=False)
        w = {p: p.clone() for _, _, g in self.groups for p in g}
        delta = {}
        for rho, sigma, g in self.groups:
            if rho == 0.0:
                continue
            for p in g:  # torch.randn(p.shape) per parameter, in order, from the global generator
                z = torch.randn(p.shape).double()
                delta[p] = sigma * z * noise_scale(p)
        for p, d in delta.items():
            p.add_(d)
        l_d, g_d = eval_grads(self.model, groups, x, y, keep_bn=user_forward)
        for p in w:
            p.copy_(w[p])
        ps = [p for _, g in groups for p in g if p in g_d]
        u = {p: 2 * g_d[p] + (delta[p] if p in delta else 0.0) for p in ps}
        n = torch.sqrt(sum((u[p] ** 2).sum() for p in ps))
        for rho, g in groups:
            for p in g:
                if p in g_d:
                    p.add_(rho / (n + EPS) * u[p])
        _, g1 = eval_grads(self.model, groups, x, y, keep_bn=True)
        for p in ps:
            p.copy_(w[p])
        g1 = clip_grads(g1, ps, self.clip)
        for p in ps:
            self.ref_base.step(p, g1[p], lr)
        return l_d


def opt_step(opt, model, x, y, form="closure"):
    opt.zero_grad()
    closure = closure_for(model, x, y)
    if form == "grads":
        closure()  # a backward at w before the step: R-SAM drops those gradients
    return opt.step(closure)


def groups_of(model, rhos=RHOS, sigmas=SIGMAS):
    return [
        {"params": ps, "rho": r, "sigma": s} for ps, r, s in zip(model.group_params(), rhos, sigmas)
    ]


# ---------------------------------------------------------------- exactness vs the spec
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_rsam_matches_reference(base):
    torch.manual_seed(0)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    cls, hp = BASES[base]
    opt = RSAM(groups_of(model), cls, model=model, **hp)
    ref = RefRSAM(ref_model, RHOS, SIGMAS, base, hp)
    for step in range(STEPS):
        x, y = data(seed=step)
        torch.manual_seed(1000 + step)
        form = "grads" if step % 2 else "closure"
        got = opt_step(opt, model, x, y, form)
        torch.manual_seed(1000 + step)
        want = ref.step(x, y, hp["lr"], user_forward=form == "grads")
        assert got.item() == pytest.approx(want.item(), rel=1e-12)  # the loss at w + delta
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6, name
    for a, b in zip(bn_buffers(model), bn_buffers(ref_model)):
        assert rel_err(a.double(), b.double()) < 1e-6
    assert model.bn.num_batches_tracked.item() == STEPS  # one BN update per step
    assert model.unused.grad is None and model.unused not in opt.base_optimizer.state
    assert model.empty.numel() == 0 and not model.w2t.is_contiguous()
    assert opt.steps_taken == STEPS and opt.skipped_steps == 0
    # the noise matters: other draws end elsewhere
    torch.manual_seed(0)
    other = Net().double()
    other_ref = RefRSAM(other, RHOS, SIGMAS, base, hp)
    for step in range(STEPS):
        torch.manual_seed(5000 + step)
        other_ref.step(*data(seed=step), hp["lr"])
    assert rel_err(other.w1.detach(), ref_model.w1.detach()) > 1e-6


def test_noise_is_the_documented_stream():
    """The weights of the first evaluation are ``w + sigma * randn(p.shape) * s_p``, drawn per
    parameter that requires grad in a perturbed group, in parameter order."""
    torch.manual_seed(1)
    model = Net().double()
    w = {p: p.detach().clone() for p in model.parameters()}
    opt = RSAM(groups_of(model), torch.optim.SGD, model=model, lr=0.1)
    seen = []
    x, y = data(seed=0)

    def closure():
        if not seen:
            seen.append({p: p.detach().clone() for p in model.parameters()})
        return closure_for(model, x, y)()

    torch.manual_seed(7)
    opt.step(closure)
    torch.manual_seed(7)
    expected = {}
    for ps, rho, sigma in zip(model.group_params(), RHOS, SIGMAS):
        for p in ps:
            if rho:
                expected[p] = w[p] + sigma * torch.randn(p.shape).double() * noise_scale(w[p])
            else:
                expected[p] = w[p]
    for p in model.parameters():
        assert rel_err(seen[0][p], expected[p]) < 1e-15
    assert not torch.equal(seen[0][model.w1], w[model.w1])
    assert torch.equal(seen[0][model.b2], w[model.b2])  # rho = 0: no noise


def test_sigma_zero_is_sam():
    """sigma = 0: delta = 0, u = 2 g(w), so e is SAM's (the factor 2 cancels in the norm)."""
    torch.manual_seed(2)
    model = Net().double()
    sam_model = copy.deepcopy(model)
    cls, hp = BASES["sgd"]
    opt = RSAM(model.groups(), cls, sigma=0.0, model=model, **hp)
    sam = SAM(sam_model.groups(), cls, model=sam_model, **hp)
    for step in range(5):
        x, y = data(seed=step)
        opt_step(opt, model, x, y)
        opt_step(sam, sam_model, x, y)
    for p, q in zip(model.parameters(), sam_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-12


def test_fp32_close_to_reference():
    torch.manual_seed(3)
    model = Net()
    ref_model = copy.deepcopy(model).double()
    cls, hp = BASES["sgd"]
    opt = RSAM(groups_of(model), cls, model=model, **hp)
    ref = RefRSAM(ref_model, RHOS, SIGMAS, "sgd", hp)
    run_with_ref(opt, model, ref, 5, hp["lr"], fp32=True, seed=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-5


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_clipping_matches_clip_grad_norm_rule(base):
    torch.manual_seed(4)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    unclipped = copy.deepcopy(model)
    cls, hp = BASES[base]
    clip = 0.05
    opt = RSAM(groups_of(model), cls, model=model, max_grad_norm=clip, **hp)
    plain = RSAM(groups_of(unclipped), cls, model=unclipped, **hp)
    ref = RefRSAM(ref_model, RHOS, SIGMAS, base, hp, clip=clip)
    for step in range(STEPS):
        x, y = data(seed=step)
        for o, m in ((opt, model), (plain, unclipped)):
            torch.manual_seed(step)
            opt_step(o, m, x, y)
        torch.manual_seed(step)
        ref.step(x, y, hp["lr"])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6
    assert rel_err(model.w1.detach(), unclipped.w1.detach()) > 1e-4  # the bound clipped


def test_clipped_gradient_equals_clip_grad_norm_applied_by_hand():
    torch.manual_seed(5)
    model = Net().double()
    opt = RSAM(
        groups_of(model), recording(torch.optim.SGD), model=model, max_grad_norm=0.05, lr=0.1
    )
    for step in range(4):
        x, y = data(seed=step)
        twin_model, twin = unclipped_twin(model, opt)
        torch.manual_seed(step)
        opt_step(twin, twin_model, x, y)
        torch.manual_seed(step)
        opt_step(opt, model, x, y)
        clipped, total = clip_by_hand(twin.base_optimizer.seen[0], 0.05)
        assert total > 0.05
        for got, want in zip(opt.base_optimizer.seen[0], clipped):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_exact_restore(base):
    torch.manual_seed(6)
    model = Net()
    model.eval()
    cls, hp = BASES[base]
    opt = RSAM(groups_of(model), cls, rho=0.3, **{**hp, "lr": 0.0, "weight_decay": 0.0})
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(5):
        opt_step(opt, model, *data(seed=step, dtype=torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.steps_taken == 5


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("call,kind", [(1, "grad"), (2, "grad"), (1, "loss"), (2, "loss")])
def test_nonfinite_step_leaves_no_trace(base, call, kind):
    torch.manual_seed(7)
    model = Net().double()
    cls, hp = BASES[base]
    opt = RSAM(groups_of(model), cls, model=model, **hp)
    for step in range(2):
        opt_step(opt, model, *data(seed=step))
    snap = snapshot(model, opt)
    bn = [b.clone() for b in bn_buffers(model)]
    opt.zero_grad()
    opt.step(poisoned_closure(model, *data(seed=9), call, kind))
    after = snapshot(model, opt)
    assert same(snap[0], after[0]) and same(snap[1], after[1])
    # BN: one update (the evaluation at w + delta; the one at w + e leaves it)
    assert model.bn.num_batches_tracked.item() == 3
    assert not torch.equal(bn[0], model.bn.running_mean)
    assert opt.skipped_steps == 1 and opt.steps_taken == 2


@pytest.mark.parametrize("call,what", [(1, "w \\+ delta"), (2, "w \\+ e")])
def test_on_nonfinite_raise(call, what):
    torch.manual_seed(8)
    model = Net().double()
    opt = RSAM(groups_of(model), torch.optim.SGD, model=model, on_nonfinite="raise", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with pytest.raises(NonFiniteError, match=what):
        opt.step(poisoned_closure(model, *data(seed=0), call, "grad"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.steps_taken == 0


def test_closure_raising_restores_weights():
    torch.manual_seed(9)
    model = Net().double()
    opt = RSAM(groups_of(model), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return closure_for(model, *data(seed=0))()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_inputs():
    ps = lambda: [nn.Parameter(torch.zeros(2))]  # noqa: E731
    sgd = torch.optim.SGD
    for r in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="rho"):
            RSAM(ps(), sgd, rho=r, lr=0.1)
    for s in (-1e-3, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="sigma"):
            RSAM(ps(), sgd, sigma=s, lr=0.1)
    for seed in (1.5, "3", True):
        with pytest.raises(TypeError, match="seed"):
            RSAM(ps(), sgd, seed=seed, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        RSAM([{"params": ps(), "rho": -1.0}], sgd, lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        RSAM([{"params": ps(), "sigma": -1.0}], sgd, lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        RSAM(ps(), sgd, max_grad_norm=0.0, lr=0.1)
    with pytest.raises(ValueError, match="on_nonfinite"):
        RSAM(ps(), sgd, on_nonfinite="ignore", lr=0.1)
    p = nn.Parameter(torch.ones(2))
    opt = RSAM([p], sgd, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    opt.param_groups[0]["sigma"] = -1.0  # edited after construction: checked at the step
    with pytest.raises(ValueError, match="sigma"):
        opt.step(lambda: None)
    assert torch.equal(p, torch.ones(2))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_bit_identical(base):
    torch.manual_seed(10)
    model = Net()
    cls, hp = BASES[base]
    opt = RSAM(groups_of(model), cls, model=model, **hp)
    batches = [data(seed=s, dtype=torch.float32) for s in range(6)]
    for x, y in batches[:3]:
        opt_step(opt, model, x, y)
    buf = io.BytesIO()
    rng = torch.get_rng_state()  # the eager noise is the user's global stream
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    for x, y in batches[3:]:
        opt_step(opt, model, x, y)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    assert "backup" not in str(ck["o"]["state"])
    fresh = Net()
    fresh.load_state_dict(ck["m"])
    opt2 = RSAM(groups_of(fresh), cls, model=fresh, **hp)
    opt2.load_state_dict(ck["o"])
    torch.set_rng_state(rng)
    for x, y in batches[3:]:
        opt_step(opt2, fresh, x, y)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert opt2.steps_taken == 6


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_no_host_reads(base, clip):
    torch.manual_seed(11)
    model = Net()
    cls, hp = BASES[base]
    opt = RSAM(groups_of(model), cls, model=model, max_grad_norm=clip, **hp)
    for step in range(3):
        spy = spied_step(opt, model, *data(seed=step, dtype=torch.float32))
        assert len(spy.ops) > 10
        assert spy.reads == 0, f"{spy.reads} host reads in step {step}"


def test_all_groups_unperturbed_take_one_pass():
    """rho = 0 everywhere: no noise, e = 0, so g1 = g_d: one evaluation, plain SGD."""
    torch.manual_seed(12)
    model = Net().double()
    sgd_model = copy.deepcopy(model)
    opt = RSAM(model.groups((0.0, 0.0, 0.0)), torch.optim.SGD, lr=0.1)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1)
    rng = torch.get_rng_state()
    calls = []
    for step in range(3):
        x, y = data(seed=step)
        closure = closure_for(model, x, y)
        opt.zero_grad()
        opt.step(lambda closure=closure: calls.append(1) or closure())
        sgd.zero_grad()
        loss_fn(sgd_model, x, y).backward()
        sgd.step()
    assert len(calls) == 3 and torch.equal(rng, torch.get_rng_state())  # nothing drawn
    for p, q in zip(model.parameters(), sgd_model.parameters()):
        assert torch.equal(p, q)


def test_generic_base_optimizer():
    torch.manual_seed(13)
    model = Net().double()
    ref_model = copy.deepcopy(model)
    hp = dict(momentum=0.9, weight_decay=5e-4)
    opt = RSAM(groups_of(model), torch.optim.SGD, model=model, lr=0.1, foreach=False, **hp)
    assert opt._fused is None
    ref = RefRSAM(ref_model, RHOS, SIGMAS, "sgd", hp)
    run_with_ref(opt, model, ref, 5, 0.1, seed=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-10


def test_flags():
    assert RSAM.per_replica_safe is True and RSAM.sharded_safe is False
    assert "noise" in RSAM._sharded_refusal


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the counter-based noise needs CUDA")
def test_counter_noise_on_cuda_is_seeded_and_rewinds_on_skip():
    torch.manual_seed(14)
    model = Net().cuda()
    twin = copy.deepcopy(model)
    opt = RSAM(groups_of(model), torch.optim.SGD, model=model, seed=3, lr=0.1)
    opt_twin = RSAM(groups_of(twin), torch.optim.SGD, model=twin, seed=3, lr=0.1)
    assert opt._noise_seed is not None
    x, y = data(seed=0, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    offset = opt._noise_offset.clone()
    opt.zero_grad()
    opt.step(poisoned_closure(model, x, y, 2, "grad"))
    assert torch.equal(opt._noise_offset, offset) and opt.skipped_steps == 1
    for o, m in ((opt, model), (opt_twin, twin)):
        torch.manual_seed(99)  # the global generator plays no part
        opt_step(o, m, x, y)
        torch.manual_seed(98)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt._noise_offset.item() > offset.item()
