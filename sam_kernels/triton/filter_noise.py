"""Triton ``filter_noise_perturb``: R-SAM's filter-wise noise in two launches per dtype group.

1. ``_row_coef_kernel``, one program per output unit (row) of every tensor: the row's sum of
   squares in fp64 (a fixed-order loop over ``BLOCK``-sized pieces), its square root rounded to
   fp32 (``+ eps_1d`` for 1-d and 0-d tensors, whose one row is the whole tensor), times the
   tensor's ``sigma``: ``coef[row]``, fp32, in a step-local buffer.
2. ``_filter_noise_kernel``, the chunked elementwise launch of the other ops (chunk table of
   :mod:`sam_kernels.triton._launch`): ``b = w`` (bit for bit), ``d = eps * coef[row(j)]``
   rounded to the deltas' dtype, ``p = w + d``. ``eps`` is the normal noise contract of
   :mod:`sam_kernels.ops.philox` (:func:`sam_kernels.triton.noise.normal_eps`, launched
   without FMA contraction) at counter ``offset + j`` under ``seed`` (``j``: the element's
   index in the concatenated list), the values of ``noise_perturb``, bit for bit. Seed and
   offset are loaded in the kernel: no host read.

Rows. Element ``j`` of a tensor (memory order) is in row ``j // rowlen``, so every tensor runs
with dim 0 outermost in memory: contiguous or channels-last weights in place; any other layout
(a transposed or strided view, lists whose strides differ at an index) on contiguous copies that
are copied back. Per-tensor row lengths and row offsets are a small cached int64 table (keyed
on the shapes), the row programs' table is cached on the pointers (parameters do not move
between steps): a step moves nothing from the host.

Inputs the kernels refuse (a row longer than their 32-bit in-row index, tensors on a device
they were not built for) run on the eager reference given the seed: ``z`` is still the counter
stream (computed with tensor ops), so a seeded stream does not depend on the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_kernels._backend import Declined, register
from sam_kernels.ops import philox as P
from sam_kernels.ops.filter_noise import runs_in_place, sigma_values
from sam_kernels.triton import noise as N
from sam_kernels.triton._launch import (
    GPU_BLOCK,
    INTERP_MAX_BLOCK,
    INTERP_MIN_BLOCK,
    INTERPRET,
    NUM_WARPS,
    Fallback,
    _table,
    _to_device,
    cast,
    device_guard,
    device_scalar,
    ld,
    locate,
    owner_table,
    per_tensor_strides,
    plan,
    row,
    st,
    tl_dtype,
    tptr,
)

#: rows longer than this run on the eager reference (the elementwise kernel's in-row index is
#: 32-bit)
MAX_ROWLEN = 2**31 - 2**20


@triton.jit
def _row_coef_kernel(
    table, n, meta, coef_ptr, scale_ptr, scale_stride, eps1d,
    DT_P: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``coef[rowbase + r] = sigma * (sqrt(sum of squares of row r) (+ eps1d for 1-d))``.

    ``table``: row 0 the tensors' data pointers, row 1 their index in the whole list, row 2
    their first program, then one tensor slot per program. ``meta``: per whole-list index
    ``(rowlen, rowbase, is_1d)``.
    """
    pid = tl.program_id(0)
    t = tl.load(table + 3 * n + pid)
    i = tl.load(table + n + t)
    r = pid - tl.load(table + 2 * n + t)
    rowlen = tl.load(meta + 3 * i)
    rowbase = tl.load(meta + 3 * i + 1)
    flat = tl.load(meta + 3 * i + 2)
    p = tl.load(table + t).to(tl.pointer_type(DT_P)) + r * rowlen
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(0, rowlen, BLOCK):
        x = tl.load(p + j + offs, mask=j + offs < rowlen, other=0.0).to(tl.float32)
        x = x.to(tl.float64)
        acc += x * x
    # fp64 square root (IEEE on every target), rounded once to fp32
    s = tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32)
    s = tl.where(flat != 0, s + eps1d, s)
    sig = tl.load(scale_ptr + i * scale_stride)
    tl.store(coef_ptr + rowbase + r, s * sig)


