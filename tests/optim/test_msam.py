"""MSAM and AdamWMSAM against an independent float64 implementation of the reference's equations.

The reference, ``RefMSAM`` (a float64 re-implementation of MarlonBecker/MSAM, checked against
the real code), and the setup are in _msam_ref.py, shared with test_msam_clipping.py.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _helpers import HostReads, rel_err, same
from _models import STEPS, loss_fn, snapshot
from _msam_ref import (
    CLASSES,
    EPS,
    HPS,
    backward,
    batch,
    drop_b1_odd,
    make,
    ref_for,
    run,
    step_op_count,
)

from python_api._base import NonFiniteError
from python_api.msam import MSAM


# ---------------------------------------------------------------- equations
@pytest.mark.parametrize("backend", [None, "eager"], ids=["default", "eager"])
@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_matches_reference(form, backend):
    """20 steps, three groups (a momentum-0 / beta1-0 group, a rho=0 group), a parameter never
    given a gradient, one without a gradient every other step, a zero-size and a non-contiguous
    parameter: the moved-down weights, w and the state agree with RefMSAM to 1e-6 (with the
    device's default backend and with the eager reference ops)."""
    model, opt = make(form, backend=backend)
    ref_model, ref = ref_for(model, form)
    unused = model.unused.detach().clone()
    for i in range(STEPS):
        x, y = batch(i)
        backward(model, x, y, drop_b1_odd(i))
        g_before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        backward(ref_model, x, y, drop_b1_odd(i))
        ref.step()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert rel_err(p.detach(), q.detach()) < 1e-6, (i, name)
            if name in g_before:  # the step leaves p.grad alone (the reference adds wd into it)
                assert torch.equal(p.grad, g_before[name]), name
    key = "momentum_buffer" if form == "sgd" else "exp_avg"
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if q in ref.state:
            assert rel_err(opt.state[p][key], ref.state[q]["v"]) < 1e-6
            assert opt.state[p]["ascent_scale"].item() == pytest.approx(ref.state[q]["s"], 1e-9)
    assert torch.equal(model.unused, unused) and model.unused not in opt.state
    with opt.unperturbed():
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert rel_err(p.detach(), ref.unperturbed(q)) < 1e-6
    # the rho=0 group is never perturbed: plain SGD/AdamW there
    assert opt.state[model.b2]["ascent_scale"].item() == 0.0
    assert opt.steps_taken == STEPS and opt.skipped_steps == 0


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_rho_schedule_moves_back_by_the_scale_applied(form):
    """rho changed between steps (a rho scheduler): each parameter moves back by the scale it
    was moved down with, so w stays exact (the SGD reference would move back with the new rho)."""
    model, opt = make(form)
    ref_model, ref = ref_for(model, form)
    for i in range(STEPS):
        factor = 1.0 + 0.5 * math.sin(i)
        for g, (hp, _), base in zip(opt.param_groups, ref.groups, HPS[form]):
            g["rho"] = hp["rho"] = base["rho"] * factor
        x, y = batch(i)
        backward(model, x, y)
        opt.step()
        backward(ref_model, x, y)
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_fp32_close_to_reference(form):
    """float32 parameters: fp32 rounding only. AdamW's fp32 step counters (torch's capturable
    form) make 1 - beta2^t lose digits to cancellation (1e-5 relative at beta2 = 0.999)."""
    tol = 1e-5 if form == "sgd" else 5e-5
    model, opt = make(form, dtype=torch.float32)
    ref_model, ref = ref_for(model, form)
    for i in range(STEPS):
        x, y = batch(i)
        backward(model, x.float(), y)
        opt.step()
        backward(ref_model, x, y)
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach().double(), q.detach()) < tol


