"""Global gradient norm: ``n = sqrt(sum_i ||T_i * g_i||^2)`` over a list of tensors.

``T_i = |p_i| + eta`` when ``params`` is given (ASAM, Kwon et al. 2021, eq. for the
normalisation operator with davda54/sam's eta = 0 form), else 1 (SAM, Foret et al. 2021).
Accumulation is in fp32 for fp32/bf16/fp16 inputs and the result is a 0-d fp32 tensor on the
tensors' device: no host read.
"""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops._common import TensorList, acc_dtype, pick


def grad_norm(
    grads: TensorList,
    params: TensorList | None = None,
    *,
    eta: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Global L2 norm of ``grads`` (weighted by ``|params| + eta`` if ``params`` is given).

    Returns a 0-d float32 tensor on the tensors' device (``inf``/``nan`` if any gradient is
    not finite, which is how callers detect a non-finite gradient without a host read).
    """
    if params is None:
        return pick("grad_norm", backend, ("grads",), grads)(grads, None, eta)
    return pick("grad_norm", backend, ("grads", "params"), grads, params)(grads, params, eta)


def finite_flag(grads: TensorList, *, backend: str | None = None) -> torch.Tensor:
    """0-d float32 tensor: 1.0 if every element of ``grads`` is finite, else 0.0."""
    return torch.isfinite(grad_norm(grads, backend=backend)).to(torch.float32)


@register("grad_norm", "eager")
def grad_norm_eager(grads: TensorList, params: TensorList | None, eta: float) -> torch.Tensor:
    grads = list(grads)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    if params is not None:
        weights = torch._foreach_abs(list(params))
        if eta != 0.0:
            torch._foreach_add_(weights, eta)
        # the product is rounded to the tensors' dtype (bf16/fp16: within the dtype's
        # tolerance of the fp32 product the fused backends form)
        torch._foreach_mul_(weights, grads)
        grads = weights
    norms = torch._foreach_norm(grads, 2, dtype=acc_dtype(grads))
    return torch.linalg.vector_norm(torch.stack(norms), 2)
