"""Triton ``lincomb``: ``out_i = sum_k c[k(, i)] * terms[k][i]`` in one pass (fp32 math).

Also the gradient-combination helpers the step kernels use to form a :class:`LinComb` gradient
inside their own pass (CR-SAM's three gradients, the universal class's combinations). Up to
``MAX_TERMS`` terms; more run on the eager reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_kernels._backend import register
from sam_kernels.ops.lincomb import LinComb
from sam_kernels.triton._launch import (
    NUM_WARPS,
    Fallback,
    device_guard,
    device_scalar,
    ldf,
    locate,
    plan,
    row,
    st,
    tptr,
)

MAX_TERMS = 4


# ------------------------------------------------------------------------------ jit helpers
@triton.jit
def term_ptrs(
    table, n, R0: tl.constexpr, t, start, K: tl.constexpr,
    DT0: tl.constexpr, DT1: tl.constexpr, DT2: tl.constexpr, DT3: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """Pointers to the K terms of tensor ``t`` (rows ``R0 .. R0+K-1``); unused ones repeat."""
    p0 = tptr(table, n, R0, t, start, DT0, ALIGNED)
    p1 = p0
    p2 = p0
    p3 = p0
    if K > 1:
        p1 = tptr(table, n, R0 + 1, t, start, DT1, ALIGNED)
    if K > 2:
        p2 = tptr(table, n, R0 + 2, t, start, DT2, ALIGNED)
    if K > 3:
        p3 = tptr(table, n, R0 + 3, t, start, DT3, ALIGNED)
    return p0, p1, p2, p3


@triton.jit
def term_coefs(coef_ptr, csk, csi, orig, K: tl.constexpr, HAS_COEF: tl.constexpr):
    """The K coefficients of tensor ``orig`` (``coef[k * csk + orig * csi]``), fp32."""
    c0 = 1.0
    c1 = 1.0
    c2 = 1.0
    c3 = 1.0
    if HAS_COEF:
        c0 = tl.load(coef_ptr + orig * csi)
        if K > 1:
            c1 = tl.load(coef_ptr + csk + orig * csi)
        if K > 2:
            c2 = tl.load(coef_ptr + 2 * csk + orig * csi)
        if K > 3:
            c3 = tl.load(coef_ptr + 3 * csk + orig * csi)
    return c0, c1, c2, c3


@triton.jit
def comb(
    p0, p1, p2, p3, c0, c1, c2, c3, offs, rem,
    K: tl.constexpr, HAS_COEF: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The gradient at ``offs``: the plain term, or ``((t0*c0 + t1*c1) + t2*c2) + t3*c3``."""
    g = ldf(p0, offs, rem, MASKED)
    if HAS_COEF:
        g = g * c0
        if K > 1:
            g = g + ldf(p1, offs, rem, MASKED) * c1
        if K > 2:
            g = g + ldf(p2, offs, rem, MASKED) * c2
        if K > 3:
            g = g + ldf(p3, offs, rem, MASKED) * c3
    return g


def grad_terms(grads, n: int, device: torch.device):
    """``(term lists, coefs or None, stride over k, stride over tensors)`` of a gradient arg."""
    if not isinstance(grads, LinComb):
        return [list(grads)], None, 0, 0
    k = len(grads.terms)
    if k > MAX_TERMS:
        raise Fallback(f"{k} terms")
    coefs = device_scalar(grads.coefs, device, "coefs")
    if coefs.dim() == 1:
        csk, csi = coefs.stride(0), 0
    else:
        if coefs.shape[1] != n:
            raise ValueError(f"a per-tensor coefficient has {coefs.shape[1]} entries, expected {n}")
        csk, csi = coefs.stride()
    return [list(t) for t in grads.terms], coefs, csk, csi


def term_dtypes(dtypes: tuple, first: int, k: int) -> dict:
    out = {}
    for j in range(MAX_TERMS):
        out[f"DT_G{j}"] = dtypes[first + j] if j < k else tl.float32
    return out


# ------------------------------------------------------------------------------ kernel
@triton.jit
def _lincomb_body(
    op, p0, p1, p2, p3, c0, c1, c2, c3, offs, rem,
    K: tl.constexpr, DT_O: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    g = comb(p0, p1, p2, p3, c0, c1, c2, c3, offs, rem, K, True, MASKED)
    st(op, offs, rem, g, DT_O, MASKED)


@triton.jit
def _lincomb_kernel(
    table, n, coef_ptr, csk, csi,
    K: tl.constexpr, DT_O: tl.constexpr,
    DT_G0: tl.constexpr, DT_G1: tl.constexpr, DT_G2: tl.constexpr, DT_G3: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    NROW: tl.constexpr = 1 + K
    t, start, rem = locate(table, n, NROW, CHUNK)
    op = tptr(table, n, 0, t, start, DT_O, ALIGNED)
    p0, p1, p2, p3 = term_ptrs(table, n, 1, t, start, K, DT_G0, DT_G1, DT_G2, DT_G3, ALIGNED)
    orig = row(table, n, NROW + 1, t)
    c0, c1, c2, c3 = term_coefs(coef_ptr, csk, csi, orig, K, True)
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            _lincomb_body(op, p0, p1, p2, p3, c0, c1, c2, c3, offs, rem, K, DT_O, False)
        else:
            _lincomb_body(op, p0, p1, p2, p3, c0, c1, c2, c3, offs, rem, K, DT_O, True)


@register("lincomb", "triton")
def lincomb_triton(out, comb_: LinComb) -> None:
    out = list(out)
    n = len(out)
    if n == 0:
        return
    device = out[0].device
    terms, coefs, csk, csi = grad_terms(comb_, n, device)
    k = len(terms)
    pl = plan([out, *terms], written=(0,), tag="lincomb")
    with device_guard(device):
        for g in pl.groups:
            _lincomb_kernel[(g.grid,)](
                g.table, g.n, coefs, csk, csi,
                K=k, DT_O=g.dtypes[0], **term_dtypes(g.dtypes, 1, k),
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
            )  # fmt: skip
    pl.finish()
