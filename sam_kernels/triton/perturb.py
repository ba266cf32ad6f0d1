"""Triton ``perturb`` and ``noise_perturb``: the ascent step with its exact backup in one pass.

``perturb``: reads ``w`` and ``g``, writes ``b = w`` (bit for bit, parameter dtype) and
``w + s_i * T(w)^2 * g`` with ``s`` read from device memory (0-d, or one entry per tensor);
without ``save_backup``, reads ``b`` and ``g`` and writes ``w = b + s_i * T(b)^2 * g``.

``noise_perturb``: ``p = b + s_i * eps`` with ``eps`` generated in the kernel, the noise
contract of :mod:`sam_kernels.ops.philox` (:mod:`sam_kernels.triton.noise`): element ``j`` of
the concatenated list (tensors in list order) uses counter ``offset + j`` under ``seed`` (both
int64 0-d device tensors, loaded in the kernel: no host read), Triton's Philox words, Gaussian
(Box-Muller with the contract's own float32 ``log``/``cos``) or ``Uniform[-a, a]``
(``2a * tl.rand - a``); bit for bit the eager backend's and the extension's values. Launched
without FMA contraction (``enable_fp_fusion=False``), so ``b + s * eps`` is two roundings, as on
eager. The same ``(seed, offset)`` regenerates the same values; the caller advances ``offset``
(on the device) by at least the total number of elements between samples. With ``seed=None`` a
seed is drawn from torch's global CPU generator (no device read); ``offset=None`` means 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sam_kernels._backend import Declined, register
from sam_kernels.ops import philox as P
from sam_kernels.triton import noise as N
from sam_kernels.triton._launch import (
    NUM_WARPS,
    device_guard,
    device_scalar,
    ld,
    ldf,
    locate,
    per_tensor_strides,
    plan,
    row,
    st,
    tptr,
)


@triton.jit
def _start(pp, bp, offs, rem, SAVE: tl.constexpr, DT_B: tl.constexpr, MASKED: tl.constexpr):
    """The point a perturbation starts from, in fp32: the weights, saved bit for bit into the
    backups first (``SAVE``), or the backups (read only)."""
    if SAVE:
        w = ld(pp, offs, rem, MASKED)
        st(bp, offs, rem, w, DT_B, MASKED)
        return w.to(tl.float32)
    return ldf(bp, offs, rem, MASKED)


@triton.jit
def _perturb_body(
    pp, gp, bp, offs, rem, s, eta,
    ADAPTIVE: tl.constexpr, SAVE: tl.constexpr, DT_P: tl.constexpr, DT_B: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    wf = _start(pp, bp, offs, rem, SAVE, DT_B, MASKED)
    g = ldf(gp, offs, rem, MASKED)
    if ADAPTIVE:
        tw = tl.abs(wf) + eta
        u = ((tw * tw) * g) * s
    else:
        u = g * s
    st(pp, offs, rem, wf + u, DT_P, MASKED)


@triton.jit
def _perturb_kernel(
    table, n, scale_ptr, scale_stride, eta,
    ADAPTIVE: tl.constexpr, SAVE: tl.constexpr, DT_P: tl.constexpr, DT_G: tl.constexpr,
    DT_B: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start, rem = locate(table, n, 3, CHUNK)
    pp = tptr(table, n, 0, t, start, DT_P, ALIGNED)
    gp = tptr(table, n, 1, t, start, DT_G, ALIGNED)
    bp = tptr(table, n, 2, t, start, DT_B, ALIGNED)
    s = tl.load(scale_ptr + row(table, n, 4, t) * scale_stride)
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            _perturb_body(pp, gp, bp, offs, rem, s, eta, ADAPTIVE, SAVE, DT_P, DT_B, False)
        else:
            _perturb_body(pp, gp, bp, offs, rem, s, eta, ADAPTIVE, SAVE, DT_P, DT_B, True)


@register("perturb", "triton")
def perturb_triton(params, grads, backups, scale, adaptive, eta, save_backup=True) -> None:
    params = list(params)
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    scale = device_scalar(scale, device, "scale")
    stride = per_tensor_strides(scale, n)
    written = (0, 2) if save_backup else (0,)
    pl = plan([params, list(grads), list(backups)], written=written, tag="perturb")
    with device_guard(device):
        for g in pl.groups:
            _perturb_kernel[(g.grid,)](
                g.table, g.n, scale, stride, float(eta),
                ADAPTIVE=bool(adaptive), SAVE=bool(save_backup), DT_P=g.dtypes[0],
                DT_G=g.dtypes[1], DT_B=g.dtypes[2],
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
            )  # fmt: skip
    pl.finish()


# ------------------------------------------------------------------------------ noise
@triton.jit
def _noise_body(
    pp, bp, offs, rem, ctr, seed, s, a, two_a,
    NORMAL: tl.constexpr, SAVE: tl.constexpr, DT_P: tl.constexpr, DT_B: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    b = _start(pp, bp, offs, rem, SAVE, DT_B, MASKED)
    c = ctr + offs
    if NORMAL:
        eps = N.normal_eps(seed, c)
    else:
        eps = N.uniform_eps(seed, c, a, two_a)
    st(pp, offs, rem, b + eps * s, DT_P, MASKED)


@triton.jit
def _noise_kernel(
    table, n, scale_ptr, scale_stride, seed_ptr, offset_ptr, a, two_a,
    NORMAL: tl.constexpr, SAVE: tl.constexpr, DT_P: tl.constexpr, DT_B: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start, rem = locate(table, n, 2, CHUNK)
    pp = tptr(table, n, 0, t, start, DT_P, ALIGNED)
    bp = tptr(table, n, 1, t, start, DT_B, ALIGNED)
    s = tl.load(scale_ptr + row(table, n, 3, t) * scale_stride)
    seed = tl.load(seed_ptr)
    # counter of this chunk's first element: offset + (elements before tensor t) + start
    ctr = tl.load(offset_ptr) + row(table, n, 4, t) + start
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            _noise_body(pp, bp, offs, rem, ctr, seed, s, a, two_a, NORMAL, SAVE, DT_P, DT_B, False)
        else:
            _noise_body(pp, bp, offs, rem, ctr, seed, s, a, two_a, NORMAL, SAVE, DT_P, DT_B, True)


@register("noise_perturb", "triton")
def noise_perturb_triton(
    params, backups, scale, kind, half_cube_len, save_backup, seed, offset, noise
) -> None:
    params = list(params)
    n = len(params)
    if n == 0:
        return
    if noise is not None:  # the public op sends these to eager already
        raise Declined("noise given directly")
    device = params[0].device
    scale = device_scalar(scale, device, "scale")
    stride = per_tensor_strides(scale, n)
    written = (0, 1) if save_backup else (0,)
    pl = plan([params, list(backups)], written=written, tag="noise")
    seed, offset = P.stream_scalars(seed, offset, device)  # once the call is taken
    a = float(half_cube_len)
    with device_guard(device):
        for g in pl.groups:
            _noise_kernel[(g.grid,)](
                g.table, g.n, scale, stride, seed, offset, a, 2.0 * a,
                NORMAL=kind == "normal", SAVE=bool(save_backup),
                DT_P=g.dtypes[0], DT_B=g.dtypes[1],
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
                **N.LAUNCH_OPTIONS,
            )  # fmt: skip
    pl.finish()
