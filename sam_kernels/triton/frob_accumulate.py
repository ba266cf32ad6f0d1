"""Triton ``frob_accumulate``: ``cross += L * g;  gsum += g`` in one pass, ``L`` on the device
(``INIT``: from zero, ``cross`` and ``gsum`` written without being read)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_kernels._backend import register
from sam_kernels.triton._launch import (
    NUM_WARPS,
    device_guard,
    device_scalar,
    ldf,
    locate,
    plan,
    st,
    tptr,
)


@triton.jit
def _frob_body(
    cp, sp, gp, offs, rem, loss,
    INIT: tl.constexpr, DT_C: tl.constexpr, DT_S: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    g = ldf(gp, offs, rem, MASKED)
    if INIT:
        c0 = tl.zeros_like(g)
        s0 = tl.zeros_like(g)
    else:
        c0 = ldf(cp, offs, rem, MASKED)
        s0 = ldf(sp, offs, rem, MASKED)
    st(cp, offs, rem, c0 + g * loss, DT_C, MASKED)
    st(sp, offs, rem, s0 + g, DT_S, MASKED)


@triton.jit
def _frob_kernel(
    table, n, loss_ptr,
    INIT: tl.constexpr, DT_C: tl.constexpr, DT_S: tl.constexpr, DT_G: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start, rem = locate(table, n, 3, CHUNK)
    cp = tptr(table, n, 0, t, start, DT_C, ALIGNED)
    sp = tptr(table, n, 1, t, start, DT_S, ALIGNED)
    gp = tptr(table, n, 2, t, start, DT_G, ALIGNED)
    loss = tl.load(loss_ptr)
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            _frob_body(cp, sp, gp, offs, rem, loss, INIT, DT_C, DT_S, False)
        else:
            _frob_body(cp, sp, gp, offs, rem, loss, INIT, DT_C, DT_S, True)


@register("frob_accumulate", "triton")
def frob_accumulate_triton(cross, gsum, grads, loss, init=False) -> None:
    cross = list(cross)
    if not cross:
        return
    device = cross[0].device
    if not isinstance(loss, torch.Tensor):
        loss = torch.tensor(float(loss))
    loss = device_scalar(loss.reshape(()), device, "loss")
    pl = plan([cross, list(gsum), list(grads)], written=(0, 1), tag="frob")
    with device_guard(device):
        for g in pl.groups:
            _frob_kernel[(g.grid,)](
                g.table, g.n, loss, INIT=bool(init), DT_C=g.dtypes[0], DT_S=g.dtypes[1],
                DT_G=g.dtypes[2],
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
            )  # fmt: skip
    pl.finish()
