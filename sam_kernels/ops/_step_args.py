"""The argument lists of the fused base steps (``sgd_step_``, ``adamw_step_``), named once.

Both steps take the parameters, a gradient (a list, or a :class:`LinComb` whose term lists are
combined in the pass), their own state lists and optional backups; :func:`step_lists` gives the
names, lists, written lists and tensor coefficients that :func:`sam_kernels.ops._common.pick`
validates, in one order for both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sam_kernels.ops._common import TensorList
from sam_kernels.ops.lincomb import LinComb


def step_lists(
    params: TensorList,
    grads: TensorList | LinComb,
    state: Sequence[tuple[str, TensorList | None]],
    backups: TensorList | None,
    lr: float | torch.Tensor,
    ok: torch.Tensor | None,
) -> tuple[list[str], list[TensorList], list[str], dict[str, object]]:
    """``(names, lists, outputs, scalars)``: ``params``, the gradient's lists (``grads`` or
    ``grads.terms[k]``), each ``state`` list given (``None``: absent), then ``backups``.

    Every list but the gradient's is written (``backups`` included: the step may use it as
    scratch only where it is not read again); ``lr`` and ``ok`` (and a LinComb's ``coefs``)
    are the tensor-valued coefficients checked for device and shape.
    """
    comb = isinstance(grads, LinComb)
    g_lists = grads.terms if comb else (grads,)
    names = ["params"] + ([f"grads.terms[{k}]" for k in range(len(g_lists))] if comb else ["grads"])
    lists: list[TensorList] = [params, *g_lists]
    for name, lst in (*state, ("backups", backups)):
        if lst is not None:
            names.append(name)
            lists.append(lst)
    outputs = [n for n in names if not n.startswith("grads")]  # backups: kept separate
    scalars: dict[str, object] = {"lr": lr, "ok": ok}
    if comb:
        scalars["grads.coefs"] = grads.coefs
    return names, lists, outputs, scalars
