"""Triton ``adamw_step``: restore + gradient combination + AdamW step in one pass.

Per element it reads ``w`` (the backup when given, else the parameter), the gradient (or the
``K`` terms of a :class:`LinComb`), ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with
amsgrad), and writes the parameter and the moments: ``torch.optim.AdamW``'s update with the bias
corrections computed per program from the tensor's device step counter. ``beta^t`` is raised by
squaring in fp64 (``exp2`` is approximate on GPU and ``1 - beta2^t`` cancels at small ``t``) from
beta to 48 bits: the kernel's float arguments are fp32, so beta comes as two, its fp32 rounding
and the fp32 rounding of the rest (from the fp32 value alone, ``beta2 = 0.9999`` gave a step off
by up to 2e-4 relative at small ``t``; torch and the other backends use the fp64 beta).
``ok == 0`` leaves the moments untouched and writes ``p = w``. The step counters are bumped by
``ok`` in a second, one-program launch (see ``sgd_step``).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from sam_kernels._backend import register
from sam_kernels.ops._step_args import AdamWHyper
from sam_kernels.triton._launch import (
    NUM_WARPS,
    bump_steps,
    check_steps,
    device_guard,
    device_scalar,
    div,
    ldf,
    load_ok,
    locate,
    plan,
    row,
    sptr,
    sqrt,
    st,
    tptr,
)
from sam_kernels.triton.lincomb import comb, grad_terms, term_coefs, term_dtypes, term_ptrs


@triton.jit
def _adamw_body(
    pp, wp, mp, vp, xp, g0, g1, g2, g3, c0, c1, c2, c3, offs, rem, go,
    neg_lr, decay, lw, one_m_lw, beta2, one_m_beta2, eps, bc1, bc2,
    K: tl.constexpr, HAS_COEF: tl.constexpr, MAXIMIZE: tl.constexpr,
    LERP_SMALL: tl.constexpr, AMSGRAD: tl.constexpr,
    DT_P: tl.constexpr, DT_M: tl.constexpr, DT_V: tl.constexpr, DT_X: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    w = ldf(wp, offs, rem, MASKED)
    g = comb(g0, g1, g2, g3, c0, c1, c2, c3, offs, rem, K, HAS_COEF, MASKED)
    if MAXIMIZE:
        g = -g
    m0 = ldf(mp, offs, rem, MASKED)
    v0 = ldf(vp, offs, rem, MASKED)
    # torch.lerp(m, g, lw): m + lw * (g - m) for |lw| < 0.5, else g - (g - m) * (1 - lw)
    if LERP_SMALL:
        m = m0 + lw * (g - m0)
    else:
        m = g - (g - m0) * one_m_lw
    v = v0 * beta2 + (one_m_beta2 * g) * g
    if AMSGRAD:
        x0 = ldf(xp, offs, rem, MASKED)
        x = tl.maximum(x0, v)
        denom = div(sqrt(x), bc2) + eps
        st(xp, offs, rem, tl.where(go, x, x0), DT_X, MASKED)
    else:
        denom = div(sqrt(v), bc2) + eps
    upd = div(m, denom * bc1) * neg_lr
    st(mp, offs, rem, tl.where(go, m, m0), DT_M, MASKED)
    st(vp, offs, rem, tl.where(go, v, v0), DT_V, MASKED)
    st(pp, offs, rem, tl.where(go, w * decay + upd, w), DT_P, MASKED)


def _split(x: float) -> tuple[float, float]:
    """``(hi, lo)``: fp32 values with ``hi + lo`` equal to ``x`` to 48 bits."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


@triton.jit
def _powi(base_hi, base_lo, t):
    """``base ** t`` in fp64 for an integer-valued ``t`` in [0, 2^31) (binary powering), with
    ``base = base_hi + base_lo`` (two fp32 values, summed exactly in fp64)."""
    b = tl.cast(base_hi, tl.float32).to(tl.float64) + tl.cast(base_lo, tl.float32).to(tl.float64)
    e = t.to(tl.int32)
    r = b * 0.0 + 1.0
    for _ in range(31):
        r = tl.where((e & 1) != 0, r * b, r)
        b = b * b
        e = e >> 1
    return r


