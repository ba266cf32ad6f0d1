"""The arguments of the fused base steps (``sgd_step_``, ``adamw_step_``), named once.

Both steps take the parameters, a gradient (a list, or a :class:`LinComb` whose term lists are
combined in the pass), their own state lists, optional backups, their hyper-parameters as one
frozen dataclass (:class:`SgdHyper`, :class:`AdamWHyper`: every backend takes the same object,
and the ops' ``torch.library`` schemas are generated from their fields) and the ``ok`` flag;
:func:`step_lists` gives the names, lists, written lists and tensor coefficients that
:func:`sam_kernels.ops._common.pick` validates, in one order for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sam_kernels.ops._common import TensorList
from sam_kernels.ops._declare import float_or_tensor, typed
from sam_kernels.ops.lincomb import LinComb


@dataclass(frozen=True, eq=False)
class SgdHyper:
    """``torch.optim.SGD``'s hyper-parameters of one step (``lr`` a float or a 0-d tensor)."""

    lr: float | torch.Tensor = float_or_tensor()
    momentum: float = typed("float", 0.0)
    dampening: float = typed("float", 0.0)
    nesterov: bool = typed("bool", False)
    weight_decay: float = typed("float", 0.0)
    maximize: bool = typed("bool", False)


@dataclass(frozen=True, eq=False)
class AdamWHyper:
    """``torch.optim.AdamW``'s hyper-parameters of one step (``lr`` a float or a 0-d tensor)."""

    lr: float | torch.Tensor = float_or_tensor()
    beta1: float = typed("float", 0.9)
    beta2: float = typed("float", 0.999)
    eps: float = typed("float", 1e-8)
    weight_decay: float = typed("float", 1e-2)
    amsgrad: bool = typed("bool", False)
    maximize: bool = typed("bool", False)


def grads_to_schema(grads: TensorList | LinComb) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A gradient argument as the schemas take it: the list (``coefs`` None), or a LinComb's
    term lists one after another with its ``[K]`` / ``[K, n]`` coefficients."""
    if isinstance(grads, LinComb):
        return [t for term in grads.terms for t in term], grads.coefs
    return list(grads), None


def grads_from_schema(
    flat: list[torch.Tensor], coefs: torch.Tensor | None, n: int
) -> list[torch.Tensor] | LinComb:
    """The inverse of :func:`grads_to_schema` for ``n`` parameters."""
    if coefs is None:
        return flat
    k = coefs.shape[0]
    return LinComb(tuple(flat[j * n : (j + 1) * n] for j in range(k)), coefs)


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