@triton.jit
def _filter_noise_body(
    pp, bp, dp, offs, rem, s0, rowlen, cp, ctr, seed,
    DT_P: tl.constexpr, DT_B: tl.constexpr, DT_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    w = ld(pp, offs, rem, MASKED)
    st(bp, offs, rem, w, DT_B, MASKED)
    r = (s0 + offs) // rowlen  # row of each element, relative to the chunk's first row
    if MASKED:
        c = tl.load(cp + r, mask=offs < rem, other=0.0)
    else:
        c = tl.load(cp + r)
    d = cast(N.normal_eps(seed, ctr + offs) * c, DT_D)
    st(dp, offs, rem, d, DT_D, MASKED)
    st(pp, offs, rem, w.to(tl.float32) + d.to(tl.float32), DT_P, MASKED)


@triton.jit
def _filter_noise_kernel(
    table, n, meta, coef_ptr, seed_ptr, offset_ptr,
    DT_P: tl.constexpr, DT_B: tl.constexpr, DT_D: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start, rem = locate(table, n, 3, CHUNK)
    pp = tptr(table, n, 0, t, start, DT_P, ALIGNED)
    bp = tptr(table, n, 1, t, start, DT_B, ALIGNED)
    dp = tptr(table, n, 2, t, start, DT_D, ALIGNED)
    i = row(table, n, 4, t)
    rowlen = tl.load(meta + 3 * i)
    r0 = start // rowlen
    # the chunk's coefficients from its first row on; in-row index in 32 bits
    cp = coef_ptr + tl.load(meta + 3 * i + 1) + r0
    s0 = (start - r0 * rowlen).to(tl.int32)
    rowlen = rowlen.to(tl.int32)
    seed = tl.load(seed_ptr)
    # counter of this chunk's first element: offset + (elements before tensor t) + start
    ctr = tl.load(offset_ptr) + row(table, n, 5, t) + start
    for j in range(0, rem, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        if j + BLOCK <= rem:
            _filter_noise_body(
                pp, bp, dp, offs, rem, s0, rowlen, cp, ctr, seed, DT_P, DT_B, DT_D, False
            )
        else:
            _filter_noise_body(
                pp, bp, dp, offs, rem, s0, rowlen, cp, ctr, seed, DT_P, DT_B, DT_D, True
            )


# ------------------------------------------------------------------------------ host side
def _work_lists(params, backups, deltas):
    """The three lists with every index the kernels cannot use in place replaced by contiguous
    copies; returns ``(lists, writeback pairs)``."""
    lists = [params, backups, deltas]
    work = [list(lst) for lst in lists]
    back: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(len(params)):
        ts = [lst[i] for lst in lists]
        if runs_in_place(*ts):
            continue
        for k, t in enumerate(ts):
            c = t.contiguous() if k == 0 else torch.empty(t.shape, dtype=t.dtype, device=t.device)
            work[k][i] = c
            back.append((t, c))
    return work, back


def _shape_meta(shapes, device):
    """``(meta table, rows per tensor, total rows)``; meta: ``(rowlen, rowbase, is_1d)`` per
    tensor (cached on the shapes)."""
    rows, lens, flat = [], [], []
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            rows.append(0)
            lens.append(1)
        elif len(shape) > 1:
            rows.append(shape[0])
            lens.append(numel // shape[0])
        else:
            rows.append(1)
            lens.append(numel)
        flat.append(1 if len(shape) <= 1 else 0)
    if max(lens) > MAX_ROWLEN:
        raise Fallback("a row longer than the kernels' 32-bit in-row index")
    bases, acc = [], 0
    for r in rows:
        bases.append(acc)
        acc += r

    def build():
        vals = [v for trip in zip(lens, bases, flat) for v in trip]
        return _to_device(torch.tensor(vals, dtype=torch.int64), device), acc

    meta, total = _table(("fnoise-meta", str(device), tuple(shapes)), build)
    return meta, rows, lens, total


def _row_groups(params, rows, lens):
    """Per params dtype: ``(tl dtype, table, tensors, programs, BLOCK)`` of the row kernel."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if rows[i]:
            by_dtype.setdefault(p.dtype, []).append(i)
    out = []
    for dtype, idx in by_dtype.items():
        device = params[idx[0]].device
        ptrs = tuple(params[i].data_ptr() for i in idx)
        nrows = tuple(rows[i] for i in idx)
        if INTERPRET:
            longest = max(lens[i] for i in idx)
            block = min(INTERP_MAX_BLOCK, max(INTERP_MIN_BLOCK, triton.next_power_of_2(longest)))
        else:
            block = GPU_BLOCK

        def build(ptrs=ptrs, nrows=nrows, idx=idx, device=device):
            return owner_table(list(ptrs) + list(idx), list(nrows), device)

        key = ("fnoise-rows", str(device), str(dtype), ptrs, tuple(idx), nrows)
        table, grid = _table(key, build)
        out.append((tl_dtype(params[idx[0]]), table, len(idx), grid, block))
    return out


def _sigma_tensor(sigma, n: int, device: torch.device) -> torch.Tensor:
    """``sigma`` as a 0-d or ``[n]`` fp32 device tensor (floats: cached on their values)."""
    if isinstance(sigma, torch.Tensor):
        return device_scalar(sigma, device, "sigma")
    vals = sigma_values(sigma)

    def build():
        t = torch.tensor(vals[0] if len(vals) == 1 else vals, dtype=torch.float32)
        return _to_device(t, device), len(vals)

    return _table(("fnoise-sigma", str(device), vals), build)[0]


@register("filter_noise_perturb", "triton")
def filter_noise_perturb_triton(
    params, backups, deltas, sigma, seed, offset, eps_1d, noise
) -> None:
    params = list(params)
    n = len(params)
    if n == 0:
        return
    if noise is not None:  # the public op sends these to eager already
        raise Declined("noise given directly")
    device = params[0].device
    sig = _sigma_tensor(sigma, n, device)
    stride = per_tensor_strides(sig, n)
    meta, rows, lens, total = _shape_meta([tuple(p.shape) for p in params], device)
    for p in params:  # before any copy is made
        tl_dtype(p)
    work, back = _work_lists(params, list(backups), list(deltas))
    pl = plan(work, written=(0, 1, 2), tag="fnoise")
    row_groups = _row_groups(work[0], rows, lens)
    seed, offset = P.stream_scalars(seed, offset, device)  # once the call is taken
    if not pl.groups:
        return
    coef = torch.empty(total, dtype=torch.float32, device=device)
    with device_guard(device):
        # every row coefficient is written before the elementwise launch reads it (stream order)
        for dt, table, tn, grid, block in row_groups:
            _row_coef_kernel[(grid,)](
                table, tn, meta, coef, sig, stride, float(eps_1d),
                DT_P=dt, BLOCK=block, num_warps=NUM_WARPS,
            )  # fmt: skip
        for g in pl.groups:
            _filter_noise_kernel[(g.grid,)](
                g.table, g.n, meta, coef, seed, offset,
                DT_P=g.dtypes[0], DT_B=g.dtypes[1], DT_D=g.dtypes[2],
                ALIGNED=g.aligned, CHUNK=g.chunk, BLOCK=g.block, num_warps=NUM_WARPS,
                **N.LAUNCH_OPTIONS,
            )  # fmt: skip
    pl.finish()
    for dst, src in back:
        dst.copy_(src)
