"""The ascent's per-tensor scale in one op: ``scale = rho * inv``,
``inv = nan_to_num(1 / (norm + 1e-12)) [* factor]`` (and, on request, ``-scale`` too).

SAM's ascent ``e = rho * g / (||g|| + 1e-12)`` hands the fused ``perturb_`` a per-tensor scale
``rho_i / (||g|| + 1e-12)``; a non-finite norm gives a zero scale, so no non-finite value
reaches the weights (the step is skipped by its flag). ``factor`` scales every rho (GSAM's
``rho_t / rho``): a Python float (1.0: none) or a 0-d tensor. ``negated`` also returns
``-scale``, CR-SAM's ``w - e`` point. As ATen ops this is four to six dispatches; here one.

Dtypes: ``inv`` in the norm's dtype (float32, or float64 for fp64 parameters), the scale in
``rho``'s (fp64 rho for fp64 parameters). The eager reference is the former chain op for op;
the extension's CPU op and CUDA kernel (one launch) form each value with the same IEEE
operations in the same order (bit-identical); other dtypes run on eager.
"""

from __future__ import annotations

import torch

from sam_kernels._backend import common_device, register, resolve
from sam_kernels.ops._declare import declare, run

_EPS = 1e-12


def ascent_scale(
    norm: torch.Tensor,
    rho: torch.Tensor,
    factor: float | torch.Tensor = 1.0,
    *,
    negated: bool = False,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """``[rho * nan_to_num(1 / (norm + 1e-12)) * factor]``, plus its negation when ``negated``.

    ``norm``: a 0-d tensor; ``rho``: the per-tensor radii (1-d), on the norm's device. No host
    read. The declared op: ``torch.ops.sam_kernels.ascent_scale``.
    """
    return run(DECLARED, backend, norm, rho, factor, negated)


def _to_schema(norm, rho, factor, negated):
    if isinstance(factor, torch.Tensor):
        return norm, rho, factor, 1.0, negated
    return norm, rho, None, float(factor), negated


def _from_schema(norm, rho, factor_tensor, factor, negated):
    return norm, rho, factor_tensor if factor_tensor is not None else factor, negated


def _choose(backend, norm, rho, factor, negated):
    if norm.dim() != 0 or rho.dim() != 1:
        raise ValueError(
            f"ascent_scale takes a 0-d norm and a 1-d rho, got shapes {tuple(norm.shape)} and "
            f"{tuple(rho.shape)}"
        )
    extra = [factor] if isinstance(factor, torch.Tensor) else []
    device = common_device([norm, rho, *extra], "norm, rho and factor")
    return resolve("ascent_scale", device, backend)


def _fake(norm, rho, factor_tensor, factor, negated, backend=None) -> list[torch.Tensor]:
    # rho (1-d) wins the promotion against the 0-d inverse of the same (floating) category
    return [torch.empty_like(rho) for _ in range(2 if negated else 1)]


DECLARED = declare(
    "ascent_scale",
    "ascent_scale(Tensor norm, Tensor rho, Tensor? factor_tensor, float factor, bool negated, "
    "str? backend=None) -> Tensor[]",
    _choose,
    fake=_fake,
    to_schema=_to_schema,
    from_schema=_from_schema,
)


@register("ascent_scale", "eager")
def ascent_scale_eager(
    norm: torch.Tensor, rho: torch.Tensor, factor: float | torch.Tensor, negated: bool
) -> list[torch.Tensor]:
    # 1/(norm + eps), then 0 where not finite: the values of a where() on isfinite, in 3 ops
    inv = torch.nan_to_num(torch.reciprocal(norm + _EPS), nan=0.0, posinf=0.0, neginf=0.0)
    if isinstance(factor, torch.Tensor) or factor != 1.0:
        inv = inv * factor
    scale = rho * inv
    return [scale, -scale] if negated else [scale]
