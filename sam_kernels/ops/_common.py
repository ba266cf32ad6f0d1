"""Helpers shared by the eager (``torch._foreach_*``) reference implementations.

The eager backend is the reference every other backend is tested against, and its number of
dispatched ops per call does not grow with the number of tensors: only ``torch._foreach_*`` and a
fixed number of plain ops run, never a Python loop of per-tensor kernels.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from sam_kernels._backend import FUSED_DTYPES, resolve

TensorList = Sequence[torch.Tensor]


def check_lists(
    names: Sequence[str],
    *lists: TensorList,
    outputs: Sequence[str] = (),
    scalars: Mapping[str, object] | None = None,
) -> torch.device | None:
    """Validate an op's arguments before anything runs; returns the tensors' device.

    - equal lengths, no sparse tensors, real floating-point dtypes, one device for every
      tensor of every list (a meta tensor among real ones included): the error names the list
      and index that differ;
    - ``scalars``: the op's tensor-valued coefficients (scale, ok flag, lr, loss, LinComb
      coefficients, ...; other values are ignored) must be on the lists' device. The one
      exception, as in torch's own ops, is a one-element CPU tensor beside accelerator lists
      (a CPU ``lr`` tensor with CUDA parameters): the backends copy it. A meta coefficient
      with real lists (or the reverse) is refused. A call whose tensors are all on ``meta``
      is accepted (and does nothing);
    - ``outputs``: the names of the lists the op writes (and of state lists such as backups
      that must be separate from them): no tensor of those lists may share memory with another
      one of them (the same tensor twice, overlapping views: :func:`check_no_overlap`).
      Inputs may alias each other and the outputs.
    """
    n = len(lists[0])
    for name, lst in zip(names, lists):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, expected {n} (as {names[0]})")
    device = None
    first = ""
    for name, lst in zip(names, lists):
        for i, t in enumerate(lst):
            if t.is_sparse:
                raise ValueError(f"{name} contains a sparse tensor; SAM ops need dense tensors")
            if not t.is_floating_point():  # a complex one would be read as its real parts
                raise TypeError(
                    f"{name}[{i}] has dtype {t.dtype}; SAM ops take real floating-point tensors"
                )
            d = t.device
            if device is None:
                device, first = d, f"{name}[{i}]"
            elif d != device:
                raise ValueError(
                    f"{name}[{i}] is on {d} but {first} is on {device}: the tensors are on "
                    "different devices; one fused call takes tensors of one device"
                )
    if scalars and device is not None:
        for name, x in scalars.items():
            if isinstance(x, torch.Tensor) and x.device != device:
                host_scalar = x.device.type == "cpu" and x.numel() == 1 and device.type != "meta"
                if not host_scalar:
                    raise ValueError(
                        f"{name} is a tensor on {x.device} but the tensor lists ({first}) are on "
                        f"{device}; pass {name} on {device}"
                    )
    if outputs and device is not None and device.type != "meta":
        by_name = dict(zip(names, lists))
        check_no_overlap([(name, by_name[name]) for name in outputs if name in by_name])
    return device


def check_no_overlap(named: Sequence[tuple[str, TensorList]]) -> None:
    """Refuse tensors that share memory: the same tensor twice, or views whose bytes intersect.

    One pass over ``data_ptr`` and the strided extent of each tensor (no per-element work):
    the byte ranges ``[data_ptr, data_ptr + extent)`` sorted by start, each compared with the
    furthest-reaching range before it. Empty tensors never alias. Interleaved views
    (``x[::2]`` and ``x[1::2]``) have intersecting ranges and are refused too. An expanded
    tensor (a stride 0 over more than one element) overlaps itself and is refused. Skipped
    while torch.compile traces (no ``data_ptr`` on fake tensors).
    """
    if torch.compiler.is_compiling():
        return
    spans: list[tuple[int, int, int, int]] = []
    for k, (name, lst) in enumerate(named):
        for i, t in enumerate(lst):
            nbytes = t.nbytes
            if nbytes == 0:
                continue
            start = t.data_ptr()
            if t.is_contiguous():
                spans.append((start, start + nbytes, k, i))
                continue
            extent = 1
            for size, stride in zip(t.shape, t.stride()):
                if size > 1:
                    if stride == 0:
                        raise ValueError(
                            f"{name}[{i}] is an expanded tensor (stride 0): its elements "
                            "overlap in memory, and it is written by this op"
                        )
                    extent += (size - 1) * abs(stride)
            spans.append((start, start + extent * t.element_size(), k, i))
    if len(spans) < 2:
        return
    spans.sort()
    reach = spans[0]
    for span in spans[1:]:
        if span[0] < reach[1]:
            a, b = sorted([reach, span], key=lambda s: (s[2], s[3]))
            what = "the same memory twice" if a[:2] == b[:2] else "overlapping memory"
            raise ValueError(
                f"{named[a[2]][0]}[{a[3]}] and {named[b[2]][0]}[{b[3]}] alias ({what}): a "
                "tensor this op writes may not share memory with another written tensor (the "
                "same tensor twice, or overlapping views of one storage)"
            )
        if span[1] > reach[1]:
            reach = span


_TRUST = threading.local()


class prevalidated:  # noqa: N801 - used as a function-like context manager
    """Within this block (this thread only) the ops skip :func:`check_lists`.

    For a caller that validated its lists once and reuses them step after step (an optimizer's
    step plan): one device for every tensor, equal lengths, dense, the written lists free of
    aliasing (:func:`check_no_overlap`), tensor coefficients on the lists' device, and the
    dtypes of each index equal across the lists (the first list decides whether a fused
    backend runs). Gradients need no re-check: torch keeps ``p.grad`` on ``p``'s device, shape
    and dtype. Nothing else changes: the same implementations run.
    """

    __slots__ = ("_prev",)

    def __enter__(self) -> None:
        self._prev = getattr(_TRUST, "on", False)
        _TRUST.on = True

    def __exit__(self, *exc: object) -> None:
        _TRUST.on = self._prev


def pick(
    op: str,
    backend: str | None,
    names: Sequence[str],
    *lists: TensorList,
    outputs: Sequence[str] = (),
    scalars: Mapping[str, object] | None = None,
):
    """Validate the arguments (:func:`check_lists`) and return the implementation to run."""
    if getattr(_TRUST, "on", False):
        first = lists[0]
        device = first[0].device if len(first) else None
        fusable = all(t.dtype in FUSED_DTYPES for t in first)
        return resolve(op, device, backend, fusable)
    device = check_lists(names, *lists, outputs=outputs, scalars=scalars)
    fusable = all(t.dtype in FUSED_DTYPES for lst in lists for t in lst)
    return resolve(op, device, backend, fusable)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in some dimension order (contiguous, channels-last, any
    permutation): the layouts the fused kernels use in place (the Triton launcher's test, and
    the element order of the counter noise stream, :mod:`sam_kernels.ops.philox`)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, z) for s, z in zip(t.stride(), t.shape) if z != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def acc_dtype(tensors: TensorList) -> torch.dtype:
    """Accumulation dtype of a reduction: fp32, or fp64 when an input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def per_tensor(scalar: torch.Tensor | float, n: int) -> list | float | torch.Tensor:
    """A coefficient as ``torch._foreach_*`` takes it: a float, one 0-d tensor, or n of them."""
    if isinstance(scalar, torch.Tensor) and scalar.dim() == 1:
        if scalar.numel() != n:
            raise ValueError(f"a per-tensor coefficient has {scalar.numel()} entries, expected {n}")
        return list(scalar.unbind(0))
    return scalar


