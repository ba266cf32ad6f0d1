"""Shared machinery of the Triton backend: chunk tables, their cache, layouts, launch helpers.

Chunk table (one int64 tensor per launch, on the tensors' device). With ``n`` tensors in the
launch, ``R`` pointer rows and ``G`` programs, laid out flat:

```
rows 0 .. R-1      data_ptr of list r, tensor t          (elementwise lists, then 0-d lists)
row  R             numel of tensor t
row  R+1           index of tensor t in the op's whole list (per-tensor coefficients)
row  R+2           element offset of tensor t in the concatenated list (noise counters)
row  R+3           first program of tensor t (block-start prefix)
G entries          the tensor each program works on (program id -> tensor slot)
```

Program ``pid`` reads its slot ``t`` (one load), then in parallel its pointers, ``numel`` and
first program, and works on elements ``[(pid - first) * CHUNK, ... + CHUNK)`` of tensor ``t`` in
``BLOCK``-sized steps: full blocks unmasked (16-byte vector loads when every pointer of the launch
is 16-byte aligned, a ``tl.multiple_of`` hint), the tail block masked. Zero-size tensors get no
program. One launch per (device, dtypes) group, whatever the number of tensors.

Cache. Tables are keyed by everything they hold (pointers, sizes, dtypes, chunk size) and kept
in an LRU: steady-state steps reuse them and move nothing from the host. When a pointer changes
(gradients re-allocated by ``zero_grad(set_to_none=True)``, unless the caching allocator hands
back the same addresses) a new table is built on the host and sent in one pinned, non-blocking
copy: no host synchronisation.

Layouts. Elementwise ops run on memory order, so tensors that are non-overlapping and dense
with the same strides at a given index (contiguous, channels-last, permuted) are used in place.
Any other index (a strided view, mismatched layouts, expanded tensors) runs on contiguous copies
that are copied back into the written tensors after the launch (correct, slower: the table is
rebuilt for those copies each call).

Dtypes: fp32, bf16 and fp16 (math in fp32). Other dtypes (fp64, ...) raise :class:`Fallback`
and the op runs on the eager reference instead.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from sam_kernels._backend import Declined
from sam_kernels.ops._common import is_dense as _is_dense

#: kernels were decorated under the Triton interpreter (CPU tensors, test-suite)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the interpreter truncates fp32 -> bf16 stores; round to nearest even explicitly there
_ROUND_BF16 = tl.constexpr(INTERPRET)

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: GPU launch shape: CHUNK elements per program, in BLOCK steps, NUM_WARPS warps (no autotune:
#: the table layout depends on CHUNK, and fixed shapes keep reductions deterministic)
#: (``SAM_TRITON_BLOCK`` / ``SAM_TRITON_CHUNK`` / ``SAM_TRITON_WARPS`` override them, for tuning)
GPU_BLOCK = int(os.environ.get("SAM_TRITON_BLOCK", 1024))
GPU_CHUNK = int(os.environ.get("SAM_TRITON_CHUNK", 4096))
NUM_WARPS = int(os.environ.get("SAM_TRITON_WARPS", 4))
#: interpreter: one block per program, sized to the largest tensor (clamped), so that small
#: tensors do not pay for large masked blocks and large ones use few programs (~1 ms each)
INTERP_MIN_BLOCK = 64
INTERP_MAX_BLOCK = 65536
#: lanes of the single-program final reductions
REDUCE_BLOCK = 1024

_CACHE_SIZE = 256
_CACHE: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()


class Fallback(Declined):
    """The inputs are outside what the kernels handle (raised before anything is written):
    the backend chooser runs the next implementation (:class:`sam_kernels._backend.Declined`)."""


# IEEE-rounded sqrt / division (Triton >= 3.0); the plain operators are approximate on GPU
_HAS_RN_C = tl.constexpr(hasattr(tl, "sqrt_rn") and hasattr(tl, "div_rn"))


@triton.jit
def sqrt(x):
    if _HAS_RN_C:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def div(x, y):
    if _HAS_RN_C:
        return tl.div_rn(x, y)
    else:
        return x / y


# ------------------------------------------------------------------------------ jit helpers
@triton.jit
def locate(table, n, NROW: tl.constexpr, CHUNK: tl.constexpr):
    """(slot t, first element of this program's chunk, elements of the chunk) for this pid."""
    pid = tl.program_id(0)
    t = tl.load(table + (NROW + 4) * n + pid)
    first = tl.load(table + (NROW + 3) * n + t)
    numel = tl.load(table + NROW * n + t)
    start = (pid - first) * CHUNK
    rem = tl.minimum(numel - start, CHUNK).to(tl.int32)
    return t, start, rem


@triton.jit
def row(table, n, R: tl.constexpr, t):
    """Entry ``t`` of table row ``R`` (int64)."""
    return tl.load(table + R * n + t)


@triton.jit
def tptr(table, n, R: tl.constexpr, t, start, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer (to ``DT``) to element ``start`` of tensor ``t`` of list ``R``."""
    p = tl.load(table + R * n + t).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p + start


@triton.jit
def sptr(table, n, R: tl.constexpr, t):
    """Pointer to the fp32 0-d tensor ``t`` of list ``R`` (step counters)."""
    return tl.load(table + R * n + t).to(tl.pointer_type(tl.float32))


@triton.jit
def ld(p, offs, rem, MASKED: tl.constexpr):
    """Load in the tensor's dtype (for exact copies)."""
    if MASKED:
        return tl.load(p + offs, mask=offs < rem, other=0.0)
    else:
        return tl.load(p + offs)


@triton.jit
def ldf(p, offs, rem, MASKED: tl.constexpr):
    """Load and convert to fp32 at once (bf16 arithmetic is wrong under the interpreter)."""
    return ld(p, offs, rem, MASKED).to(tl.float32)


@triton.jit
def cast(x, DT: tl.constexpr):
    """``x`` in dtype ``DT``, rounding to nearest even (explicitly for bf16 in the interpreter)."""
    if x.dtype == DT:
        return x
    elif _ROUND_BF16 and DT == tl.bfloat16 and x.dtype == tl.float32:
        u = x.to(tl.uint32, bitcast=True)
        r = u + 0x7FFF + ((u >> 16) & 1)
        r = tl.where(x != x, u, r)  # NaN: keep the payload (no carry into the sign)
        return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def st(p, offs, rem, x, DT: tl.constexpr, MASKED: tl.constexpr):
    v = cast(x, DT)
    if MASKED:
        tl.store(p + offs, v, mask=offs < rem)
    else:
        tl.store(p + offs, v)


@triton.jit
def load_ok(ok_ptr, HAS_OK: tl.constexpr):
    """The finite flag (1.0 or 0.0), 1.0 when the op got none."""
    if HAS_OK:
        return tl.load(ok_ptr).to(tl.float32)
    else:
        return 1.0


@triton.jit
def _bump_steps_kernel(ptrs, n, ok_ptr, HAS_OK: tl.constexpr, BLOCK: tl.constexpr):
    """``steps[i] += ok`` for every 0-d fp32 counter (one program, no tensor-count limit)."""
    inc = load_ok(ok_ptr, HAS_OK)
    offs = tl.arange(0, BLOCK)
    for j in range(0, n, BLOCK):
        m = j + offs < n
        p = tl.load(ptrs + j + offs, mask=m, other=0).to(tl.pointer_type(tl.float32))
        s = tl.load(p, mask=m, other=0.0)
        tl.store(p, s + inc, mask=m)


# ------------------------------------------------------------------------------ host side
def device_guard(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    if device.type == "cuda" and device.index is not None:
        if device.index != torch.cuda.current_device():
            return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def tl_dtype(t: torch.Tensor):
    dt = TL_DTYPES.get(t.dtype)
    if dt is None:
        raise Fallback(f"dtype {t.dtype}")
    return dt


def block_shape(max_numel: int) -> tuple[int, int]:
    """(BLOCK, CHUNK) for a launch whose largest tensor has ``max_numel`` elements."""
    if not INTERPRET:
        return GPU_BLOCK, GPU_CHUNK
    b = min(INTERP_MAX_BLOCK, max(INTERP_MIN_BLOCK, triton.next_power_of_2(max_numel)))
    return b, b


def owner_table(
    head: list[int], counts: list[int], device: torch.device
) -> tuple[torch.Tensor, int]:
    """A launch table (int64, on ``device``) and its unit count ``s = sum(counts)``: ``head``,
    then the first unit of each item (prefix sums of ``counts``), then the owning item of each
    of the ``s`` units (item ``i`` repeated ``counts[i]`` times: the grid's chunks or rows)."""
    firsts, s = [], 0
    for c in counts:
        firsts.append(s)
        s += c
    head = head + firsts
    host = torch.empty(len(head) + s, dtype=torch.int64)
    host[: len(head)] = torch.tensor(head, dtype=torch.int64)
    # output_size given: without it repeat_interleave reads its total on the host (a
    # ``.item()`` per table build, every step where gradients moved)
    host[len(head) :] = torch.repeat_interleave(
        torch.arange(len(counts), dtype=torch.int64),
        torch.tensor(counts, dtype=torch.int64),
        output_size=s,
    )
    return _to_device(host, device), s


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _table(key: tuple, build) -> tuple[torch.Tensor, int]:
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    value = build()
    _CACHE[key] = value
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def clear_cache() -> None:
    _CACHE.clear()


@dataclass
class Group:
    """One launch: tensors of one dtype signature on one device."""

    dtypes: tuple  # tl dtype per elementwise list
    table: torch.Tensor
    n: int
    grid: int
    aligned: bool
    block: int
    chunk: int


@dataclass
class Plan:
    device: torch.device
    groups: list[Group]
    nrow: int
    writeback: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    #: contiguous work copies: the tables point into them, so they live until ``finish``
    copies: list[torch.Tensor] = field(default_factory=list)

    def finish(self) -> None:
        """Copy results of contiguous work copies back into the caller's tensors."""
        for dst, src in self.writeback:
            dst.copy_(src)
        self.copies.clear()


def plan(
    elem_lists: Sequence[Sequence[torch.Tensor]],
    ptr_lists: Sequence[Sequence[torch.Tensor]] = (),
    *,
    written: Sequence[int] = (),
    tag: str = "",
) -> Plan:
    """Group the tensors, handle layouts and build (or fetch) one chunk table per group.

    ``elem_lists``: equal-length lists processed elementwise (same numel at each index).
    ``ptr_lists``: lists of 0-d fp32 tensors whose pointers the kernel reads (step counters).
    ``written``: indices into ``elem_lists`` of the lists the kernel writes.
    Raises :class:`Fallback` (before touching anything) for unsupported inputs.
    """
    work = [list(lst) for lst in elem_lists]
    nlist = len(work)
    n_all = len(work[0])
    device = work[0][0].device if n_all else torch.device("cpu")
    if (device.type == "cpu") != INTERPRET:
        # interpreter kernels dereference table pointers on the host, compiled ones on the GPU
        raise Fallback(f"kernels were built {'for' if INTERPRET else 'without'} the interpreter")
    for lst in ptr_lists:
        check_steps(lst)
    numels = [t.numel() for t in work[0]]
    for lst in work[1:]:
        other = [t.numel() for t in lst]
        if other != numels:
            i = next(i for i, (a, b) in enumerate(zip(numels, other)) if a != b)
            raise ValueError(
                f"tensor {i} has {other[i]} elements in one list and {numels[i]} in another"
            )
    dt_rows = [[t.dtype for t in lst] for lst in work]
    if not {d for r in dt_rows for d in r} <= TL_DTYPES.keys():
        raise Fallback("dtype")
    # layouts: in place when every list is contiguous (the common case) or dense with equal
    # strides at an index; otherwise contiguous copies of the non-contiguous tensors
    writeback: list[tuple[torch.Tensor, torch.Tensor]] = []
    copies: list[torch.Tensor] = []
    if not all(t.is_contiguous() for lst in work for t in lst):
        for i in range(n_all):
            ts = [lst[i] for lst in work]
            if numels[i] <= 1 or all(t.is_contiguous() for t in ts):
                continue
            ref = ts[0].stride()
            if all(_is_dense(t) and t.stride() == ref for t in ts):
                continue
            for k in range(nlist):
                t = work[k][i]
                if not t.is_contiguous():
                    c = t.contiguous()
                    copies.append(c)
                    if k in written:
                        writeback.append((t, c))
                    work[k][i] = c
    ptr_all = [[t.data_ptr() for t in lst] for lst in work]
    ptr_all += [[s.data_ptr() for s in lst] for lst in ptr_lists]
    # element offsets in the concatenated list (noise counters)
    ebase, acc = [], 0
    for m in numels:
        ebase.append(acc)
        acc += m
    sigs = list(zip(*dt_rows))
    by_dtype: dict[tuple, list[int]] = {}
    if sigs and sigs.count(sigs[0]) == n_all:
        by_dtype[sigs[0]] = [i for i in range(n_all) if numels[i] > 0]
    else:
        for i in range(n_all):
            if numels[i] > 0:
                by_dtype.setdefault(sigs[i], []).append(i)
    nrow = nlist + len(ptr_lists)
    groups = []
    for sig, idx in by_dtype.items():
        if not idx:
            continue
        if len(idx) == n_all:
            ptr_rows = ptr_all
            g_numels, eb = numels, ebase
        else:
            ptr_rows = [[r[i] for i in idx] for r in ptr_all]
            g_numels, eb = [numels[i] for i in idx], [ebase[i] for i in idx]
        block, chunk = block_shape(max(g_numels))
        aligned = all(p % 16 == 0 for r in ptr_rows[:nlist] for p in r)
        flat = [v for r in ptr_rows for v in r]
        key = (tag, str(device), chunk, sig, nrow, tuple(flat), tuple(g_numels), tuple(idx),
               tuple(eb))  # fmt: skip

        def build(flat=flat, numels=g_numels, idx=idx, eb=eb, chunk=chunk):
            nch = [-(-m // chunk) for m in numels]
            return owner_table(flat + list(numels) + list(idx) + list(eb), nch, device)

        table, grid = _table(key, build)
        dts = tuple(TL_DTYPES[d] for d in sig)
        groups.append(Group(dts, table, len(idx), grid, aligned, block, chunk))
    return Plan(device, groups, nrow, writeback, copies)


def bump_steps(steps: Sequence[torch.Tensor], ok: torch.Tensor | None) -> None:
    """``steps[i] += ok`` (or 1) in one launch, after the step kernels read the old counts.

    A separate launch because every program of a tensor reads its counter: a write inside the
    step kernel would race with the other programs of the same tensor.
    """
    steps = list(steps)
    if not steps:
        return
    device = steps[0].device
    ptrs = tuple(s.data_ptr() for s in steps)

    def build():
        return _to_device(torch.tensor(ptrs, dtype=torch.int64), device), len(ptrs)

    table, n = _table(("steps", str(device), ptrs), build)
    with device_guard(device):
        _bump_steps_kernel[(1,)](
            table, n, ok if ok is not None else table, HAS_OK=ok is not None, BLOCK=REDUCE_BLOCK
        )


def check_steps(steps: Sequence[torch.Tensor]) -> None:
    for s in steps:
        if s.dtype != torch.float32 or s.numel() != 1:
            raise Fallback("step counters must be 1-element fp32 tensors")


def device_scalar(x, device: torch.device, what: str) -> torch.Tensor:
    """A fp32 device tensor for a coefficient given as a tensor (no host read)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor")
    if x.device != device:
        x = x.to(device, non_blocking=True)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x


def per_tensor_strides(c: torch.Tensor, n: int) -> int:
    """Stride over tensors of a 0-d or [n] coefficient (0 for one shared value)."""
    if c.dim() == 0:
        return 0
    if c.dim() == 1:
        if c.numel() != n:
            raise ValueError(f"a per-tensor coefficient has {c.numel()} entries, expected {n}")
        return c.stride(0)
    raise ValueError(f"a coefficient must be 0-d or [n], got shape {tuple(c.shape)}")
