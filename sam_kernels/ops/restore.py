"""Restore: ``p_i <- b_i`` exactly (the saved copy, never ``p - e``: ``(w + e) - e != w``)."""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops._common import TensorList, pick
from sam_kernels.ops._declare import declare, run


def restore_(params: TensorList, backups: TensorList, *, backend: str | None = None) -> None:
    """Copy ``backups[i]`` into ``params[i]`` bit for bit (``torch.ops.sam_kernels.restore_``)."""
    run(DECLARED, backend, params, backups)


def _choose(backend, params, backups):
    # a backup sharing memory with a parameter (or with another backup) is no saved copy
    names = ("params", "backups")
    return pick("restore", backend, names, params, backups, outputs=names)


DECLARED = declare(
    "restore", "restore_(Tensor(a!)[] params, Tensor[] backups, str? backend=None) -> ()", _choose
)


@register("restore", "eager")
def restore_eager(params, backups) -> None:
    if params:
        torch._foreach_copy_(list(params), list(backups))
