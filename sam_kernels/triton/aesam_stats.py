"""Triton ``aesam_stats``: squared norm, EMA mean/variance and the AE-SAM decision in one op.

Stage 1 is the norm's partial sums (:mod:`sam_kernels.triton.grad_norm`); the single final
program sums them in a fixed order, updates ``stats = [mu, var]`` (unchanged when the squared
norm is not finite) and writes the decision (int32: 1 SAM, 0 ERM, -1 non-finite) on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_kernels._backend import register
from sam_kernels.triton._launch import REDUCE_BLOCK, Fallback, device_guard, sqrt
from sam_kernels.triton.grad_norm import sum_partials, sumsq_partials


@triton.jit
def _aesam_final_kernel(
    partial, nparts, stats, out, delta, one_minus_delta, c, BLOCK: tl.constexpr
):
    # the squared norm summed in fp64, then kept in fp32 as the statistics are (a squared
    # norm beyond the fp32 range counts as non-finite, as on the eager reference)
    s = sum_partials(partial, nparts, BLOCK).to(tl.float32)
    mu0 = tl.load(stats)
    var0 = tl.load(stats + 1)
    mu = delta * mu0 + one_minus_delta * s
    d = s - mu
    var = delta * var0 + one_minus_delta * (d * d)
    use_sam = s >= mu + c * sqrt(var)
    finite = tl.abs(s) < float("inf")
    tl.store(stats, tl.where(finite, mu, mu0))
    tl.store(stats + 1, tl.where(finite, var, var0))
    dec = tl.where(finite, tl.where(use_sam, 1, 0), -1)
    tl.store(out, dec.to(tl.int32))


@register("aesam_stats", "triton")
def aesam_stats_triton(grads, stats, delta, c) -> torch.Tensor:
    grads = list(grads)
    if not stats.is_contiguous():
        raise Fallback("stats must be contiguous")
    if grads:
        partial, total, device = sumsq_partials(grads, None, 0.0, "aesam")
    else:
        device = stats.device
        partial, total = torch.zeros(1, dtype=torch.float64, device=device), 0
    out = torch.empty((), dtype=torch.int32, device=device)
    with device_guard(device):
        _aesam_final_kernel[(1,)](
            partial, total, stats, out, float(delta), 1.0 - float(delta), float(c),
            BLOCK=REDUCE_BLOCK,
        )  # fmt: skip
    return out
