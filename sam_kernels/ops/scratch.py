"""Per-tensor bookkeeping of a step as one op each, so that its host work does not grow with the
model's tensor count (issue 14): ``empty_like_list`` (step-local scratch shaped like a list of
tensors) and ``zero_unless_`` (a list kept when the step's flag is 1, zeroed bit for bit when 0).

The eager references are the per-tensor ATen calls (one dispatch per tensor); the extension's CPU
ops run the same loop in C++ (one dispatch per list), with the same results: the same
allocations (``preserve_format``: channels-last and permuted layouts are kept), the same bits.
CUDA tensors run on eager (the caching allocator makes an allocation cheap there).
"""

from __future__ import annotations

import torch

from sam_kernels._backend import common_device, register, resolve
from sam_kernels.ops._common import TensorList, sanitize_
from sam_kernels.ops._declare import declare, run


def empty_like_list(like: TensorList, *, backend: str | None = None) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like ``like`` (``torch.empty_like`` with
    ``preserve_format``), one op for the list. The declared op:
    ``torch.ops.sam_kernels.empty_like_list``."""
    like = list(like)
    if not like:
        return []
    return run(EMPTY_LIKE, backend, like)


def zero_unless_(tensors: TensorList, ok: torch.Tensor, *, backend: str | None = None) -> None:
    """``t = t if ok else +0`` in place for each tensor (bit for bit: a NaN or an inf becomes
    +0 when ``ok`` is 0), ``ok`` a 0-d float32 flag (1.0 or 0.0) on the tensors' device, no host
    read. The declared op: ``torch.ops.sam_kernels.zero_unless_``."""
    tensors = list(tensors)
    if tensors:
        run(ZERO_UNLESS, backend, tensors, ok)


def _choose_empty(backend, like):
    device = common_device(like, "like")
    return resolve("empty_like_list", device, backend)


def _choose_zero(backend, tensors, ok):
    if ok.dim() != 0:
        raise ValueError(f"zero_unless_ takes a 0-d ok, got shape {tuple(ok.shape)}")
    device = common_device([*tensors, ok], "tensors and ok")
    return resolve("zero_unless", device, backend)


def _empty_fake(like, backend=None) -> list[torch.Tensor]:
    return [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]


EMPTY_LIKE = declare(
    "empty_like_list",
    "empty_like_list(Tensor[] like, str? backend=None) -> Tensor[]",
    _choose_empty,
    fake=_empty_fake,
)
ZERO_UNLESS = declare(
    "zero_unless",
    "zero_unless_(Tensor(a!)[] tensors, Tensor ok, str? backend=None) -> ()",
    _choose_zero,
)


@register("empty_like_list", "eager")
def empty_like_list_eager(like: TensorList) -> list[torch.Tensor]:
    return [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]


@register("zero_unless", "eager")
def zero_unless_eager(tensors: TensorList, ok: torch.Tensor) -> None:
    sanitize_(tensors, ok)