def repeat(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``[t] * n``: a 0-d device tensor in the ``TensorList`` overload of a foreach op.

    Passed alone where an op has a ``Scalar`` overload (``_foreach_add``, ``_foreach_pow``,
    ``_foreach_lerp``), a tensor is converted with ``.item()``: a host read. The list overload
    keeps it on the device.
    """
    return [t] * n


def scratch_ok(outputs: TensorList, *inputs: TensorList) -> bool:
    """Whether an op may use ``outputs`` as scratch before it has read ``inputs`` (lists of
    the same length): each input tensor has its output's dtype, and none shares a storage with
    an output (the op contract lets inputs alias outputs). Otherwise the eager op takes its
    temporary-list path, which gives the same values.

    One storage pointer per tensor; False while torch.compile traces (no pointers there).
    """
    if torch.compiler.is_compiling():
        return False
    out = {t.untyped_storage().data_ptr() for t in outputs if t.numel()}
    for lst in inputs:
        for t, o in zip(lst, outputs):
            if t.dtype != o.dtype or (t.numel() and t.untyped_storage().data_ptr() in out):
                return False
    return True


def in_place_ok(params: TensorList, grads, *others: TensorList) -> bool:
    """Whether a step's eager in-place form may run: CPU tensors of fp32/fp64 (where ATen
    takes a 0-d fp64 coefficient tensor exactly as the Python float it holds), and gradients
    (the list, or a ``LinComb``'s terms) that :func:`scratch_ok` lets it write ``params``
    before reading them. Elsewhere the formulation with temporary lists runs (on a GPU the
    caching allocator makes temporaries cheap; a CPU allocation is paid in page faults)."""
    if params[0].device.type != "cpu":
        return False
    if not all(p.dtype in (torch.float32, torch.float64) for p in params):
        return False
    g_lists = grads.terms if hasattr(grads, "terms") else (grads,)
    return scratch_ok(params, *[list(t) for t in g_lists], *[list(o) for o in others])


def pick_scalar(cond: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """0-d fp64 tensor ``a if cond else b`` (no host read): a coefficient that a foreach op
    applies as the Python float it holds."""
    return torch.where(cond, torch.tensor(a, dtype=torch.float64, device=cond.device), b)


def sanitize_(
    tensors: TensorList, ok: torch.Tensor, masks: dict[torch.dtype, torch.Tensor] | None = None
) -> None:
    """:func:`sanitize` in place: ``t = t if ok else 0`` (the bits times an integer 0 or 1).

    ``masks``: a dict the integer forms of ``ok`` are kept in, for a caller that sanitizes
    several lists (blocks) with one flag.
    """
    tensors = list(tensors)
    if not tensors:
        return
    if masks is None:
        masks = {}
    bits = []
    for t in tensors:
        idt = _BITS[t.dtype]
        if idt not in masks:
            masks[idt] = ok.to(idt)
        bits.append(t.view(idt))
    if len({b.dtype for b in bits}) == 1:
        torch._foreach_mul_(bits, masks[bits[0].dtype])
    else:
        torch._foreach_mul_(bits, [masks[b.dtype] for b in bits])


#: elements per block of the eager in-place steps on CPU tensors (256 KiB of fp32 per list):
#: the step's passes run block by block, each block's lists (5 or 6 of them, with AdamW's
#: denominator) staying in a 2 MiB L2 cache between them, so memory sees one read (and
#: write) of each list instead of one per pass. Over ResNet-50's shapes (1 thread) the SGD
#: step took 61 ms with 2^16, 69 with 2^15, 63 with 2^17, 75 with 2^18, 102 unblocked
CPU_BLOCK = 1 << 16


def cpu_blocks(lists: Sequence[TensorList], block: int | None = None):
    """Index-aligned lists of same-shaped tensors, cut into blocks of about ``block`` elements.

    Yields ``(idx, sub_lists)``: ``sub_lists[k]`` are views of ``lists[k]``, ``idx[j]`` the
    index of the tensor the j-th view comes from (for per-tensor coefficients). A tensor above
    ``block`` elements whose tensors are all contiguous is split into views of ``block``
    elements (a multiple of every vector width: the elements that ATen's vectorised loops
    handle do not change); others stay whole. Consecutive pieces are grouped up to ``block``
    elements. The number of blocks grows with the elements / ``block``, not with the tensors;
    one block when the lists are small.
    """
    block = CPU_BLOCK if block is None else block
    lists = [list(lst) for lst in lists]
    if sum(t.numel() for t in lists[0]) <= block:  # one block: the lists as they are
        yield list(range(len(lists[0]))), lists
        return
    idx: list[int] = []
    pieces: list[list[torch.Tensor]] = [[] for _ in lists]
    for i in range(len(lists[0])):
        ts = [lst[i] for lst in lists]
        if ts[0].numel() > block and all(t.is_contiguous() for t in ts):
            splits = [t.view(-1).split(block) for t in ts]
            idx.extend([i] * len(splits[0]))
            for out, sp in zip(pieces, splits):
                out.extend(sp)
        else:
            idx.append(i)
            for out, t in zip(pieces, ts):
                out.append(t)
    start, size = 0, 0
    for k in range(len(idx)):
        n = pieces[0][k].numel()
        if k > start and size + n > block:
            yield idx[start:k], [p[start:k] for p in pieces]
            start, size = k, 0
        size += n
    if idx:
        yield idx[start:], [p[start:] for p in pieces]


#: the integer dtype of each float dtype's bits (same element size)
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def sanitize(grads: TensorList, ok: torch.Tensor) -> list[torch.Tensor]:
    """``g if ok else 0`` for every tensor, with no host read: a new list, exact either way.

    ``ok`` is a 0-d float tensor holding 1.0 (every value of the step finite) or 0.0. A plain
    ``g * ok`` keeps NaN when ok == 0 (NaN * 0 = NaN). Multiplying the *bits* instead (the
    tensors viewed as integers of the same size, times an integer 0 or 1) gives the same bits
    for ok == 1 and +0.0 for ok == 0, whatever the values were: one multi-tensor integer
    multiply, a single memory pass (the former ``pow(g, ok) * ok`` took 20x longer on the CPU).
    """
    grads = list(grads)
    if not grads:
        return []
    masks: dict[torch.dtype, list[torch.Tensor]] = {}
    bits = []
    for g in grads:
        idt = _BITS[g.dtype]
        if idt not in masks:
            masks[idt] = [ok.to(idt)]
        bits.append(g.view(idt))
    if len(masks) == 1:
        out = torch._foreach_mul(bits, masks[next(iter(masks))] * len(bits))
    else:
        out = torch._foreach_mul(bits, [masks[b.dtype][0] for b in bits])
    return [o.view(g.dtype) for o, g in zip(out, grads)]


def select_(dst: TensorList, new: TensorList, ok: torch.Tensor) -> None:
    """``dst = new if ok else dst`` in place, exact either way when both sides are finite.

    ``lerp(a, b, 1) = b - (b - a) * 0 = b`` and ``lerp(a, b, 0) = a + 0 * (b - a) = a``.
    """
    if dst:
        torch._foreach_lerp_(list(dst), list(new), repeat(ok, len(dst)))
