"""Restore: ``p_i <- b_i`` exactly (the saved copy, never ``p - e``: ``(w + e) - e != w``)."""

from __future__ import annotations

import torch

from sam_kernels._backend import register, resolve
from sam_kernels.ops._common import TensorList, check_lists


def restore_(params: TensorList, backups: TensorList, *, backend: str | None = None) -> None:
    """Copy ``backups[i]`` into ``params[i]`` bit for bit."""
    device = check_lists(("params", "backups"), params, backups)
    resolve("restore", device, backend)(params, backups)


@register("restore", "eager")
def restore_eager(params, backups) -> None:
    if params:
        torch._foreach_copy_(list(params), list(backups))
