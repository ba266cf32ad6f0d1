"""Triton ``grad_norm``: two-stage deterministic global norm, fp64 accumulation.

Stage 1 (one launch per dtype group): every program writes the sum of ``(T * g)^2`` over its
chunk (``T = |p| + eta`` when params are given, else 1) to its own slot of an fp64 partial-sum
buffer. Stage 2 (one program): sums the partials in a fixed order in fp64 and takes the square
root. No atomics: the same inputs give the same bits on every run. The result is a 0-d fp32
device tensor.

Values are loaded, converted to fp64 (the weighted product ``T * g`` is formed in fp64 too),
squared and summed in fp64: squares of elements above ~1.8e19 overflow fp32, and fp32 sums lose
1e-4..1e-1 relative accuracy over 10^7..10^9 elements. The norm is ``inf`` only for non-finite
inputs or a norm beyond the fp32 range (~3.4e38).
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


@triton.jit
def _wsq(gp, wp, offs, rem, eta, HAS_P: tl.constexpr, MASKED: tl.constexpr):
    g = ldf(gp, offs, rem, MASKED).to(tl.float64)
    if HAS_P:
        g = (tl.abs(ldf(wp, offs, rem, MASKED).to(tl.float64)) + eta) * g
    return g * g


@triton.jit
def sumsq_kernel(
    table, n, partial, base, eta,
    HAS_P: tl.constexpr, DT_G: tl.constexpr, DT_P: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``partial[base + pid] = sum over this program's chunk of (T * g)^2`` (fp64)."""
    NROW: tl.constexpr = 2 if HAS_P else 1
    t, start, rem = locate(table, n, NROW, CHUNK)
    gp = tptr(table, n, 0, t, start, DT_G, ALIGNED)
    wp = gp
    if HAS_P:
        wp = tptr(table, n, 1, t, start, DT_P, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            acc += _wsq(gp, wp, offs, rem, eta, HAS_P, False)
        else:
            acc += _wsq(gp, wp, offs, rem, eta, HAS_P, True)
    tl.store(partial + base + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def sum_partials(partial, nparts, BLOCK: tl.constexpr):
    """Sum of the fp64 ``partial[0:nparts]`` in a fixed order (one program), fp64."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(0, nparts, BLOCK):
        acc += tl.load(partial + j + offs, mask=j + offs < nparts, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _norm_final_kernel(partial, nparts, out, BLOCK: tl.constexpr):
    # fp64 square root (IEEE on every target), rounded once to fp32
    tl.store(out, tl.sqrt(sum_partials(partial, nparts, BLOCK)).to(tl.float32))


def sumsq_partials(grads, params, eta: float, tag: str):
    """Stage 1 over every group; returns ``(partial buffer, number of partials, device)``."""
    lists = [grads] if params is None else [grads, list(params)]
    pl = plan(lists, tag=tag)
    total = sum(g.grid for g in pl.groups)
    partial = torch.empty(max(total, 1), dtype=torch.float64, device=pl.device)
    base = 0
    with device_guard(pl.device):
        for g in pl.groups:
            sumsq_kernel[(g.grid,)](
                g.table, g.n, partial, base, float(eta),
                HAS_P=params is not None, DT_G=g.dtypes[0],
                DT_P=g.dtypes[1] if params is not None else tl.float32,
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
            )  # fmt: skip
            base += g.grid
    pl.finish()
    return partial, total, pl.device


@register("grad_norm", "triton")
def grad_norm_triton(grads, params, eta) -> torch.Tensor:
    grads = list(grads)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    partial, total, device = sumsq_partials(grads, params, eta, "norm")
    out = torch.empty((), dtype=torch.float32, device=device)
    with device_guard(device):
        _norm_final_kernel[(1,)](partial, total, out, BLOCK=REDUCE_BLOCK)
    return out
