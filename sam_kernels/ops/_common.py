"""Helpers shared by the eager (``torch._foreach_*``) reference implementations.

The eager backend is the reference every other backend is tested against, and its number of
dispatched ops per call does not grow with the number of tensors: only ``torch._foreach_*`` and a
fixed number of plain ops run, never a Python loop of per-tensor kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sam_kernels._backend import FUSED_DTYPES, common_device, resolve

TensorList = Sequence[torch.Tensor]


def check_lists(names: Sequence[str], *lists: TensorList) -> torch.device | None:
    """Equal lengths, no sparse tensors, one device; returns that device."""
    n = len(lists[0])
    for name, lst in zip(names, lists):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, expected {n} (as {names[0]})")
    for name, lst in zip(names, lists):
        for t in lst:
            if t.is_sparse:
                raise ValueError(f"{name} contains a sparse tensor; SAM ops need dense tensors")
    return common_device([t for lst in lists for t in lst], what=", ".join(names))


def pick(op: str, backend: str | None, names: Sequence[str], *lists: TensorList):
    """Validate the lists (:func:`check_lists`) and return the implementation to run."""
    device = check_lists(names, *lists)
    fusable = all(t.dtype in FUSED_DTYPES for lst in lists for t in lst)
    return resolve(op, device, backend, fusable)


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


def sanitize(grads: TensorList, ok: torch.Tensor) -> list[torch.Tensor]:
    """``g if ok else 0`` for every tensor, with no host read and exact for ok == 1.

    ``ok`` is a 0-d float tensor holding 1.0 (every value of the step finite) or 0.0. A plain
    ``g * ok`` keeps NaN when ok == 0 (NaN * 0 = NaN); ``pow(g, ok)`` is exactly ``g`` for
    ok == 1 and exactly 1 for ok == 0 (IEEE: pow(x, 0) = 1 even for NaN), so
    ``pow(g, ok) * ok`` is ``g`` or 0 and always finite.
    """
    if not grads:
        return []
    out = torch._foreach_pow(list(grads), repeat(ok, len(grads)))
    torch._foreach_mul_(out, ok)
    return out


def select_(dst: TensorList, new: TensorList, ok: torch.Tensor) -> None:
    """``dst = new if ok else dst`` in place, exact either way when both sides are finite.

    ``lerp(a, b, 1) = b - (b - a) * 0 = b`` and ``lerp(a, b, 0) = a + 0 * (b - a) = a``.
    """
    if dst:
        torch._foreach_lerp_(list(dst), list(new), repeat(ok, len(dst)))