@triton.jit
def _adamw_kernel(
    table, n, ok_ptr, lr_ptr, coef_ptr, csk, csi,
    neg_lr, decay, wd, lw, one_m_lw, beta1, beta2, one_m_beta2, eps, beta1_lo, beta2_lo,
    NROW: tl.constexpr, K: tl.constexpr, R_M: tl.constexpr, R_X: tl.constexpr,
    R_B: tl.constexpr,
    HAS_OK: tl.constexpr, LR_PTR: tl.constexpr, HAS_COEF: tl.constexpr,
    MAXIMIZE: tl.constexpr, LERP_SMALL: tl.constexpr, AMSGRAD: tl.constexpr,
    DT_P: tl.constexpr, DT_M: tl.constexpr, DT_V: tl.constexpr, DT_X: tl.constexpr,
    DT_B: tl.constexpr,
    DT_G0: tl.constexpr, DT_G1: tl.constexpr, DT_G2: tl.constexpr, DT_G3: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Rows: 0 params, 1..K gradient terms, R_M exp_avg, R_M+1 exp_avg_sq, R_X max_exp_avg_sq
    (amsgrad), R_B backups (if R_B > 0), then the step counters."""
    t, start, rem = locate(table, n, NROW, CHUNK)
    pp = tptr(table, n, 0, t, start, DT_P, ALIGNED)
    g0, g1, g2, g3 = term_ptrs(table, n, 1, t, start, K, DT_G0, DT_G1, DT_G2, DT_G3, ALIGNED)
    c0, c1, c2, c3 = term_coefs(coef_ptr, csk, csi, row(table, n, NROW + 1, t), K, HAS_COEF)
    mp = tptr(table, n, R_M, t, start, DT_M, ALIGNED)
    vp = tptr(table, n, R_M + 1, t, start, DT_V, ALIGNED)
    xp = vp
    if AMSGRAD:
        xp = tptr(table, n, R_X, t, start, DT_X, ALIGNED)
    wp = pp
    if R_B > 0:
        wp = tptr(table, n, R_B, t, start, DT_B, ALIGNED)
    # the step count after this step (>= 1 even when skipped, so the corrections stay finite)
    tt = tl.load(sptr(table, n, NROW - 1, t)) + 1.0
    bc1 = (1.0 - _powi(beta1, beta1_lo, tt)).to(tl.float32)
    # fp64 square root (tl.sqrt: PTX has no approximate fp64 sqrt; sqrt_rn takes fp32 only)
    bc2 = tl.sqrt(1.0 - _powi(beta2, beta2_lo, tt)).to(tl.float32)
    go = load_ok(ok_ptr, HAS_OK) != 0.0
    if LR_PTR:
        lr = tl.load(lr_ptr)
        neg_lr = -lr
        decay = 1.0 - lr * wd
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            _adamw_body(
                pp, wp, mp, vp, xp, g0, g1, g2, g3, c0, c1, c2, c3, offs, rem, go, neg_lr, decay,
                lw, one_m_lw, beta2, one_m_beta2, eps, bc1, bc2, K, HAS_COEF, MAXIMIZE, LERP_SMALL,
                AMSGRAD, DT_P, DT_M, DT_V, DT_X, False,
            )  # fmt: skip
        else:
            _adamw_body(
                pp, wp, mp, vp, xp, g0, g1, g2, g3, c0, c1, c2, c3, offs, rem, go, neg_lr, decay,
                lw, one_m_lw, beta2, one_m_beta2, eps, bc1, bc2, K, HAS_COEF, MAXIMIZE, LERP_SMALL,
                AMSGRAD, DT_P, DT_M, DT_V, DT_X, True,
            )  # fmt: skip


@register("adamw_step", "triton")
def adamw_step_triton(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups, hyper: AdamWHyper,
    ok,
) -> None:  # fmt: skip
    lr, beta1, beta2, eps = hyper.lr, hyper.beta1, hyper.beta2, hyper.eps
    weight_decay, amsgrad, maximize = hyper.weight_decay, hyper.amsgrad, hyper.maximize
    params = list(params)
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    steps = list(steps)
    check_steps(steps)
    terms, coefs, csk, csi = grad_terms(grads, n, device)
    k = len(terms)
    lists = [params, *terms]
    r_m = len(lists)
    lists += [list(exp_avgs), list(exp_avg_sqs)]
    r_x = r_b = 0
    if amsgrad:
        r_x = len(lists)
        lists.append(list(max_exp_avg_sqs))
    if backups is not None:
        r_b = len(lists)
        lists.append(list(backups))
    written = (0, r_m, r_m + 1) + ((r_x,) if amsgrad else ())
    pl = plan(lists, [steps], written=written, tag="adamw")
    ok_t = device_scalar(ok, device, "ok") if ok is not None else None
    lr_t = device_scalar(lr, device, "lr") if isinstance(lr, torch.Tensor) else None
    lw = 1.0 - float(beta1)
    lw32 = float(np.float32(lw))
    lr_f = 0.0 if lr_t is not None else float(lr)
    (b1_hi, b1_lo), (b2_hi, b2_lo) = _split(float(beta1)), _split(float(beta2))
    with device_guard(device):
        for g in pl.groups:
            dts = g.dtypes
            _adamw_kernel[(g.grid,)](
                g.table, g.n,
                ok_t if ok_t is not None else g.table,
                lr_t if lr_t is not None else g.table,
                coefs if coefs is not None else g.table, csk, csi,
                -lr_f, 1.0 - lr_f * float(weight_decay), float(weight_decay),
                lw, 1.0 - lw32, b1_hi, b2_hi, 1.0 - float(beta2), float(eps), b1_lo, b2_lo,
                NROW=pl.nrow, K=k, R_M=r_m, R_X=r_x, R_B=r_b,
                HAS_OK=ok_t is not None, LR_PTR=lr_t is not None, HAS_COEF=coefs is not None,
                MAXIMIZE=bool(maximize), LERP_SMALL=abs(lw32) < 0.5, AMSGRAD=bool(amsgrad),
                DT_P=dts[0], DT_M=dts[r_m], DT_V=dts[r_m + 1],
                DT_X=dts[r_x] if amsgrad else tl.float32,
                DT_B=dts[r_b] if r_b else tl.float32, **term_dtypes(dts, 1, k),
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
            )  # fmt: skip
    pl.finish()
    bump_steps(steps, ok_t)
