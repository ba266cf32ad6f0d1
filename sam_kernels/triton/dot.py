"""Triton ``dot``: two-stage deterministic global inner product, fp64 products and sums.

Stage 1 (one launch per dtype group, over the 2-row chunk table ``a``, ``b``): every program
writes ``sum over its chunk of a * b`` to its own slot of an fp64 partial-sum buffer; each
element is converted to fp64 before the multiply (exact for fp32, bf16 and fp16 inputs).
Stage 2 (one program): :func:`sam_kernels.triton.grad_norm.sum_partials` sums the partials in a
fixed order in fp64, stored as a 0-d fp64 device tensor. No atomics: the same inputs give the
same bits on every run.

Bytes moved per element: the two inputs once (fp32: 8 B, bf16/fp16: 4 B); the partials are one
fp64 per 4096-element chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_kernels._backend import register
from sam_kernels.triton._launch import (
    NUM_WARPS,
    REDUCE_BLOCK,
    device_guard,
    ldf,
    locate,
    plan,
    tptr,
)
from sam_kernels.triton.grad_norm import sum_partials


@triton.jit
def _prod(ap, bp, offs, rem, MASKED: tl.constexpr):
    # loaded and converted to fp32 at once (bf16 under the interpreter), then fp64: exact
    return ldf(ap, offs, rem, MASKED).to(tl.float64) * ldf(bp, offs, rem, MASKED).to(tl.float64)


@triton.jit
def _dot_kernel(
    table, n, partial, base,
    DT_A: tl.constexpr, DT_B: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``partial[base + pid] = sum over this program's chunk of a * b`` (fp64)."""
    t, start, rem = locate(table, n, 2, CHUNK)
    ap = tptr(table, n, 0, t, start, DT_A, ALIGNED)
    bp = tptr(table, n, 1, t, start, DT_B, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            acc += _prod(ap, bp, offs, rem, False)
        else:
            acc += _prod(ap, bp, offs, rem, True)
    tl.store(partial + base + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _dot_final_kernel(partial, nparts, out64, BLOCK: tl.constexpr):
    tl.store(out64, sum_partials(partial, nparts, BLOCK))


@register("dot", "triton")
def dot_triton(a, b) -> torch.Tensor:
    a, b = list(a), list(b)
    if not a:
        return torch.zeros((), dtype=torch.float64)
    pl = plan([a, b], tag="dot")
    total = sum(g.grid for g in pl.groups)
    partial = torch.empty(max(total, 1), dtype=torch.float64, device=pl.device)
    out = torch.empty((), dtype=torch.float64, device=pl.device)
    base = 0
    with device_guard(pl.device):
        for g in pl.groups:
            _dot_kernel[(g.grid,)](
                g.table, g.n, partial, base, DT_A=g.dtypes[0], DT_B=g.dtypes[1],
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
            )  # fmt: skip
            base += g.grid
        _dot_final_kernel[(1,)](partial, total, out, BLOCK=REDUCE_BLOCK)
    pl.finish()
    return out
