"""Gradient clipping (``max_grad_norm=``, issue 17 item 5) on every class of the optimizer table.

The gradient the base step uses (after the class's combination) is clipped as
``torch.nn.utils.clip_grad_norm_`` would clip it. That gradient is internal to a step, so it is
observed through a generic base optimizer (a subclass of ``torch.optim.SGD`` / ``AdamW``, which
the wrapper steps with its own ``step()`` after putting the gradient in ``p.grad``) that records
``p.grad`` when stepped. A clipped step and an unclipped twin (a deep copy of model and
optimizer taken before the step) run from the same state on the same batch; the clipped run's
gradient must be ``clip_grad_norm_`` of the twin's. The fused SGD/AdamW path (the coefficient
folded into the fused step) then agrees with the generic path, and a bound above every norm
changes nothing bit for bit. Under a ``torch.amp.GradScaler`` the norm is of the unscaled
gradients (the clipped gradient is ``clip_grad_norm_`` of the unscaled twin's; the scaled step
equals the unscaled one bit for bit). DDP and FSDP2: tests/integration/test_clipping_dist.py.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _clip_ref import clip_by_hand, recording, unclipped_twin
from _optim_table import (
    BASES,
    FORWARD_ONLY,
    NAMES,
    SPECS,
    Net,
    batches,
    make_closure,
    opt_class,
    run_steps,
)
from torch import nn

#: small enough that every step of every class in the table is clipped (norms are ~0.1-1)
CLIP = 0.02


RECORDING = {base: recording(cls) for base, (cls, _) in BASES.items()}


def build(name, base, model, generic=False, **extra):
    _, _, kw, _ = SPECS[name]
    cls, hp = BASES[base]
    if generic:
        cls = RECORDING[base]
    return opt_class(name)(model.groups(), cls, model=model, **{**kw, **hp, **extra})


def one_step(name, model, opt, x, y):
    opt.zero_grad()
    opt.step(make_closure(name, model, x, y))


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(float(t.abs().max()) for t in b if t.numel())
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()) / scale


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_clipped_gradient_is_clip_grad_norm_of_the_unclipped_one(name, base):
    torch.manual_seed(0)
    model = Net()
    opt = build(name, base, model, generic=True, max_grad_norm=CLIP)
    worst, compared = 0.0, 0
    for x, y in batches(5):
        twin_model, twin = unclipped_twin(model, opt)
        rng = torch.get_rng_state()
        one_step(name, twin_model, twin, x, y)
        torch.set_rng_state(rng)
        one_step(name, model, opt, x, y)
        assert len(opt.base_optimizer.seen) == len(twin.base_optimizer.seen) == 1
        want, total = clip_by_hand(twin.base_optimizer.seen[0], CLIP)
        assert total > CLIP, "the bound must clip for the test to mean anything"
        got = opt.base_optimizer.seen[0]
        got_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in got))
        assert got_norm == pytest.approx(CLIP, rel=1e-5)
        worst = max(worst, rel_err(got, want))
        compared += 1
    assert compared == 5
    assert worst < 1e-6, worst


def _fused_vs_generic(name, base, clip, dtype=torch.float32):
    """Largest parameter difference (relative to max(1, |p|)) after 5 steps, fused vs generic."""
    data = [(x.to(dtype), y) for x, y in batches(5)]
    torch.manual_seed(1)
    m_f = Net().to(dtype)
    # BN in eval mode: in train mode the bias before it has a pure-rounding-noise gradient,
    # which AdamW normalises to +-lr steps whose signs no two implementations need agree on
    m_f.bn.eval()
    m_g = copy.deepcopy(m_f)
    o_f = build(name, base, m_f, max_grad_norm=clip)
    o_g = build(name, base, m_g, generic=True, max_grad_norm=clip)
    assert o_f._fused is not None and o_g._fused is None
    torch.manual_seed(2)
    run_steps(name, m_f, o_f, data)
    torch.manual_seed(2)
    run_steps(name, m_g, o_g, data)
    return max(
        float((p - q).abs().max()) / max(1.0, float(p.abs().max()))
        for p, q in zip(m_f.parameters(), m_g.parameters())
        if p.numel()
    )


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_fused_path_equals_generic_path(name, base):
    """Clipped: the fused step (coefficient folded in) equals torch's step on the clipped
    ``p.grad`` within 1e-6 over 5 steps. CR-SAM's log form runs in float64: its coefficients
    divide by loss differences of ~1e-3, which amplifies float32 rounding to a few 1e-6 between
    any two implementations (how much depends on the CPU's vector width: torch's AVX-512 and
    AVX2 kernels round differently), so float32 could not tell a wrong clip from rounding;
    in float64 the two paths agree to ~1e-14."""
    if name == "CRSAM-log":
        err, bound = _fused_vs_generic(name, base, CLIP, torch.float64), 1e-12
    else:
        err, bound = _fused_vs_generic(name, base, CLIP), 1e-6
    assert err < bound, err


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "generic"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_a_bound_above_every_norm_changes_nothing(name, base, generic):
    data = batches(5)
    torch.manual_seed(3)
    m_a = Net()
    m_b = copy.deepcopy(m_a)
    o_a = build(name, base, m_a, generic=generic)
    o_b = build(name, base, m_b, generic=generic, max_grad_norm=1e6)
    torch.manual_seed(4)
    run_steps(name, m_a, o_a, data)
    torch.manual_seed(4)
    run_steps(name, m_b, o_b, data)
    for p, q in zip(m_a.parameters(), m_b.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(m_a.buffers(), m_b.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_with_clipping_is_bit_identical(name, base):
    data = batches(6)
    torch.manual_seed(21)
    model = Net()
    plain_model = copy.deepcopy(model)
    opt = build(name, base, model, max_grad_norm=CLIP)
    plain = build(name, base, plain_model)
    rng = torch.get_rng_state()
    run_steps(name, plain_model, plain, data[:3])
    torch.set_rng_state(rng)
    run_steps(name, model, opt, data[:3])
    sd, psd = opt.state_dict(), plain.state_dict()
    # the same entries as without clipping (max_grad_norm is configuration, not state)
    assert {i: s.keys() for i, s in sd["state"].items()} == {
        i: s.keys() for i, s in psd["state"].items()
    }
    assert [g.keys() for g in sd["param_groups"]] == [g.keys() for g in psd["param_groups"]]
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": sd, "rng": torch.get_rng_state()}, buf)
    run_steps(name, model, opt, data[3:])

    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    fresh = Net()
    fresh.load_state_dict(ck["m"])
    opt2 = build(name, base, fresh, max_grad_norm=CLIP)
    opt2.load_state_dict(ck["o"])
    torch.set_rng_state(ck["rng"])
    run_steps(name, fresh, opt2, data[3:])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_nonfinite_step_is_skipped_with_clipping(name, base):
    model = Net()
    opt = build(name, base, model, max_grad_norm=CLIP)
    run_steps(name, model, opt, batches(2))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(3)[2]

    def bad():
        if name == "ESAM":
            return nn.functional.cross_entropy(model(x), y, reduction="none") * float("nan")
        loss = nn.functional.cross_entropy(model(x), y) * float("inf")
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(bad)
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), True, "1.0"])
def test_bad_max_grad_norm(name, value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt_class(name)(Net().parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=value)


def test_every_class_takes_max_grad_norm():
    import inspect

    for n in NAMES:
        sig = inspect.signature(opt_class(n).__init__).parameters
        assert "max_grad_norm" in sig and sig["max_grad_norm"].default is None, n
        assert sig["max_grad_norm"].kind is inspect.Parameter.KEYWORD_ONLY, n


# ----------------------------------------------------------------- under a GradScaler
#: a power-of-two scale: unscaling is exact, so scaled and unscaled runs can agree bit for bit;
#: the norm of the scaled gradients would be 4096 times the unscaled one
AMP_SCALE = 2.0**12


def scaled_closure(name, model, x, y, scaler):
    """The closure under a scaler: each backward scaled (ESAM: the optimizer scales its own)."""
    if name in FORWARD_ONLY:
        return make_closure(name, model, x, y)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    return closure


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=AMP_SCALE, growth_interval=1000)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_clipping_under_grad_scaler_is_of_unscaled_gradients(name, base):
    """The gradient the base step receives under a scaler is ``clip_grad_norm_`` (by hand) of
    the gradient of an unclipped twin stepped without a scaler: the norm is the unscaled one."""
    torch.manual_seed(0)
    model = Net()
    opt = build(name, base, model, generic=True, max_grad_norm=CLIP)
    scaler = _scaler()
    worst = 0.0
    for x, y in batches(4):
        twin_model, twin = unclipped_twin(model, opt)
        rng = torch.get_rng_state()
        one_step(name, twin_model, twin, x, y)
        torch.set_rng_state(rng)
        opt.zero_grad()
        opt.step(scaled_closure(name, model, x, y, scaler), scaler=scaler)
        scaler.update()
        assert scaler.get_scale() == AMP_SCALE and opt.skipped_steps == 0
        assert len(opt.base_optimizer.seen) == len(twin.base_optimizer.seen) == 1
        want, total = clip_by_hand(twin.base_optimizer.seen[0], CLIP)
        assert total > CLIP
        got = opt.base_optimizer.seen[0]
        got_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in got))
        assert got_norm == pytest.approx(CLIP, rel=1e-5)
        worst = max(worst, rel_err(got, want))
    assert worst < 1e-6, worst


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_fused_clipped_step_under_grad_scaler_equals_the_unscaled_one(name, base):
    """Fused path, 5 clipped steps: with a scaler (every pass scaled by 2^12) the weights are
    bit for bit those of the same run without one."""
    data = batches(5)
    torch.manual_seed(5)
    m_s = Net()
    m_p = copy.deepcopy(m_s)
    o_s = build(name, base, m_s, max_grad_norm=CLIP)
    o_p = build(name, base, m_p, max_grad_norm=CLIP)
    assert o_s._fused is not None
    scaler = _scaler()
    torch.manual_seed(6)
    for x, y in data:
        o_s.zero_grad()
        o_s.step(scaled_closure(name, m_s, x, y, scaler), scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == AMP_SCALE and o_s.skipped_steps == 0
    torch.manual_seed(6)
    run_steps(name, m_p, o_p, data)
    for p, q in zip(m_s.parameters(), m_p.parameters()):
        assert torch.equal(p, q)