def test_first_step_by_hand():
    """One parameter, one step, the numbers by hand: s = 0, v = d, w~ = w - lr d - rho d/|d|."""
    w0 = torch.tensor([3.0, -4.0], dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = MSAM([p], lr=0.1, momentum=0.9, weight_decay=0.5, rho=0.2)
    p.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    opt.step()
    d = p.grad + 0.5 * w0  # (2.5, 0)
    want = w0 - 0.1 * d - 0.2 * d / (d.norm() + EPS)
    assert torch.allclose(p.detach(), want, rtol=0, atol=1e-14)
    with opt.unperturbed():
        assert torch.allclose(p.detach(), w0 - 0.1 * d, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- w between steps
@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_unperturbed_gives_w_and_restores_exactly(form):
    model, opt = make(form)
    ref_model, ref = ref_for(model, form)
    run(model, opt, range(5), drop_at=drop_b1_odd)
    run(ref_model, ref, range(5), drop_at=drop_b1_odd)
    before = [p.detach().clone() for p in model.parameters()]
    sd_before = opt.state_dict()
    with opt.unperturbed():
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert rel_err(p.detach(), ref.unperturbed(q)) < 1e-6
        assert not torch.equal(model.w1, before[0])  # it did move
        inside = opt.state_dict()  # consistent with the weights there: s = 0
        assert all(st["ascent_scale"].item() == 0.0 for st in inside["state"].values())
        with pytest.raises(RuntimeError, match="inside unperturbed"):
            opt.step()
        with pytest.raises(RuntimeError, match="already active"):
            with opt.unperturbed():
                pass
        with pytest.raises(RuntimeError, match="inside unperturbed"):
            opt.finalize()
        model.w1.data.add_(1.0)  # whatever the block writes is overwritten on exit
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert same(opt.state_dict()["state"], sd_before["state"])
    # and after an exception inside the block too
    with pytest.raises(KeyError):
        with opt.unperturbed():
            raise KeyError
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_finalize_leaves_w_and_training_continues(form):
    """finalize(): the weights become w, the scales 0; later steps follow the reference that
    did the same (its next gradient is taken at w)."""
    model, opt = make(form)
    ref_model, ref = ref_for(model, form)
    run(model, opt, range(6))
    run(ref_model, ref, range(6))
    with opt.unperturbed():
        w = [p.detach().clone() for p in model.parameters()]
    opt.finalize()
    ref.finalize()
    for p, q in zip(model.parameters(), w):
        assert torch.equal(p, q)  # the same move-up as unperturbed()
    opt.finalize()  # idempotent: s = 0 now
    for p, q in zip(model.parameters(), w):
        assert torch.equal(p, q)
    run(model, opt, range(6, 12))
    run(ref_model, ref, range(6, 12))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6


def test_finalize_and_unperturbed_before_any_step():
    model, opt = make("sgd")
    before = [p.detach().clone() for p in model.parameters()]
    with opt.unperturbed():
        pass
    opt.finalize()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# ---------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_nonfinite_step_leaves_no_trace(form, bad):
    model, opt = make(form)
    clean, opt_clean = make(form)
    run(model, opt, range(3), drop_at=drop_b1_odd)
    run(clean, opt_clean, range(3), drop_at=drop_b1_odd)
    for o in (opt, opt_clean):  # a rho schedule: the skipped step must not store a new scale
        o.param_groups[0]["rho"] *= 2
    before = snapshot(model, opt)
    x, y = batch(99)
    backward(model, x, y)
    model.w2t.grad[1, 2] = bad
    opt.step()
    after = snapshot(model, opt)
    assert same(after, before)
    assert opt.skipped_steps == 1 and opt.steps_taken == 3
    run(model, opt, range(3, 6), drop_at=drop_b1_odd)
    run(clean, opt_clean, range(3, 6), drop_at=drop_b1_odd)
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_on_nonfinite_raise(form):
    model, opt = make(form, on_nonfinite="raise")
    run(model, opt, range(2))
    before = snapshot(model, opt)
    x, y = batch(5)
    backward(model, x, y)
    model.w1.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        opt.step()
    assert same(snapshot(model, opt), before)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_resume_bit_identical(form, dtype):
    model, opt = make(form, dtype=dtype)
    run(model, opt, range(4), dtype, drop_b1_odd)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, range(4, 9), dtype, drop_b1_odd)
    buf.seek(0)
    ck = torch.load(buf)
    model2, opt2 = make(form, dtype=dtype, seed=1)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.steps_taken == 4
    run(model2, opt2, range(4, 9), dtype, drop_b1_odd)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert same(snapshot(model, opt)[1], snapshot(model2, opt2)[1])
    st = opt2.state[model2.w1]
    assert st["step"].dtype == st["ascent_scale"].dtype == dtype


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_checkpoint_inside_unperturbed_resumes_as_finalize(form):
    """A checkpoint of model and optimizer taken inside unperturbed() holds w and s = 0: it
    resumes as the original run does after finalize()."""
    model, opt = make(form)
    run(model, opt, range(4))
    with opt.unperturbed():
        ck = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = make(form, seed=1)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    opt.finalize()
    run(model, opt, range(4, 8))
    run(model2, opt2, range(4, 8))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_deepcopy_continues_identically(form):
    model, opt = make(form, on_nonfinite="raise")
    run(model, opt, range(3))
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.on_nonfinite == "raise" and opt2.steps_taken == 3
    run(model, opt, range(3, 6))
    run(model2, opt2, range(3, 6))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with opt.unperturbed(), pytest.raises(RuntimeError, match="inside unperturbed"):
        copy.deepcopy(opt)


def test_load_refuses_mismatches():
    model, opt = make("sgd")
    run(model, opt, range(2))
    sd = opt.state_dict()
    _, aopt = make("adamw")
    with pytest.raises(ValueError, match="MSAM state_dict cannot be loaded into AdamWMSAM"):
        aopt.load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["param_groups"].pop()
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match="momentum_buffer of shape"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][1]["rho"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[1\]: rho must be"):
        opt.load_state_dict(bad)
    # nothing of the refused dicts was loaded
    assert same(opt.state_dict()["state"], sd["state"])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "form, kw, match",
    [
        ("sgd", dict(lr=-0.1), "lr must be"),
        ("sgd", dict(rho=-1.0), "rho must be"),
        ("sgd", dict(weight_decay=-1e-4), "weight_decay must be"),
        ("sgd", dict(momentum=1.0), r"momentum must be in \[0.0, 1.0\)"),
        ("sgd", dict(momentum=-0.1), "momentum must be"),
        ("sgd", dict(nesterov=True), "nesterov=True is not supported"),
        ("sgd", dict(on_nonfinite="ignore"), "on_nonfinite"),
        ("adamw", dict(lr=-1e-3), "lr must be"),
        ("adamw", dict(rho=float("nan")), "rho must be"),
        ("adamw", dict(betas=(1.0, 0.999)), r"betas\[0\] must be"),
        ("adamw", dict(betas=(0.9, -0.1)), r"betas\[1\] must be"),
        ("adamw", dict(betas=(0.9,)), "betas must be a pair"),
        ("adamw", dict(eps=-1e-8), "eps must be"),
        ("adamw", dict(weight_decay=-1.0), "weight_decay must be"),
    ],
)
def test_bad_hyperparameters(form, kw, match):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=match):
        CLASSES[form]([p], **kw)


