"""Linear combination of gradient lists: ``out_i = sum_k c[k, i] * terms[k][i]``.

The gradient combinations of the SAM family are all of this form:
- CR-SAM (Wu et al. 2024), reference form: ``g = g+ + a (g+ + g- - 2 g0) + b (g+ - g-)``,
  i.e. coefficients ``(1 + a + b, a - b, -2a)`` on ``(g+, g-, g0)``; the paper form divides
  ``a`` and ``b`` by loss differences computed on the device.
- Frob-SAM (Tahmasebi et al. 2024): ``g = g0 + k_i (cross/(n-1) - (Lsum/n) gsum/(n-1))``.
- Trace/Det-SAM: ``acc += c (g_i - g0)`` and ``g = g0 + lam phi'(x) acc``.
Coefficients live on the device (shape ``[K]``, or ``[K, n]`` for per-tensor values such as
per-group rho), so loss-dependent coefficients need no host read. ``out`` may alias any term.

The step ops (:mod:`sgd_step`, :mod:`adamw_step`) accept a :class:`LinComb` as their gradient,
which lets fused backends compute the combination inside the step's single pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sam_kernels._backend import register
from sam_kernels.ops._common import TensorList, per_tensor, pick
from sam_kernels.ops._declare import declare, run


@dataclass(frozen=True)
class LinComb:
    """A gradient given as ``sum_k coefs[k] * terms[k]`` (not materialised)."""

    terms: tuple[TensorList, ...]
    coefs: torch.Tensor  # float32, [K] or [K, n], on the tensors' device

    def __post_init__(self) -> None:
        if self.coefs.dim() not in (1, 2) or self.coefs.shape[0] != len(self.terms):
            raise ValueError(
                f"coefs has shape {tuple(self.coefs.shape)}; expected [K] or [K, n] with "
                f"K = {len(self.terms)} terms"
            )

    def __len__(self) -> int:
        return len(self.terms[0])


def lincomb_(
    out: TensorList,
    terms: tuple[TensorList, ...] | list[TensorList],
    coefs: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """``out[i] = sum_k coefs[k(, i)] * terms[k][i]`` (fp32 math in fused backends; the
    declared op ``torch.ops.sam_kernels.lincomb_`` takes the term lists one after another)."""
    run(DECLARED, backend, out, LinComb(tuple(terms), coefs))


def _choose(backend, out, comb: LinComb):
    names = ("out",) + tuple(f"terms[{k}]" for k in range(len(comb.terms)))
    return pick(
        "lincomb", backend, names, out, *comb.terms, outputs=("out",),
        scalars={"coefs": comb.coefs},
    )  # fmt: skip


def _to_schema(out, comb: LinComb) -> tuple:
    return out, [t for term in comb.terms for t in term], comb.coefs


def _from_schema(out, flat, coefs) -> tuple:
    n, k = len(out), coefs.shape[0]
    return out, LinComb(tuple(flat[j * n : (j + 1) * n] for j in range(k)), coefs)


def materialize(comb: LinComb | TensorList) -> list[torch.Tensor]:
    """Eager value of a gradient argument: the list itself, or its combination (new tensors)."""
    if not isinstance(comb, LinComb):
        return list(comb)
    return _combine(comb)


def _combine(comb: LinComb) -> list[torch.Tensor]:
    """``sum_k c_k * terms[k]`` as a new list, in a fixed number of foreach ops."""
    n = len(comb)
    acc: list[torch.Tensor] = []
    for k, term in enumerate(comb.terms):  # K is 2 or 3: the loop does not grow with tensors
        c = per_tensor(comb.coefs[k], n)
        if k == 0:
            acc = torch._foreach_mul(list(term), c)
        else:
            torch._foreach_add_(acc, torch._foreach_mul(list(term), c))
    return acc


@register("lincomb", "eager")
def lincomb_eager(out: TensorList, comb: LinComb) -> None:
    if len(out):
        torch._foreach_copy_(list(out), _combine(comb))


DECLARED = declare(
    "lincomb",
    "lincomb_(Tensor(a!)[] out, Tensor[] terms, Tensor coefs, str? backend=None) -> ()",
    _choose,
    to_schema=_to_schema,
    from_schema=_from_schema,
)
