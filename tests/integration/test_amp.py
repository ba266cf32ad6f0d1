"""GradScaler (``opt.step(closure, scaler=scaler)``) and bf16 with the SAM family, on the CPU.

``torch.amp.GradScaler("cpu")`` is a real scaler on the CPU (torch >= 2.3), so the whole
flow runs here: scaled backward in every pass, unscale, found-inf, skip, back-off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import HostReads, same
from _models import BASES, closure_for
from torch import nn

from python_api import SAM
from python_api.optimizer_table import BY_ID, OPTIMIZERS, classes


def make_model(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def batch(s, n=16):
    g = torch.Generator().manual_seed(100 + s)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def scaled_closure(model, x, y, scaler, poison_call=None):
    calls = []

    def closure():
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        scaled = scaler.scale(loss)
        if poison_call == len(calls):
            scaled = scaled * float("inf")  # an fp16 overflow in this pass's backward
        scaled.backward()
        return loss

    return closure


def scaled_and_plain_step(model, opt, ref, ropt, scaler, x, y):
    """``opt`` steps on ``x, y`` under ``scaler`` (then updated), ``ropt`` without one."""
    opt.step(scaled_closure(model, x, y, scaler), scaler=scaler)
    scaler.update()
    ropt.step(closure_for(ref, x, y))


def state_snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    st = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
    return params, st


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("poison_call", [1, 2])
def test_injected_inf_skips_restores_and_backs_off(base, poison_call):
    cls, hp = BASES[base]
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), cls, rho=0.05, **hp)
    ropt = SAM(ref.parameters(), cls, rho=0.05, **hp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for s in range(5):
        x, y = batch(s)
        poison = poison_call if s == 2 else None
        before = state_snapshot(model, opt)
        scale_before = scaler.get_scale()
        opt.zero_grad()
        loss = opt.step(scaled_closure(model, x, y, scaler, poison), scaler=scaler)
        scaler.update()
        assert torch.isfinite(loss)
        if poison is not None:
            assert same(state_snapshot(model, opt), before), "a skipped step must change nothing"
            assert scaler.get_scale() == scale_before * 0.5, "the scaler must back off"
            assert opt.skipped_steps == 1
        else:
            assert scaler.get_scale() == scale_before
            ropt.zero_grad()
            ropt.step(closure_for(ref, x, y))
            # power-of-two scales: unscaling is exact, so the steps are bit-identical
            for p, q in zip(model.parameters(), ref.parameters()):
                assert torch.equal(p, q)
    assert opt.steps_taken == 4


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_injected_inf_on_cuda_fp16_autocast(base):
    """On the GPU: fp16 autocast, a CUDA GradScaler, an inf in the second pass."""
    cls, hp = BASES[base]
    dev = "cuda"
    model = make_model().to(dev)
    opt = SAM(model.parameters(), cls, **hp)
    scaler = torch.amp.GradScaler(dev, init_scale=2.0**12)
    for s in range(4):
        x, y = (t.to(dev) for t in batch(s))
        with torch.autocast(dev, dtype=torch.float16):
            closure = scaled_closure(model, x, y, scaler, 2 if s == 2 else None)
        before = state_snapshot(model, opt)
        scale = scaler.get_scale()
        opt.zero_grad()

        def autocast_closure():
            with torch.autocast(dev, dtype=torch.float16):
                return closure()

        opt.step(autocast_closure, scaler=scaler)
        scaler.update()
        if s == 2:
            assert same(state_snapshot(model, opt), before)
            assert scaler.get_scale() == scale * 0.5
        else:
            assert not same(state_snapshot(model, opt)[0], before[0])
    assert opt.skipped_steps == 1 and opt.steps_taken == 3


def test_users_first_backward_is_unscaled_too():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ropt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for s in range(3):
        x, y = batch(s)
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()  # davda54's loop
        opt.step(scaled_closure(model, x, y, scaler), scaler=scaler)
        scaler.update()
        ropt.zero_grad()
        ropt.step(closure_for(ref, x, y))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_norm_uses_unscaled_gradients():
    """A scale so large that the 1e-12 guard would matter if the norm were of scaled grads."""
    model, ref = make_model(), make_model()
    with torch.no_grad():  # tiny gradients: ||g|| ~ 1e-12
        for m in (model, ref):
            m[-1].weight.mul_(1e-12)
            m[-1].bias.zero_()
            m[0].weight.mul_(1e-12)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    ropt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    scaled_and_plain_step(model, opt, ref, ropt, scaler, *batch(0))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_scaler_step_protocol_is_refused_with_the_recipe():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    closure = scaled_closure(model, x, y, scaler)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match=r"opt.step\(closure, scaler=scaler\)"):
        scaler.step(opt, closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "found_inf" not in opt.__dict__ and "grad_scale" not in opt.__dict__


def test_disabled_scaler_is_a_plain_step():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    ropt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scaled_and_plain_step(model, opt, ref, ropt, scaler, *batch(0))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_raise_mode_does_not_raise_under_a_scaler_and_missing_update_is_caught():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, on_nonfinite="raise")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = batch(0)
    opt.step(scaled_closure(model, x, y, scaler, poison_call=2), scaler=scaler)
    assert opt.skipped_steps == 1
    with pytest.raises(RuntimeError, match="scaler.update"):
        opt.step(scaled_closure(model, x, y, scaler), scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**7


def test_no_host_read_in_scaled_step():
    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(0)
    for cls, hp in BASES.values():
        opt = SAM(model.parameters(), cls, **hp)
        for _ in range(2):
            opt.zero_grad()
            closure = scaled_closure(model, x, y, scaler)
            with HostReads() as spy:
                opt.step(closure, scaler=scaler)
            scaler.update()
            assert "aten._local_scalar_dense" not in spy.ops
            assert "aten._amp_foreach_non_finite_check_and_unscale_" in spy.ops


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_bf16_autocast(base):
    """bf16 autocast inside the closure: no scaler; close to the fp32 run."""
    cls, hp = BASES[base]
    model, ref = make_model(bn=True), make_model(bn=True)
    opt = SAM(model.parameters(), cls, model=model, **hp)
    ropt = SAM(ref.parameters(), cls, model=ref, **hp)
    for s in range(3):
        x, y = batch(s)

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
        ropt.zero_grad()
        ropt.step(closure_for(ref, x, y))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_bf16_parameters(base):
    cls, hp = BASES[base]
    model = make_model().to(torch.bfloat16)
    opt = SAM(model.parameters(), cls, **hp)
    x, y = batch(0)
    x = x.to(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, x, y))
    after = [p.detach().clone() for p in model.parameters()]
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    # a non-finite second pass restores the bf16 weights bit for bit

    def bad():
        loss = nn.functional.cross_entropy(model(x), y)
        (loss * (float("inf") if bad.calls else 1.0)).backward()
        bad.calls += 1
        return loss

    bad.calls = 0
    opt.zero_grad()
    opt.step(bad)
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))


def _family():
    """The classes of the one optimizer table but SAM (tested above) and ESAM (forward-only
    closure, its own test below)."""
    keep = [o.id for o in OPTIMIZERS if o.cls != "SAM" and o.closure != "forward-only"]
    return classes([i for i in keep if not BY_ID[i].standalone])


@pytest.mark.parametrize("cls", _family(), ids=lambda c: c.__name__)
def test_family_with_scaler_matches_unscaled(cls):
    """Every algorithm: a scaled run equals the unscaled one; an inf skips and backs off."""
    model, ref = make_model(), make_model()
    kw = dict(lr=0.1, momentum=0.9)
    torch.manual_seed(5)
    opt = cls(model.parameters(), torch.optim.SGD, **kw)
    torch.manual_seed(5)
    ropt = cls(ref.parameters(), torch.optim.SGD, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for s in range(3):
        x, y = batch(s)
        torch.manual_seed(10 + s)
        opt.zero_grad()
        opt.step(scaled_closure(model, x, y, scaler), scaler=scaler)
        scaler.update()
        torch.manual_seed(10 + s)
        ropt.zero_grad()
        ropt.step(closure_for(ref, x, y))
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(9)
    opt.zero_grad()
    # the first pass (some steps of LookSAM / AE-SAM / SS-SAM have only that one)
    opt.step(scaled_closure(model, x, y, scaler, poison_call=1), scaler=scaler)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**9


def test_esam_with_scaler_matches_unscaled():
    """ESAM runs the backward itself (forward-only closure): the optimizer scales it."""
    try:
        from python_api.esam import ESAM
    except ImportError:
        pytest.skip("ESAM is not in this tree yet")
    model, ref = make_model(), make_model()
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=3)
    ropt = ESAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for s in range(3):
        x, y = batch(s)
        opt.zero_grad()
        opt.step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"), scaler=scaler)
        scaler.update()
        ropt.zero_grad()
        ropt.step(lambda: nn.functional.cross_entropy(ref(x), y, reduction="none"))
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**10


def test_scaler_unscale_before_step_is_refused():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="unscaled twice"):
        opt.step(scaled_closure(model, x, y, scaler), scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