def test_bad_group_values_name_the_group():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match=r"MSAM: param_groups\[1\]: rho must be"):
        MSAM([{"params": [a]}, {"params": [b], "rho": -0.5}])
    opt = MSAM([a])
    with pytest.raises(ValueError, match=r"param_groups\[1\]: momentum must be"):
        opt.add_param_group({"params": [b], "momentum": 1.5})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    with pytest.raises(ValueError, match=r"param_groups\[1\]: nesterov"):
        opt.add_param_group({"params": [b], "nesterov": True})


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_sparse_gradient_refused_naming_the_parameter(form):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    other = torch.nn.Parameter(torch.randn(2))
    opt = CLASSES[form]([other, emb.weight])
    emb(torch.tensor([1, 2])).sum().backward()
    w = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"sparse gradients: param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    assert torch.equal(emb.weight, w)


def test_integer_parameter_and_bad_closure_refused():
    with pytest.raises(TypeError, match="floating point"):
        MSAM([torch.zeros(3, dtype=torch.int64)])
    p = torch.nn.Parameter(torch.randn(3))
    opt = MSAM([p])
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(closure=3)


# ---------------------------------------------------------------- the step's contract
@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_closure_and_no_grads(form):
    model, opt = make(form)
    x, y = batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None  # no gradient anywhere: nothing happens
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)

    def closure():
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        want = loss_fn(model, x, y)
        loss = opt.step(closure)  # the closure runs with grad enabled, as torch's optimizers
    assert torch.is_tensor(loss) and torch.equal(loss.detach(), want)
    assert opt.steps_taken == 1


@pytest.mark.parametrize("raise_", [False, True], ids=["skip", "raise"])
@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_host_reads_per_step(form, raise_):
    """No host read in a step (one, the finite flag, with on_nonfinite='raise')."""
    model, opt = make(form, dtype=torch.float32, on_nonfinite="raise" if raise_ else "skip")
    for i in range(3):
        x, y = batch(i, torch.float32)
        backward(model, x, y, drop_b1_odd(i))
        with HostReads() as spy:
            opt.step()
        assert len(spy.ops) > 10
        assert spy.reads == (1 if raise_ else 0), f"{spy.reads} host reads in one step"
    with HostReads() as spy:
        opt.finalize()
        with opt.unperturbed():
            pass
    assert spy.reads == 0


@pytest.mark.parametrize("form", ["sgd", "adamw"])
def test_dispatched_ops_do_not_grow_with_tensors(form):
    """The step's op count is the same for 4 and for 40 parameters (multi-tensor ops only)."""
    assert step_op_count(form, 4) == step_op_count(form, 40)
