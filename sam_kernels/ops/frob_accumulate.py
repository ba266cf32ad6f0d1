"""Frob-SAM accumulation (Tahmasebi et al. 2024): ``cross += L * g;  gsum += g`` in one pass.

``L`` is the loss of the current noisy sample, a 0-d device tensor (no host read). With
``init`` the sums start from zero: ``cross = 0 + L * g;  gsum = 0 + g``, written without being
read (the first sample: no zeroing pass, the same bits as zeroing then accumulating). After the
``n`` samples the gradient is ``g0 + lam/rho^2 (cross/(n-1) - (Lsum/n) gsum/(n-1))``, formed with
:func:`sam_kernels.ops.lincomb.lincomb_` or inside the base step.
"""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops._common import TensorList, pick
from sam_kernels.ops._declare import declare, run


def frob_accumulate_(
    cross: TensorList,
    gsum: TensorList,
    grads: TensorList,
    loss: torch.Tensor,
    *,
    init: bool = False,
    backend: str | None = None,
) -> None:
    """``cross[i] += loss * grads[i]``; ``gsum[i] += grads[i]`` (fp32 math in fused backends;
    ``torch.ops.sam_kernels.frob_accumulate_``). ``init``: ``cross`` and ``gsum`` are zeroed
    first (their values are not read)."""
    run(DECLARED, backend, cross, gsum, grads, loss, init)


def _choose(backend, cross, gsum, grads, loss, init):
    names = ("cross", "gsum", "grads")
    return pick(
        "frob_accumulate", backend, names, cross, gsum, grads, outputs=names[:2],
        scalars={"loss": loss},
    )  # fmt: skip


DECLARED = declare(
    "frob_accumulate",
    "frob_accumulate_(Tensor(a!)[] cross, Tensor(b!)[] gsum, Tensor[] grads, Tensor loss, "
    "bool init, str? backend=None) -> ()",
    _choose,
)


@register("frob_accumulate", "eager")
def frob_accumulate_eager(cross, gsum, grads, loss, init=False) -> None:
    if not cross:
        return
    grads = list(grads)
    if init:  # the reference: zeroed, then accumulated (0 + x: a zero's sign as the kernels')
        torch._foreach_zero_(list(cross))
        torch._foreach_zero_(list(gsum))
    torch._foreach_add_(list(cross), torch._foreach_mul(grads, loss))
    torch._foreach_add_(list(gsum), grads)
