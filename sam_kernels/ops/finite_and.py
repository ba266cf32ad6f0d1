"""The step's non-finite flag in one op: ``ok_out = ok * prod_i [v_i is finite]``.

Every evaluation of a SAM-family step folds its loss and its gradient norm into a device flag
(1.0: the step may be applied; 0.0: skipped), with no host read. As separate ATen ops each value
costs ``(v - v) == 0``, a cast and a product (four dispatches); here the whole product is one
op. ``values`` are one-element tensors (losses, norms) of any real dtype; integer and bool
values are finite. ``ok`` is a 0-d float32 flag, or ``None`` for 1. The result is a new 0-d
float32 tensor on the values' device.

The eager reference is the former chain itself, op for op (``finite01`` then the products in
argument order), so the compiled graph and the eager values are unchanged; the extension's CPU
op and CUDA kernel (one launch) compute the same product of 0.0/1.0 factors (bit-identical).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sam_kernels._backend import common_device, register, resolve
from sam_kernels.ops._declare import declare, run


def finite_and(
    ok: torch.Tensor | None,
    values: Sequence[torch.Tensor],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``ok * prod_i isfinite(values_i)`` as a 0-d float32 tensor (``ok=None``: 1).

    ``values``: one-element tensors on one device (``ok`` on it too). No host read. The declared
    op: ``torch.ops.sam_kernels.finite_and``.
    """
    return run(DECLARED, backend, ok, list(values))


def _choose(backend, ok, values):
    for i, v in enumerate(values):
        if v.numel() != 1:
            raise ValueError(
                f"values[{i}] has {v.numel()} elements: finite_and takes one-element tensors"
            )
    if ok is not None and (ok.dim() != 0 or not ok.is_floating_point()):
        raise ValueError(f"ok must be a 0-d floating tensor, got shape {tuple(ok.shape)}")
    device = common_device(([ok] if ok is not None else []) + list(values), "ok and values")
    return resolve("finite_and", device, backend)


def _fake(ok, values, backend=None) -> torch.Tensor:
    if ok is not None:
        return ok.new_empty((), dtype=torch.promote_types(ok.dtype, torch.float32))
    device = values[0].device if values else None
    return torch.empty((), dtype=torch.float32, device=device)


DECLARED = declare(
    "finite_and",
    "finite_and(Tensor? ok, Tensor[] values, str? backend=None) -> Tensor",
    _choose,
    fake=_fake,
)


@register("finite_and", "eager")
def finite_and_eager(ok: torch.Tensor | None, values: Sequence[torch.Tensor]) -> torch.Tensor:
    if not values:  # nothing to check: the flag as given (a new tensor, as every call's)
        return torch.ones((), dtype=torch.float32) if ok is None else ok.clone()
    for v in values:
        x = v if v.dim() == 0 else v.reshape(())
        # (x - x) == 0: 0 exactly for every finite value, NaN for inf/NaN (two ops where
        # isfinite decomposes into four)
        f = ((x - x) == 0).to(torch.float32)
        ok = f if ok is None else ok * f
    return ok
