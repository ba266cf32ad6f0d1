"""Gradient clipping (``max_grad_norm=``, issue 17 item 5) on the standalone Momentum-SAM classes.

The gradient the step uses is ``p.grad`` (taken at the moved-down point ``w~``); with
``max_grad_norm`` it must be used as ``torch.nn.utils.clip_grad_norm_`` would leave it (the
global norm over every parameter with a gradient, all groups; the weight decay of ``MSAM`` added
after). The reference: tests/_msam_ref.py's float64 ``RefMSAM`` (checked there against the real
MarlonBecker/MSAM code) stepped after ``clip_grad_norm_`` was applied by hand to its gradients.
"""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from _helpers import HostReads, rel_err, same
from _models import STEPS, snapshot
from _msam_ref import (
    CLASSES,
    backward,
    batch,
    drop_b1_odd,
    make,
    ref_for,
    run,
    step_op_count,
)

#: below the gradient norm of every step of the runs here (asserted), so every step is clipped
CLIP = {"sgd": 0.05, "adamw": 0.05}


def clip_by_hand(model, max_norm):
    """``clip_grad_norm_`` on the gradients of ``model``'s parameters that have one; the norm."""
    ps = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(ps, max_norm))


@pytest.mark.parametrize("backend", [None, "eager"], ids=["default", "eager"])
@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_matches_reference_clipped_by_hand(form, backend):
    """20 steps, float64, three groups (a momentum-0 / beta1-0 group with no weight decay, a
    rho=0 group), a parameter never given a gradient, one without a gradient every other step,
    a zero-size and a non-contiguous parameter: agreement with RefMSAM on clipped gradients to
    1e-6 relative (the moved-down weights, w and the direction), ``p.grad`` left alone."""
    clip = CLIP[form]
    model, opt = make(form, backend=backend, max_grad_norm=clip)
    ref_model, ref = ref_for(model, form)
    worst = 0.0
    for i in range(STEPS):
        x, y = batch(i)
        backward(model, x, y, drop_b1_odd(i))
        g_before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        backward(ref_model, x, y, drop_b1_odd(i))
        total = clip_by_hand(ref_model, clip)
        assert total > 2 * clip, "every step must be clipped for the test to mean anything"
        ref.step()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            worst = max(worst, rel_err(p.detach(), q.detach()))
            if name in g_before:  # the clip is folded into the step, p.grad is not scaled
                assert torch.equal(p.grad, g_before[name]), name
    assert worst < 1e-6, worst
    key = "momentum_buffer" if form == "sgd" else "exp_avg"
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if q in ref.state:
            assert rel_err(opt.state[p][key], ref.state[q]["v"]) < 1e-6
    with opt.unperturbed():
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert rel_err(p.detach(), ref.unperturbed(q)) < 1e-6
    assert opt.steps_taken == STEPS and opt.skipped_steps == 0


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_fp32_matches_clipping_by_hand(form):
    """float32 parameters: the clipped step equals the unclipped optimizer stepped on
    gradients clipped by hand with clip_grad_norm_ (same dtype), to 1e-6 relative."""
    clip = CLIP[form]
    model, opt = make(form, dtype=torch.float32, max_grad_norm=clip)
    twin_model, twin = make(form, dtype=torch.float32)  # the same seed: the same weights
    for i in range(10):
        x, y = batch(i, torch.float32)
        backward(model, x, y, drop_b1_odd(i))
        opt.step()
        backward(twin_model, x, y, drop_b1_odd(i))
        assert clip_by_hand(twin_model, clip) > clip
        twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_a_bound_above_every_norm_changes_nothing(form):
    model, opt = make(form, dtype=torch.float32)
    model2, opt2 = make(form, dtype=torch.float32, max_grad_norm=1e6)
    run(model, opt, range(6), torch.float32, drop_b1_odd)
    run(model2, opt2, range(6), torch.float32, drop_b1_odd)
    assert same(snapshot(model, opt), snapshot(model2, opt2))


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_nonfinite_step_is_skipped_with_clipping(form):
    model, opt = make(form, max_grad_norm=CLIP[form])
    run(model, opt, range(3), drop_at=drop_b1_odd)
    before = snapshot(model, opt)
    x, y = batch(99)
    backward(model, x, y)
    model.w2t.grad[1, 2] = float("inf")
    opt.step()
    assert same(snapshot(model, opt), before)
    assert opt.skipped_steps == 1 and opt.steps_taken == 3


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_resume_and_deepcopy_keep_the_bound(form):
    """``max_grad_norm`` is configuration (not in the state_dict, as for the SAM family): a
    resumed optimizer built with it, and a deep copy, continue bit for bit."""
    clip = CLIP[form]
    model, opt = make(form, max_grad_norm=clip)
    run(model, opt, range(4), drop_at=drop_b1_odd)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buf)
    model_c, opt_c = copy.deepcopy((model, opt))
    assert opt_c.max_grad_norm == clip
    run(model, opt, range(4, 9), drop_at=drop_b1_odd)
    run(model_c, opt_c, range(4, 9), drop_at=drop_b1_odd)
    buf.seek(0)
    ck = torch.load(buf)
    model2, opt2 = make(form, seed=1, max_grad_norm=clip)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    run(model2, opt2, range(4, 9), drop_at=drop_b1_odd)
    for p, q, r in zip(model.parameters(), model2.parameters(), model_c.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert "max_grad_norm" not in sd["param_groups"][0]


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_no_host_read_and_no_extra_per_tensor_ops_with_clipping(form):
    """Clipping adds no host read, and the step's op count stays independent of the number
    of tensors (the coefficient rides in the fused step)."""
    model, opt = make(form, dtype=torch.float32, max_grad_norm=CLIP[form])
    for i in range(3):
        x, y = batch(i, torch.float32)
        backward(model, x, y, drop_b1_odd(i))
        with HostReads() as spy:
            opt.step()
        assert len(spy.ops) > 10 and spy.reads == 0, f"{spy.reads} host reads in one step"
    assert step_op_count(form, 4, max_grad_norm=0.1) == step_op_count(form, 40, max_grad_norm=0.1)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), True, "1.0"])
@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_bad_max_grad_norm(form, value):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="max_grad_norm"):
        CLASSES[form]([p], max_grad_norm=value)


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_max_grad_norm_is_keyword_only_default_none(form):
    sig = inspect.signature(CLASSES[form].__init__).parameters
    assert sig["max_grad_norm"].default is None
    assert sig["max_grad_norm"].kind is inspect.Parameter.KEYWORD_ONLY
    assert CLASSES[form]([torch.nn.Parameter(torch.randn(2))]).max_grad_norm is None
