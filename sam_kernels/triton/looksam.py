"""Triton ``looksam_project`` and ``looksam_reuse_coefs``: LookSAM's per-tensor ops.

The math and the eager reference: :mod:`sam_kernels.ops.looksam`. The values are the compiled
CPU extension's (csrc/cpu_looksam.cpp): per-tensor fp64 sums of exact fp64 products of the
fp32-converted elements, the coefficient formed in fp64 and rounded once to fp32.

Launches, per dtype group (chunk table of :mod:`sam_kernels.triton._launch`):

1. ``_partials_kernel`` over the chunks: every program writes two fp64 sums over its chunk to
   its own slots of a ``[2, chunks]`` buffer (``looksam_project``: ``<g0, gs>`` and
   ``||g0||^2``; ``looksam_reuse_coefs``: ``||g0||^2`` and ``||gv||^2``).
2. ``_coef_kernel``, one program per tensor: sums its tensor's chunk partials in chunk order
   (``PART_BLOCK`` lanes, then a fixed tree) and forms the coefficient in fp64:
   ``c = <g0, gs> / ||g0||^2`` (0 where ``||g0||^2`` is not > 0) in an fp32 ``[n]`` buffer, or
   ``alpha ||g0|| / (||gv|| + 1e-8)`` (0 where ``||gv||`` is not > 0) in row 1 of the
   ``[2, n]`` fp32 result (row 0: ones; tensors without elements keep ``1, 0``). ``alpha`` and
   the ``1e-8`` guard reach the kernel as an fp64 device tensor (a float kernel argument would
   be rounded to fp32), cached on the value: nothing moves from the host in a steady state.
3. ``_project_kernel`` (projection only), the element-wise pass:
   ``gv = fl(fl(g0 * -c) + gs)`` in fp32, rounded once to ``gv``'s dtype, launched without FMA
   contraction (``enable_fp_fusion=False``: two roundings, as the extension's). The flag ``ok``
   is loaded in the kernel (no host read): when it is 0 no element is written, so ``gv`` keeps
   its bits whatever ``g0`` and ``gs`` hold (NaN included; the stand-ins of non-contiguous
   ``gv`` hold copies of its values, copied back unchanged).

No atomics and fixed chunk shapes: the same inputs give the same bits on every run, and a
tensor's coefficient does not depend on the other tensors of the list. fp64 tensors run on the
eager reference (:class:`~sam_kernels.triton._launch.Fallback`); tensors of different dtypes at
one index are declined (the eager reference promotes them), as by the extension.

Bytes moved per element, fp32: projection 20 (g0 and gs read twice, gv written), reuse
coefficients 8; the partials are two fp64 per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_kernels._backend import Declined, register
from sam_kernels.ops.looksam import REUSE_EPS
from sam_kernels.triton._launch import (
    NUM_WARPS,
    _table,
    _to_device,
    device_guard,
    device_scalar,
    ldf,
    load_ok,
    locate,
    plan,
    row,
    st,
    tptr,
)
from sam_kernels.triton.grad_norm import sum_partials

#: lanes of the per-tensor sums of chunk partials (one program per tensor)
PART_BLOCK = 128
#: the element-wise pass rounds ``g0 * -c`` before adding ``gs`` (no FMA contraction)
_PROJECT_OPTIONS = {"enable_fp_fusion": False}


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _terms(ap, bp, offs, rem, DOT: tl.constexpr, MASKED: tl.constexpr):
    """fp64 ``(a * b, a * a)`` (``DOT``) or ``(a * a, b * b)``: exact products of the values
    converted to fp32 at load (bf16 under the interpreter), then to fp64."""
    a = ldf(ap, offs, rem, MASKED).to(tl.float64)
    b = ldf(bp, offs, rem, MASKED).to(tl.float64)
    if DOT:
        return a * b, a * a
    else:
        return a * a, b * b


@triton.jit
def _partials_kernel(
    table, n, partial, base, total,
    NROW: tl.constexpr, RA: tl.constexpr, RB: tl.constexpr, DOT: tl.constexpr,
    DT_A: tl.constexpr, DT_B: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``partial[k * total + base + pid]`` = this chunk's sum of the ``k``-th term (fp64)."""
    t, start, rem = locate(table, n, NROW, CHUNK)
    ap = tptr(table, n, RA, t, start, DT_A, ALIGNED)
    bp = tptr(table, n, RB, t, start, DT_B, ALIGNED)
    acc0 = tl.zeros([BLOCK], dtype=tl.float64)
    acc1 = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            x0, x1 = _terms(ap, bp, offs, rem, DOT, False)
        else:
            x0, x1 = _terms(ap, bp, offs, rem, DOT, True)
        acc0 += x0
        acc1 += x1
    slot = partial + base + tl.program_id(0)
    tl.store(slot, tl.sum(acc0, axis=0))
    tl.store(slot + total, tl.sum(acc1, axis=0))


