"""Triton ``sgd_step``: restore + gradient combination + SGD(-momentum) step in one pass.

Per element it reads ``w`` (the backup when given, else the parameter), the gradient (or the
``K`` terms of a :class:`LinComb`, combined in fp32 in the pass) and the momentum buffer, and
writes the parameter and the buffer: ``torch.optim.SGD``'s update, with the "first step"
coefficient from the tensor's device step counter. The finite flag ``ok`` (device 0-d) gates
everything: with ``ok == 0`` the parameter gets ``w`` and buffers keep their values. The step
counters are bumped by ``ok`` in a second, one-program launch after the step (every program of a
tensor reads its counter, so the kernel itself cannot write it without a race).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_kernels._backend import register
from sam_kernels.ops._step_args import SgdHyper
from sam_kernels.triton._launch import (
    NUM_WARPS,
    bump_steps,
    check_steps,
    device_guard,
    device_scalar,
    ldf,
    load_ok,
    locate,
    plan,
    row,
    sptr,
    st,
    tptr,
)
from sam_kernels.triton.lincomb import comb, grad_terms, term_coefs, term_dtypes, term_ptrs


@triton.jit
def _sgd_body(
    pp, wp, mp, g0, g1, g2, g3, c0, c1, c2, c3, offs, rem, go, neg_lr, wd, momentum, mcoef,
    K: tl.constexpr, HAS_COEF: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, DT_P: tl.constexpr, DT_M: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    w = ldf(wp, offs, rem, MASKED)
    g = comb(g0, g1, g2, g3, c0, c1, c2, c3, offs, rem, K, HAS_COEF, MASKED)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + wd * w
    if HAS_MOM:
        buf = ldf(mp, offs, rem, MASKED)
        nb = buf * momentum + g * mcoef
        if NESTEROV:
            d = g + momentum * nb
        else:
            d = nb
        st(mp, offs, rem, tl.where(go, nb, buf), DT_M, MASKED)
    else:
        d = g
    st(pp, offs, rem, tl.where(go, w + d * neg_lr, w), DT_P, MASKED)


@triton.jit
def _sgd_kernel(
    table, n, ok_ptr, lr_ptr, coef_ptr, csk, csi, neg_lr, wd, momentum, dampening, one_m_damp,
    NROW: tl.constexpr, K: tl.constexpr, R_M: tl.constexpr, R_B: tl.constexpr,
    HAS_OK: tl.constexpr, LR_PTR: tl.constexpr, HAS_COEF: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
    DT_P: tl.constexpr, DT_M: tl.constexpr, DT_B: tl.constexpr,
    DT_G0: tl.constexpr, DT_G1: tl.constexpr, DT_G2: tl.constexpr, DT_G3: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Rows: 0 params, 1..K gradient terms, R_M buffers, R_B backups (if R_B > 0), then the
    step counters (with momentum)."""
    t, start, rem = locate(table, n, NROW, CHUNK)
    pp = tptr(table, n, 0, t, start, DT_P, ALIGNED)
    g0, g1, g2, g3 = term_ptrs(table, n, 1, t, start, K, DT_G0, DT_G1, DT_G2, DT_G3, ALIGNED)
    c0, c1, c2, c3 = term_coefs(coef_ptr, csk, csi, row(table, n, NROW + 1, t), K, HAS_COEF)
    wp = pp
    if R_B > 0:
        wp = tptr(table, n, R_B, t, start, DT_B, ALIGNED)
    mp = pp
    mcoef = 1.0
    if HAS_MOM:
        mp = tptr(table, n, R_M, t, start, DT_M, ALIGNED)
        step = tl.load(sptr(table, n, NROW - 1, t))
        first = tl.maximum(1.0 - step, 0.0)  # 1 before this tensor's first step, else 0
        mcoef = first * dampening + one_m_damp
    go = load_ok(ok_ptr, HAS_OK) != 0.0
    if LR_PTR:
        neg_lr = -tl.load(lr_ptr)
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            _sgd_body(
                pp, wp, mp, g0, g1, g2, g3, c0, c1, c2, c3, offs, rem, go, neg_lr, wd,
                momentum, mcoef, K, HAS_COEF, MAXIMIZE, HAS_WD, HAS_MOM, NESTEROV, DT_P, DT_M,
                False,
            )  # fmt: skip
        else:
            _sgd_body(
                pp, wp, mp, g0, g1, g2, g3, c0, c1, c2, c3, offs, rem, go, neg_lr, wd,
                momentum, mcoef, K, HAS_COEF, MAXIMIZE, HAS_WD, HAS_MOM, NESTEROV, DT_P, DT_M,
                True,
            )  # fmt: skip


@register("sgd_step", "triton")
def sgd_step_triton(params, grads, momentum_buffers, steps, backups, hyper: SgdHyper, ok) -> None:
    lr, momentum, dampening = hyper.lr, hyper.momentum, hyper.dampening
    nesterov, weight_decay, maximize = hyper.nesterov, hyper.weight_decay, hyper.maximize
    params = list(params)
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    steps = list(steps)
    has_mom = momentum != 0.0
    check_steps(steps)
    terms, coefs, csk, csi = grad_terms(grads, n, device)
    k = len(terms)
    lists = [params, *terms]
    r_m = r_b = 0
    if has_mom:
        r_m = len(lists)
        lists.append(list(momentum_buffers))
    if backups is not None:
        r_b = len(lists)
        lists.append(list(backups))
    written = (0, r_m) if has_mom else (0,)
    pl = plan(lists, [steps] if has_mom else [], written=written, tag="sgd")
    ok_t = device_scalar(ok, device, "ok") if ok is not None else None
    lr_t = device_scalar(lr, device, "lr") if isinstance(lr, torch.Tensor) else None
    with device_guard(device):
        for g in pl.groups:
            dts = g.dtypes
            _sgd_kernel[(g.grid,)](
                g.table, g.n,
                ok_t if ok_t is not None else g.table,
                lr_t if lr_t is not None else g.table,
                coefs if coefs is not None else g.table, csk, csi,
                0.0 if lr_t is not None else -float(lr), float(weight_decay), float(momentum),
                float(dampening), 1.0 - float(dampening),
                NROW=pl.nrow, K=k, R_M=r_m, R_B=r_b,
                HAS_OK=ok_t is not None, LR_PTR=lr_t is not None, HAS_COEF=coefs is not None,
                MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0.0, HAS_MOM=has_mom,
                NESTEROV=bool(nesterov) and has_mom,
                DT_P=dts[0], DT_M=dts[r_m] if has_mom else tl.float32,
                DT_B=dts[r_b] if r_b else tl.float32, **term_dtypes(dts, 1, k),
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
            )  # fmt: skip
    pl.finish()
    bump_steps(steps, ok_t)
