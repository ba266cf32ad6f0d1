"""Triton ``restore``: ``p_i <- b_i`` bit for bit (a copy in the parameters' dtype)."""

from __future__ import annotations

import triton
import triton.language as tl

from sam_kernels._backend import register
from sam_kernels.triton._launch import NUM_WARPS, device_guard, ld, locate, plan, st, tptr


@triton.jit
def _restore_kernel(
    table, n,
    DT_P: tl.constexpr, DT_B: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start, rem = locate(table, n, 2, CHUNK)
    pp = tptr(table, n, 0, t, start, DT_P, ALIGNED)
    bp = tptr(table, n, 1, t, start, DT_B, ALIGNED)
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            st(pp, offs, rem, ld(bp, offs, rem, False), DT_P, False)
        else:
            st(pp, offs, rem, ld(bp, offs, rem, True), DT_P, True)


@register("restore", "triton")
def restore_triton(params, backups) -> None:
    params = list(params)
    if not params:
        return
    pl = plan([params, list(backups)], written=(0,), tag="restore")
    with device_guard(pl.device):
        for g in pl.groups:
            _restore_kernel[(g.grid,)](
                g.table, g.n, DT_P=g.dtypes[0], DT_B=g.dtypes[1],
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
            )  # fmt: skip
    pl.finish()