@triton.jit
def _coef_kernel(
    table, n, partial, base, total, out, n_all, params,
    NROW: tl.constexpr, REUSE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program ``t``: tensor ``t``'s coefficient from its chunks' partials (fp64), in fp32 at
    ``out[i]`` (projection) or ``out[n_all + i]`` (reuse), ``i`` its index in the whole list."""
    t = tl.program_id(0)
    numel = row(table, n, NROW, t)
    i = row(table, n, NROW + 1, t)
    first = row(table, n, NROW + 3, t)
    nch = (numel + CHUNK - 1) // CHUNK
    p = partial + base + first
    s0 = sum_partials(p, nch, BLOCK)
    s1 = sum_partials(p + total, nch, BLOCK)
    if REUSE:
        # alpha ||g0|| / (||gv|| + eps), the fp64 square roots IEEE on every target
        alpha = tl.load(params)
        eps = tl.load(params + 1)
        n0 = tl.sqrt(s0)
        nv = tl.sqrt(s1)
        pos = nv > 0.0
        c = tl.where(pos, alpha * n0 / (tl.where(pos, nv, 1.0) + eps), 0.0)
        tl.store(out + n_all + i, c.to(tl.float32))
    else:
        # <g0, gs> / ||g0||^2 (fp64 division: IEEE on every target)
        pos = s1 > 0.0
        c = tl.where(pos, s0 / tl.where(pos, s1, 1.0), 0.0)
        tl.store(out + i, c.to(tl.float32))


@triton.jit
def _project_body(vp, ap, bp, offs, rem, nc, DT_V: tl.constexpr, MASKED: tl.constexpr):
    a = ldf(ap, offs, rem, MASKED)
    b = ldf(bp, offs, rem, MASKED)
    st(vp, offs, rem, a * nc + b, DT_V, MASKED)


@triton.jit
def _project_kernel(
    table, n, coef, ok_ptr,
    HAS_OK: tl.constexpr, DT_V: tl.constexpr, DT_A: tl.constexpr, DT_B: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Rows: 0 gv (written), 1 g0, 2 gs. ``gv = fl(fl(g0 * -c) + gs)``, nothing when ok == 0."""
    t, start, rem = locate(table, n, 3, CHUNK)
    # a skipped step: no element of the chunk (no iteration of the loop)
    rem = tl.where(load_ok(ok_ptr, HAS_OK) != 0.0, rem, 0)
    vp = tptr(table, n, 0, t, start, DT_V, ALIGNED)
    ap = tptr(table, n, 1, t, start, DT_A, ALIGNED)
    bp = tptr(table, n, 2, t, start, DT_B, ALIGNED)
    nc = -tl.load(coef + row(table, n, 4, t))
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            _project_body(vp, ap, bp, offs, rem, nc, DT_V, False)
        else:
            _project_body(vp, ap, bp, offs, rem, nc, DT_V, True)


# ------------------------------------------------------------------------------ host side
def _one_dtype_per_index(*lists) -> None:
    # the kernels read every list of an index in one dtype (the eager reference promotes)
    for ts in zip(*lists):
        if any(t.dtype != ts[0].dtype for t in ts):
            raise Declined("tensors of different dtypes at one index")


def _partials(pl, ra: int, rb: int, dot: bool) -> tuple[torch.Tensor, int]:
    """Launch 1 over every group: the ``[2, total]`` fp64 chunk partials and ``total``."""
    total = sum(g.grid for g in pl.groups)
    partial = torch.empty(max(2 * total, 1), dtype=torch.float64, device=pl.device)
    base = 0
    for g in pl.groups:
        _partials_kernel[(g.grid,)](
            g.table, g.n, partial, base, total,
            NROW=pl.nrow, RA=ra, RB=rb, DOT=dot, DT_A=g.dtypes[ra], DT_B=g.dtypes[rb],
            ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
        )  # fmt: skip
        base += g.grid
    return partial, total


def _coefs(pl, partial, total: int, out: torch.Tensor, n_all: int, params, reuse: bool) -> None:
    """Launch 2 over every group: one program per tensor with elements."""
    base = 0
    for g in pl.groups:
        _coef_kernel[(g.n,)](
            g.table, g.n, partial, base, total, out, n_all, params,
            NROW=pl.nrow, REUSE=reuse, CHUNK=g.chunk, BLOCK=PART_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
        base += g.grid


def _reuse_params(alpha: float, device: torch.device) -> torch.Tensor:
    """``[alpha, REUSE_EPS]`` as an fp64 device tensor (cached on the value)."""

    def build():
        return _to_device(torch.tensor([alpha, REUSE_EPS], dtype=torch.float64), device), 2

    return _table(("looksam-alpha", str(device), alpha), build)[0]


@register("looksam_project", "triton")
def looksam_project_triton(gv, g0, gs, ok) -> None:
    gv, g0, gs = list(gv), list(g0), list(gs)
    n = len(gv)
    if n == 0:
        return
    _one_dtype_per_index(gv, g0, gs)
    device = gv[0].device
    pl = plan([gv, g0, gs], written=(0,), tag="looksam-project")
    ok_t = device_scalar(ok, device, "ok") if ok is not None else None
    if not pl.groups:
        return
    coef = torch.empty(n, dtype=torch.float32, device=device)
    with device_guard(device):
        partial, total = _partials(pl, 1, 2, True)
        _coefs(pl, partial, total, coef, n, coef, False)
        for g in pl.groups:
            _project_kernel[(g.grid,)](
                g.table, g.n, coef, ok_t if ok_t is not None else coef,
                HAS_OK=ok_t is not None,
                DT_V=g.dtypes[0], DT_A=g.dtypes[1], DT_B=g.dtypes[2],
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
                **_PROJECT_OPTIONS,
            )  # fmt: skip
    pl.finish()


@register("looksam_reuse_coefs", "triton")
def looksam_reuse_coefs_triton(g0, gv, alpha: float) -> torch.Tensor:
    g0, gv = list(g0), list(gv)
    n = len(g0)
    if n == 0:
        return torch.zeros((2, 0), dtype=torch.float32)
    _one_dtype_per_index(g0, gv)
    device = g0[0].device
    pl = plan([g0, gv], tag="looksam-reuse")
    # ones, then zeros: the values of tensors without elements (no program writes them)
    out = torch.zeros((2, n), dtype=torch.float32, device=device)
    out[0].fill_(1.0)
    if not pl.groups:
        return out
    params = _reuse_params(float(alpha), device)
    with device_guard(device):
        partial, total = _partials(pl, 0, 1, False)
        _coefs(pl, partial, total, out, n, params, True)
    pl.finish()
    return out
