"""Triton backend: every op against its eager reference, on fresh random inputs.

Runs in the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py when
there is no GPU) and unchanged on a CUDA device when there is one. The interpreter costs about
1 ms per program, so sizes stay small: 0, 1, 17 and 4097 elements everywhere, a 300-tensor list
of tiny tensors and one 2^20 + 3 tensor in a few tests only.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import bits, like

import sam_kernels as sk
from sam_kernels import LinComb
from sam_kernels.ops._step_args import AdamWHyper, SgdHyper
from sam_kernels.ops.adamw_step import adamw_step_eager
from sam_kernels.ops.sgd_step import sgd_step_eager

triton = pytest.importorskip("triton")

DEVICE = (
    torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.is_available()
    else torch.device("cpu")
)
pytestmark = pytest.mark.skipif(
    not sk.available("triton", DEVICE), reason="the Triton backend cannot run here"
)

from sam_kernels.triton import _launch  # noqa: E402

SHAPES = [(0,), (1,), (17,), (17, 241)]  # 0, 1, 17, 4097 elements
BIG = 2**20 + 3
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


# ------------------------------------------------------------------------------ helpers
def make(shapes, dtype=torch.float32, layout="contig", scale=1.0):
    """Random tensors; ``layout``: contig, strided (a non-dense view) or permuted (dense,
    transposed: run in place on memory order)."""
    out = []
    for shape in shapes:
        if layout == "strided" and len(shape) >= 1 and shape[-1] > 1:
            base = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE) * scale
            t = base.to(dtype)[..., ::2]
        elif layout == "permuted" and len(shape) == 2:
            t = (torch.randn(shape[1], shape[0], device=DEVICE) * scale).to(dtype).t()
        else:
            t = (torch.randn(shape, device=DEVICE) * scale).to(dtype)
        if layout == "strided" and t.numel() > 1:
            assert not t.is_contiguous()
        out.append(t)
    return out


def clone(ts):
    return [t.clone() for t in ts]


def assert_lists(actual, expected, dtype=None, exact=False, what=""):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, (what, i)
        if exact:
            assert torch.equal(a, e), f"{what}[{i}] differs"
        else:
            tol = TOL[dtype or a.dtype]
            torch.testing.assert_close(a, e, **tol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def up(ts):
    """fp32 copies: the eager reference of a half-precision step is the eager step in fp32 on
    the same (rounded) inputs, rounded once at the end (eager in bf16/fp16 rounds every
    intermediate, and fp16 AdamW even loses eps = 1e-8 to underflow)."""
    return None if ts is None else [t.detach().float().clone() for t in ts]


def ref_grads(grads):
    if isinstance(grads, LinComb):
        return LinComb(tuple(up(t) for t in grads.terms), grads.coefs)
    return up(grads)


def assert_ref(actual, ref, dtype, what):
    assert_lists(actual, [r.to(dtype) for r in ref], dtype, what=what)


def finite(ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


# ------------------------------------------------------------------------------ grad_norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_grad_norm_matches_eager(dtype, weighted):
    g = make(SHAPES, dtype)
    p = make(SHAPES, dtype) if weighted else None
    eta = 0.01 if weighted else 0.0
    a = sk.grad_norm(g, p, eta=eta, backend="triton")
    e = sk.grad_norm(g, p, eta=eta, backend="eager")
    assert a.shape == () and a.dtype == torch.float32 and a.device == DEVICE
    torch.testing.assert_close(
        a.cpu(), e.cpu(), rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=0
    )


def test_grad_norm_big_deterministic_noncontiguous():
    g = make([(BIG,), (17,), (17, 241)]) + make([(17, 241)], layout="strided")
    p = make([(BIG,), (17,), (17, 241), (17, 241)])
    for params in (None, p):
        a1 = sk.grad_norm(g, params, eta=0.1, backend="triton")
        a2 = sk.grad_norm(g, params, eta=0.1, backend="triton")
        assert torch.equal(a1, a2), "two runs gave different bits"
        # vs fp64 (the eager CPU norm drifts by ~1e-5 over 1M fp32 elements; we do not)
        w = [1.0] * len(g) if params is None else [t.double().abs() + 0.1 for t in params]
        ref = torch.cat([(wi * t.double()).flatten() for wi, t in zip(w, g)]).norm()
        torch.testing.assert_close(a1.double().cpu(), ref.cpu(), rtol=2e-6, atol=0)


def test_grad_norm_nonfinite_and_empty():
    g = make(SHAPES)
    g[3].view(-1)[100] = float("inf")
    assert torch.isinf(sk.grad_norm(g, backend="triton"))
    g[2][3] = float("nan")
    assert torch.isnan(sk.grad_norm(g, backend="triton"))
    assert float(sk.finite_flag(g, backend="triton")) == 0.0
    if DEVICE.type == "cpu":  # an empty list has no device: the dispatcher assumes the CPU
        assert float(sk.grad_norm([], backend="triton")) == 0.0
    z = sk.grad_norm([torch.empty(0, device=DEVICE)], backend="triton")
    assert float(z) == 0.0 and z.device == DEVICE


# ------------------------------------------------------------------------------ perturb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_matches_eager(dtype, adaptive):
    n = len(SHAPES)
    w = make(SHAPES, dtype)
    g = make(SHAPES, dtype)
    scale = torch.rand(n, device=DEVICE) if adaptive else torch.rand((), device=DEVICE)
    pt, pe = clone(w), up(w)
    bt, be = like(w), up(w)
    sk.perturb_(pt, g, bt, scale, adaptive=adaptive, eta=0.05, backend="triton")
    # the reference in fp32 on the same inputs, rounded once (eager bf16 rounds |p|, T^2, T^2 g
    # and s T^2 g each: about one draw in 30 then lands more than 2% from the fp32 math)
    sk.perturb_(pe, up(g), be, scale, adaptive=adaptive, eta=0.05, backend="eager")
    assert_lists(bt, w, exact=True, what="backup")  # bit-exact, fully written
    assert finite(pt)
    assert_ref(pt, pe, dtype, what="params")


@pytest.mark.parametrize("layout", ["strided", "permuted", "mixed"])
def test_perturb_layouts(layout):
    w = make(SHAPES, layout="permuted" if layout == "mixed" else layout)
    g = make(SHAPES, layout="contig" if layout == "mixed" else layout)
    scale = torch.rand(len(SHAPES), device=DEVICE)
    pt, pe = clone(w), clone(w)
    bt, be = like(w), like(w)
    sk.perturb_(pt, g, bt, scale, adaptive=True, backend="triton")
    sk.perturb_(pe, g, be, scale, adaptive=True, backend="eager")
    assert_lists(bt, w, exact=True, what="backup")
    assert_lists(pt, pe, what="params")
    assert [t.stride() for t in pt] == [t.stride() for t in pe]


# ------------------------------------------------------------------------------ restore
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "strided"])
def test_restore_exact(dtype, layout):
    b = make(SHAPES, dtype, layout)
    p = like(b)
    sk.restore_(p, b, backend="triton")
    assert_lists(p, b, exact=True, what="params")


# ------------------------------------------------------------------------------ lincomb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,per_tensor", [(2, False), (3, True), (4, False)])
def test_lincomb_matches_eager(dtype, k, per_tensor):
    n = len(SHAPES)
    terms = [make(SHAPES, dtype) for _ in range(k)]
    coefs = torch.randn(k, n, device=DEVICE) if per_tensor else torch.randn(k, device=DEVICE)
    ot, oe = like(terms[0]), up(terms[0])
    sk.lincomb_(ot, terms, coefs, backend="triton")
    sk.lincomb_(oe, [up(t) for t in terms], coefs, backend="eager")  # fp32 math, one rounding
    assert finite(ot)
    assert_ref(ot, oe, dtype, "out")


@pytest.mark.parametrize("layout", ["contig", "strided"])
def test_lincomb_out_aliases_a_term(layout):
    terms = [make(SHAPES, layout=layout) for _ in range(3)]
    coefs = torch.randn(3, len(SHAPES), device=DEVICE)
    te = [clone(t) for t in terms]
    sk.lincomb_(terms[1], terms, coefs, backend="triton")
    sk.lincomb_(te[1], te, coefs, backend="eager")
    assert_lists(terms[1], te[1], what="out")


# ------------------------------------------------------------------------------ frob
@pytest.mark.parametrize("dtype", DTYPES)
def test_frob_accumulate_matches_eager(dtype):
    g = make(SHAPES, dtype)
    cross, gsum = make(SHAPES, dtype), make(SHAPES, dtype)
    ce, se = clone(cross), clone(gsum)
    loss = torch.rand((), device=DEVICE) * 3
    sk.frob_accumulate_(cross, gsum, g, loss, backend="triton")
    sk.frob_accumulate_(ce, se, g, loss, backend="eager")
    assert_lists(cross, ce, dtype, what="cross")
    assert_lists(gsum, se, dtype, what="gsum")


# ------------------------------------------------------------------------------ aesam_stats
def test_aesam_stats_matches_eager():
    st, se = torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    for i in range(6):
        g = make(SHAPES, scale=1.0 + 0.5 * (i % 3))
        dt = sk.aesam_stats_(g, st, delta=0.9, c=0.3, backend="triton")
        de = sk.aesam_stats_(g, se, delta=0.9, c=0.3, backend="eager")
        assert dt.dtype == torch.int32 and dt.shape == () and dt.device == DEVICE
        assert int(dt) == int(de)
        torch.testing.assert_close(st, se, rtol=2e-6, atol=0)
    g[3].view(-1)[7] = float("nan")
    before = st.clone()
    assert int(sk.aesam_stats_(g, st, delta=0.9, c=0.3, backend="triton")) == -1
    assert torch.equal(st, before)
    if DEVICE.type == "cpu":  # an empty list has no device: the dispatcher assumes the CPU
        d = sk.aesam_stats_([], st, delta=0.9, c=0.3, backend="triton")
        de = sk.aesam_stats_([], before, delta=0.9, c=0.3, backend="eager")
        assert int(d) == int(de)
        torch.testing.assert_close(st, before)


# ------------------------------------------------------------------------------ looksam
#: SHAPES plus a tensor of more than one chunk under the interpreter too (64K-element blocks)
LOOK_SHAPES = SHAPES + [(2**16 + 3,)]


def _look_inputs(dtype, layout):
    """g0, gs (``layout``: contig, strided, or mixed: g0 strided, gs contiguous); g0's 1-element
    tensor is zero (coefficient 0: gv = gs)."""
    g0 = make(LOOK_SHAPES, dtype, "contig" if layout == "contig" else "strided")
    gs = make(LOOK_SHAPES, dtype, "strided" if layout == "strided" else "contig")
    g0[1].zero_()
    return g0, gs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ok", [None, 1.0, 0.0])
@pytest.mark.parametrize("layout", ["contig", "strided", "mixed"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
def test_looksam_project_matches_eager(layout, ok, dtype):
    g0, gs = _look_inputs(dtype, layout)
    # every element written: gv starts as NaN (ok None), or random and finite (ok 1: the eager
    # reference selects with a lerp, NaN there stays NaN), laid out as the inputs
    gv = like(g0) if ok is None else make(LOOK_SHAPES, dtype, "strided")
    ok_t = None if ok is None else torch.tensor(ok, device=DEVICE)
    if ok == 0.0:  # a skipped step: gv keeps its bits whatever g0 and gs hold
        gs[3].view(-1)[5] = float("nan")
        g0[2][4] = float("inf")
    before = clone(gv)
    ve = up(gv)
    sk.looksam_project_(gv, g0, gs, ok_t, backend="triton")
    if ok == 0.0:
        for i, (a, b) in enumerate(zip(gv, before)):
            assert torch.equal(bits(a), bits(b)), f"gv[{i}] changed on a skipped step"
        return
    sk.looksam_project_(ve, up(g0), up(gs), ok_t, backend="eager")  # fp32 math, one rounding
    assert finite(gv)
    assert_ref(gv, ve, dtype, what="gv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.7, 3.3])
@pytest.mark.parametrize("layout", ["contig", "mixed"])
def test_looksam_reuse_coefs_match_eager(layout, alpha, dtype):
    g0, gv = _look_inputs(dtype, layout)
    gv[2].zero_()  # ||gv|| = 0: coefficient 0
    ct = sk.looksam_reuse(g0, gv, alpha, backend="triton").coefs
    ce = sk.looksam_reuse(up(g0), up(gv), alpha, backend="eager").coefs
    assert ct.shape == (2, len(g0)) and ct.dtype == torch.float32 and ct.device == DEVICE
    assert torch.equal(ct[0], torch.ones_like(ct[0]))
    assert float(ct[1, 0]) == 0.0 and float(ct[1, 2]) == 0.0  # empty, zero gv
    torch.testing.assert_close(ct, ce, rtol=1e-6, atol=0)


def test_looksam_many_chunks_deterministic(monkeypatch):
    """A tensor of more chunks than the per-tensor sum has lanes (several passes of its loop):
    the coefficients against fp64 sums, two runs the same bits."""
    from sam_kernels.triton.looksam import PART_BLOCK

    if DEVICE.type == "cpu":
        monkeypatch.setattr(_launch, "INTERP_MAX_BLOCK", 64)  # 64-element chunks
        big = 64 * (2 * PART_BLOCK + 3) + 5
    else:
        big = BIG
    shapes = [(big,), (0,), (17,), (17, 241)]
    g0, gs = make(shapes), make(shapes)
    gs[0] += 0.25 * g0[0]  # a coefficient well away from 0
    runs = []
    for _ in range(2):
        gv = like(g0)
        sk.looksam_project_(gv, g0, gs, None, backend="triton")
        coefs = sk.looksam_reuse(g0, gv, 0.7, backend="triton").coefs
        runs.append((gv, coefs))
    for (v1, c1), (v2, c2) in zip(runs, runs[1:]):
        assert torch.equal(c1, c2), "two runs gave different coefficients"
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(v1, v2))
    gv, coefs = runs[0]
    for i, (a, b, v) in enumerate(zip(g0, gs, gv)):
        a, b = a.double().cpu(), b.double().cpu()
        c = float((a * b).sum() / (a * a).sum()) if a.numel() else 0.0
        want = b - torch.tensor(c, dtype=torch.float32).double() * a
        torch.testing.assert_close(v.double().cpu(), want, rtol=1e-6, atol=1e-6)
        nv = v.double().cpu().norm()
        r = 0.7 * a.norm() / (nv + 1e-8) if nv > 0 else torch.zeros((), dtype=torch.float64)
        torch.testing.assert_close(coefs[1, i].cpu(), r.float(), rtol=1e-6, atol=0)


def test_looksam_empty_and_mixed_dtypes():
    assert sk.looksam_reuse([], [], 0.5, backend="triton").coefs.shape == (2, 0)
    sk.looksam_project_([], [], [], None, backend="triton")
    z = [torch.empty(0, device=DEVICE), torch.empty(0, 3, device=DEVICE)]
    sk.looksam_project_(like(z), z, z, torch.ones((), device=DEVICE), backend="triton")
    c = sk.looksam_reuse(z, z, 0.5, backend="triton").coefs
    assert c.device == DEVICE and torch.equal(c.cpu(), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    # different dtypes at one index: declined, so the chooser runs the eager reference
    from sam_kernels._backend import Declined
    from sam_kernels.triton.looksam import looksam_project_triton, looksam_reuse_coefs_triton

    g0 = make(SHAPES)
    gs = make(SHAPES, torch.bfloat16)
    gv = like(g0)
    with pytest.raises(Declined):
        looksam_project_triton(gv, g0, gs, None)
    with pytest.raises(Declined):
        looksam_reuse_coefs_triton(g0, gs, 0.5)
    ve = like(g0)
    sk.looksam_project_(gv, g0, gs, None, backend="triton")
    sk.looksam_project_(ve, g0, gs, None, backend="eager")
    assert_lists(gv, ve, exact=True, what="gv")


# ------------------------------------------------------------------------------ sgd_step
SGD_CASES = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "nesterov_maximize": dict(momentum=0.8, nesterov=True, weight_decay=1e-3, maximize=True),
}


def _sgd_state(w, momentum):
    bufs = [torch.zeros_like(t) for t in w] if momentum else []
    steps = [torch.zeros((), device=DEVICE) for _ in w]
    return bufs, steps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("grad_kind", ["plain", "lincomb"])
def test_sgd_step_matches_eager(dtype, case, grad_kind):
    kw = SGD_CASES[case]
    n = len(SHAPES)
    p = make(SHAPES, dtype)
    bufs, steps = _sgd_state(p, kw["momentum"])
    lr = torch.tensor(0.05, device=DEVICE) if grad_kind == "lincomb" else 0.05
    for it in range(3):
        backups = make(SHAPES, dtype) if it != 1 else None
        if grad_kind == "lincomb":
            terms = tuple(make(SHAPES, dtype) for _ in range(3))
            grads = LinComb(terms, torch.randn(3, n, device=DEVICE))
        else:
            grads = make(SHAPES, dtype)
        ok = torch.tensor(0.0 if it == 2 else 1.0, device=DEVICE)
        if backups is not None:
            p = like(p)  # fully written from the backups
        pe, be, se = up(p), up(bufs), clone(steps)
        sk.sgd_step_(p, grads, bufs, steps, backups=backups, lr=lr, ok=ok, backend="triton", **kw)
        sgd_step_eager(pe, ref_grads(grads), be, se, up(backups), SgdHyper(lr, **kw), ok)
        assert finite(p)
        assert_ref(p, pe, dtype, f"params step {it}")
        assert_ref(bufs, be, dtype, f"buffers step {it}")
        assert_lists(steps, se, exact=True, what=f"steps {it}")
    assert [float(s) for s in steps] == [2.0] * n


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_ok0_changes_nothing(momentum):
    w = make(SHAPES)
    p = make(SHAPES)
    bufs, steps = _sgd_state(p, momentum)
    for b in bufs:
        b.normal_()
    for s in steps:
        s.fill_(3.0)
    b0, s0 = clone(bufs), clone(steps)
    g = make(SHAPES)
    g[3].view(-1)[5] = float("nan")
    ok = torch.zeros((), device=DEVICE)
    sk.sgd_step_(p, g, bufs, steps, backups=w, lr=0.1, momentum=momentum, ok=ok, backend="triton")
    assert_lists(p, w, exact=True, what="params")  # the restored weights, bit for bit
    assert_lists(bufs, b0, exact=True, what="buffers")
    assert_lists(steps, s0, exact=True, what="steps")
    p2 = clone(w)
    sk.sgd_step_(p2, g, bufs, steps, lr=0.1, momentum=momentum, ok=ok, backend="triton")
    assert_lists(p2, w, exact=True, what="params (no backup)")


@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, dampening=0.2, weight_decay=5e-3, nesterov=False),
        dict(momentum=0.5, nesterov=True, weight_decay=1e-2, maximize=True),
        dict(momentum=0.0, weight_decay=1e-2),
    ],
)
def test_sgd_step_equals_torch_sgd(kw):
    shapes = [(17,), (17, 241), (1,)]
    ref = [torch.nn.Parameter(t) for t in make(shapes)]
    ours = [t.detach().clone() for t in ref]
    opt = torch.optim.SGD(ref, lr=0.1, **kw)
    bufs, steps = _sgd_state(ours, kw.get("momentum", 0.0))
    for _ in range(4):
        g = make(shapes)
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.step()
        sk.sgd_step_(ours, g, bufs, steps, lr=0.1, ok=torch.ones((), device=DEVICE),
                     backend="triton", **kw)  # fmt: skip
    assert_lists(ours, [p.detach() for p in ref], what="params")
    if kw.get("momentum"):
        assert_lists(bufs, [opt.state[p]["momentum_buffer"] for p in ref], what="buffers")


# ------------------------------------------------------------------------------ adamw_step
ADAM_CASES = {
    "plain": dict(),
    "amsgrad_maximize": dict(amsgrad=True, maximize=True, weight_decay=0.1),
    "beta1_small": dict(beta1=0.3, beta2=0.99, eps=1e-6),  # lerp weight >= 0.5
}


def _adam_state(w, amsgrad):
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    x = [torch.zeros_like(t) for t in w] if amsgrad else []
    return m, v, x, [torch.zeros((), device=DEVICE) for _ in w]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ADAM_CASES))
@pytest.mark.parametrize("grad_kind", ["plain", "lincomb"])
def test_adamw_step_matches_eager(dtype, case, grad_kind):
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False)
    kw.update(ADAM_CASES[case])
    p = make(SHAPES, dtype)
    state = _adam_state(p, kw["amsgrad"])
    lr = torch.tensor(0.01, device=DEVICE) if grad_kind == "lincomb" else 0.01
    for it in range(3):
        backups = make(SHAPES, dtype) if it != 1 else None
        if grad_kind == "lincomb":
            terms = tuple(make(SHAPES, dtype) for _ in range(2))
            grads = LinComb(terms, torch.randn(2, device=DEVICE))
        else:
            grads = make(SHAPES, dtype)
        ok = torch.tensor(0.0 if it == 1 else 1.0, device=DEVICE)
        if backups is not None:
            p = like(p)
        pe = up(p)
        se = [up(s) for s in state[:3]] + [clone(state[3])]
        sk.adamw_step_(p, grads, *state, backups=backups, lr=lr, ok=ok, backend="triton", **kw)
        adamw_step_eager(pe, ref_grads(grads), *se, up(backups), AdamWHyper(lr, **kw), ok)
        assert finite(p)
        assert_ref(p, pe, dtype, f"params step {it}")
        for name, a, e in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), state, se):
            assert_ref(a, e, dtype, f"{name} step {it}")
        assert_lists(state[3], se[3], exact=True, what=f"steps {it}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
def test_adamw_step_ok0_changes_nothing():
    w, p = make(SHAPES), make(SHAPES)
    m, v, x, steps = _adam_state(p, True)
    for t in m + v + x:
        t.uniform_(0.1, 1.0)
    for s in steps:
        s.fill_(5.0)
    before = [clone(m), clone(v), clone(x), clone(steps)]
    g = make(SHAPES)
    g[2][0] = float("inf")
    sk.adamw_step_(p, g, m, v, x, steps, backups=w, lr=0.1, amsgrad=True,
                   ok=torch.zeros((), device=DEVICE), backend="triton")  # fmt: skip
    assert_lists(p, w, exact=True, what="params")
    for a, b in zip((m, v, x, steps), before):
        assert_lists(a, b, exact=True, what="state")


def test_adamw_bias_corrections_at_first_steps():
    # p = 0 and lr = 1 make p the update itself: an error in 1 - beta2^t (which cancels at
    # small t: an approximate exp2 gives ~1e-4 relative at t = 1) shows at full size
    shapes = [(17, 241)]
    m, v, x, steps = _adam_state(make(shapes), False)
    me, ve, se = clone(m), clone(v), clone(steps)
    for it in range(3):
        g = make(shapes)
        pt = [torch.zeros(s, device=DEVICE) for s in shapes]
        pe = clone(pt)
        sk.adamw_step_(pt, g, m, v, x, steps, lr=1.0, weight_decay=0.0, backend="triton")
        sk.adamw_step_(pe, g, me, ve, [], se, lr=1.0, weight_decay=0.0, backend="eager")
        torch.testing.assert_close(pt[0], pe[0], rtol=1e-5, atol=1e-6, msg=f"step {it}")


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_step_equals_torch_adamw(amsgrad):
    shapes = [(17,), (17, 241), (1,)]
    ref = [torch.nn.Parameter(t) for t in make(shapes)]
    ours = [t.detach().clone() for t in ref]
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, amsgrad=amsgrad)
    opt = torch.optim.AdamW(ref, **kw)
    m, v, x, steps = _adam_state(ours, amsgrad)
    for _ in range(5):
        g = make(shapes)
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.step()
        sk.adamw_step_(ours, g, m, v, x, steps, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
                       weight_decay=0.05, amsgrad=amsgrad, backend="triton")  # fmt: skip
    tol = dict(rtol=1e-5, atol=1e-6)
    for a, p in zip(ours, ref):
        torch.testing.assert_close(a, p.detach(), **tol)
    for a, p in zip(m, ref):
        torch.testing.assert_close(a, opt.state[p]["exp_avg"], **tol)
    for a, p in zip(v, ref):
        torch.testing.assert_close(a, opt.state[p]["exp_avg_sq"], **tol)
    assert [float(s) for s in steps] == [5.0] * len(shapes)


# ------------------------------------------------------------------------------ noise
def _noise(shapes, kind, seed, offset, a=1.0, dtype=torch.float32, scale=None):
    """The generated eps (params start at 0 with scale 1: p = eps)."""
    p = [torch.zeros(s, device=DEVICE, dtype=dtype) for s in shapes]
    b = like(p)
    s = torch.ones((), device=DEVICE) if scale is None else scale
    sk.noise_perturb_(
        p, b, s, kind=kind, half_cube_len=a, backend="triton",
        seed=torch.tensor(seed, device=DEVICE), offset=torch.tensor(offset, device=DEVICE),
    )  # fmt: skip
    assert all(bool((t == 0).all()) for t in b), "backup must hold the old params"
    return p


def _corr(x, y):
    x = x - x.mean()
    y = y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_noise_statistics(kind):
    shapes = [(1,), (17,), (40000,), (40000,), (0,)]
    a = 0.3
    p = _noise(shapes, kind, 1234, 0, a=a)
    x = torch.cat([t.flatten() for t in p]).double().cpu()
    n = x.numel()
    var = 1.0 if kind == "normal" else a * a / 3
    assert abs(float(x.mean())) < 5 * (var / n) ** 0.5
    assert abs(float(x.var()) / var - 1) < 0.05
    if kind == "uniform":
        assert float(x.abs().max()) <= a
    else:
        kurt = float(((x - x.mean()) ** 4).mean() / x.var() ** 2)
        assert abs(kurt - 3.0) < 0.2
    lim = 5 / 40000**0.5
    assert abs(_corr(x[1:-1], x[2:])) < lim * 2  # neighbouring elements
    assert abs(_corr(p[2].cpu().double(), p[3].cpu().double())) < lim  # two tensors
    q = _noise(shapes, kind, 1234, n)  # next sample: offset advanced by the element count
    assert abs(_corr(p[2].cpu().double(), q[2].cpu().double())) < lim
    r = _noise(shapes, kind, 99, 0)  # another seed
    assert abs(_corr(p[2].cpu().double(), r[2].cpu().double())) < lim
    again = _noise(shapes, kind, 1234, 0, a=a)
    assert_lists(again, p, exact=True, what="regenerated noise")


def test_noise_counters_follow_the_concatenated_list():
    # element j of the concatenated list uses counter offset + j, whatever the split
    whole = _noise([(4097 + 17,)], "normal", 7, 11)[0]
    parts = _noise([(4097,), (0,), (17,)], "normal", 7, 11)
    assert torch.equal(torch.cat([parts[0], parts[2]]), whole)
    shifted = _noise([(4097 + 17 - 5,)], "normal", 7, 16)[0]
    assert torch.equal(shifted, whole[5:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_perturb_semantics(dtype):
    n = len(SHAPES)
    w = make(SHAPES, dtype)
    scale = torch.rand(n, device=DEVICE)
    seed, off = torch.tensor(5, device=DEVICE), torch.tensor(100, device=DEVICE)
    eps = _noise(SHAPES, "normal", 5, 100)
    p, b = clone(w), like(w)
    sk.noise_perturb_(p, b, scale, seed=seed, offset=off, backend="triton")
    assert_lists(b, w, exact=True, what="backup")
    expected = [wi.float() + e * s for wi, e, s in zip(w, eps, scale)]
    assert_lists([t.float() for t in p], expected, dtype, what="params")
    # save_backup=False: p = b + s * eps from the existing backup (the next sample)
    p2 = like(w)
    sk.noise_perturb_(p2, b, scale, save_backup=False, seed=seed, offset=off, backend="triton")
    assert_lists(p2, p, exact=True, what="params from backup")
    assert_lists(b, w, exact=True, what="backup untouched")
    # the eager path with the same eps (the `noise` hook) agrees
    pe, be = clone(w), like(w)
    sk.noise_perturb_(pe, be, scale, noise=[e.to(dtype) for e in eps], backend="eager")
    assert_lists(pe, p, dtype, what="eager with the same noise")


# ------------------------------------------------------------------------------ many tensors
def test_many_tiny_tensors_one_launch():
    shapes = [(int(s),) for s in torch.randint(0, 20, (300,))]
    p, g, w = make(shapes), make(shapes), make(shapes)
    pl = _launch.plan([p, g, w], written=(0, 2))
    assert len(pl.groups) == 1 and pl.groups[0].n == sum(1 for s in shapes if s[0] > 0)
    bufs, steps = _sgd_state(p, 0.9)
    be, se = clone(bufs), clone(steps)
    pe = clone(p)
    ok = torch.ones((), device=DEVICE)
    sk.sgd_step_(p, g, bufs, steps, backups=w, lr=0.1, momentum=0.9, ok=ok, backend="triton")
    sk.sgd_step_(pe, g, be, se, backups=w, lr=0.1, momentum=0.9, ok=ok, backend="eager")
    assert_lists(p, pe, what="params")
    assert_lists(bufs, be, what="buffers")
    assert [float(s) for s in steps] == [1.0] * 300  # zero-size tensors count their steps too
    torch.testing.assert_close(
        sk.grad_norm(g, backend="triton").cpu(), sk.grad_norm(g, backend="eager").cpu(),
        rtol=2e-6, atol=0,
    )  # fmt: skip


def test_mixed_dtypes_one_launch_per_dtype():
    w = make(SHAPES) + make(SHAPES, torch.bfloat16) + make([(5,)], torch.float16)
    g = [torch.randn_like(t) for t in w]
    pl = _launch.plan([w, g])
    assert sorted(len(x.dtypes) for x in pl.groups) == [2, 2, 2] and len(pl.groups) == 3
    pt, pe = clone(w), clone(w)
    bt, be = like(w), like(w)
    scale = torch.rand(len(w), device=DEVICE)
    sk.perturb_(pt, g, bt, scale, backend="triton")
    sk.perturb_(pe, g, be, scale, backend="eager")
    assert_lists(bt, w, exact=True, what="backup")
    for a, e in zip(pt, pe):
        torch.testing.assert_close(a, e, **TOL[a.dtype])


def test_tables_are_cached_until_pointers_change():
    p, g = make(SHAPES), make(SHAPES)
    t1 = _launch.plan([p, g]).groups[0].table
    assert _launch.plan([p, g]).groups[0].table is t1
    g2 = make(SHAPES)  # gradients re-allocated (zero_grad(set_to_none=True))
    assert _launch.plan([p, g2]).groups[0].table is not t1


def test_unsupported_dtype_falls_back_to_eager():
    p = make(SHAPES, torch.float64)
    g = make(SHAPES, torch.float64)
    a = sk.grad_norm(g, backend="triton")
    torch.testing.assert_close(a, sk.grad_norm(g, backend="eager"))
    b = like(p)
    q = clone(p)
    sk.perturb_(q, g, b, torch.tensor(0.5, device=DEVICE), backend="triton")
    assert_lists(b, p, exact=True)


@pytest.mark.gpu
def test_no_host_sync_on_gpu():
    shapes = [(17,), (17, 241), (1000,)]
    p, w = make(shapes), make(shapes)
    m, v, x, steps = _adam_state(p, False)
    bufs = [torch.zeros_like(t) for t in p]
    sgd_steps = [torch.zeros((), device=DEVICE) for _ in p]
    ok = torch.ones((), device=DEVICE)
    scale = torch.rand(len(shapes), device=DEVICE)
    seed, off = torch.tensor(1, device=DEVICE), torch.tensor(0, device=DEVICE)

    def one_step(g):
        n = sk.grad_norm(g, backend="triton")
        sk.perturb_(p, g, w, scale / (n + 1e-12), backend="triton")
        sk.noise_perturb_(p, w, scale, save_backup=False, seed=seed, offset=off,
                          backend="triton")  # fmt: skip
        okk = ok * sk.finite_flag(g, backend="triton")
        sk.sgd_step_(p, g, bufs, sgd_steps, backups=w, lr=0.1, momentum=0.9, ok=okk,
                     backend="triton")  # fmt: skip
        sk.adamw_step_(p, LinComb((g, g), torch.ones(2, device=DEVICE)), m, v, x, steps,
                       lr=0.1, ok=okk, backend="triton")  # fmt: skip
        sk.aesam_stats_(g, torch.zeros(2, device=DEVICE), delta=0.9, c=0.0, backend="triton")

    one_step(make(shapes))  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_step(make(shapes))  # new gradients: new tables (pinned, non-blocking copies)
        one_step(make(shapes))
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------ optimizers
def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        DEVICE
    )


@pytest.mark.parametrize(
    "base,kw",
    [
        ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        ("sgd_asam", dict(lr=0.1, momentum=0.9, nesterov=True, adaptive=True, rho=0.5)),
        ("adamw", dict(lr=1e-2, weight_decay=1e-2)),
    ],
)
def test_sam_optimizer_triton_equals_eager(base, kw):
    from python_api import SAM

    ref = _mlp()
    models = {"eager": ref, "triton": _mlp()}
    models["triton"].load_state_dict(ref.state_dict())
    cls = torch.optim.AdamW if base == "adamw" else torch.optim.SGD
    opts = {b: SAM(m.parameters(), cls, backend=b, **kw) for b, m in models.items()}
    x = torch.randn(64, 8, device=DEVICE)
    y = torch.randn(64, 4, device=DEVICE)
    for _ in range(10):
        for b, m in models.items():

            def closure(m=m, b=b):
                opts[b].zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss

            opts[b].step(closure)
    for (name, a), e in zip(models["triton"].named_parameters(), models["eager"].parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert opts["triton"].steps_taken == 10 and opts["triton"].skipped_steps == 0
