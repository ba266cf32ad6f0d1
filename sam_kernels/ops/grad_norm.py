"""Global gradient norm: ``n = sqrt(sum_i ||T_i * g_i||^2)`` over a list of tensors.

``T_i = |p_i| + eta`` when ``params`` is given (ASAM, Kwon et al. 2021, eq. for the
normalisation operator with davda54/sam's eta = 0 form), else 1 (SAM, Foret et al. 2021).

Accuracy. Every backend squares and sums in fp64, whatever the tensors' dtype, so the norm is
finite and accurate (relative error ~1e-15 before the final rounding) for every finite input:
elements up to the fp32 maximum (whose squares overflow fp32 from about 1.8e19), mixes of tiny
and huge values, and tensors of billions of elements (an fp32 sum is off by 1e-4..1e-1 from a
few million elements on). The weighted product ``T * g`` is formed in fp64 (the compiled
extension: fp32), never rounded to bf16/fp16. The result is a 0-d fp32 tensor on the tensors'
device (fp64 when an input is fp64): no host read. It is ``inf``/``nan`` when some element is
not finite, and also (the one finite case) when the true norm exceeds the fp32 range (about
3.4e38).
"""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops._common import TensorList, acc_dtype, pick
from sam_kernels.ops._declare import declare, run


def grad_norm(
    grads: TensorList,
    params: TensorList | None = None,
    *,
    eta: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Global L2 norm of ``grads`` (weighted by ``|params| + eta`` if ``params`` is given).

    Returns a 0-d float32 tensor on the tensors' device (``inf``/``nan`` if any gradient is
    not finite, which is how callers detect a non-finite gradient without a host read; also
    ``inf`` for a finite input whose norm exceeds the fp32 range, about 3.4e38). The declared
    op: ``torch.ops.sam_kernels.grad_norm``.
    """
    return run(DECLARED, backend, grads, params, eta)


def _choose(backend, grads, params, eta):
    if params is None:
        return pick("grad_norm", backend, ("grads",), grads)
    return pick("grad_norm", backend, ("grads", "params"), grads, params)


def _fake(grads, params, eta, backend=None) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    dtype = acc_dtype(list(grads) + list(params or []))
    return grads[0].new_empty((), dtype=dtype)


DECLARED = declare(
    "grad_norm",
    "grad_norm(Tensor[] grads, Tensor[]? params, float eta, str? backend=None) -> Tensor",
    _choose,
    fake=_fake,
)


def finite_flag(grads: TensorList, *, backend: str | None = None) -> torch.Tensor:
    """0-d float32 tensor: 1.0 if every element of ``grads`` is finite, else 0.0.

    Read from the (fp64-accumulated) norm: also 0.0 for finite gradients whose norm exceeds the
    fp32 range (about 3.4e38).
    """
    n = grad_norm(grads, backend=backend)
    return ((n - n) == 0).to(torch.float32)  # x - x: 0 when finite, NaN otherwise (2 ops)


#: elements per fp64 temporary of the eager norm (32 MiB): large tensors are reduced in pieces
#: of this size, so the fp64 conversion never holds more than one piece per tensor (a whole
#: 2^31-element tensor would need 16 GiB), and each temporary is large enough to be mmap'ed
#: and returned (smaller ones fragmented the CPU heap)
PIECE = 1 << 22
#: elements of the fp64 scratch of the eager plain norm on CPU tensors (1 MiB): the gradients
#: are converted into it a block at a time and each block reduced while it is in the L2
#: cache; one buffer for the whole call, where a fresh 32 MiB temporary per piece was written
#: to memory and page-faulted afresh every time (2-3x slower over ResNet-50's gradients)
CPU_BLOCK = 1 << 17
#: elements converted to fp64 at once by the eager weighted (ASAM) norm (128 MiB)
BATCH = 1 << 24


def _pieces(tensors: TensorList) -> list[torch.Tensor]:
    """The tensors, with those above :data:`PIECE` elements flattened and split into views."""
    out: list[torch.Tensor] = []
    for t in tensors:
        if t.numel() > PIECE:
            out.extend(t.reshape(-1).split(PIECE))
        else:
            out.append(t)
    return out


@register("grad_norm", "eager")
def grad_norm_eager(grads: TensorList, params: TensorList | None, eta: float) -> torch.Tensor:
    grads = list(grads)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    out_dtype = acc_dtype(grads if params is None else grads + list(params))
    if params is None and grads[0].device.type == "cpu":
        return _cpu_norm(grads).to(out_dtype)
    gs = _pieces(grads)
    if params is None:
        # fp64 accumulation: torch's fp32 CPU reduction is off by 1e-4..1e-1 on tensors of
        # 10^7..10^9 elements, and squares of elements above ~1.8e19 overflow fp32
        norms = torch._foreach_norm(gs, 2, dtype=torch.float64)
    else:
        # T * g in fp64 (never rounded to bf16/fp16, never overflowing), in batches of at most
        # BATCH elements. The one per-tensor loop of this module: a conversion per parameter
        # (no foreach op changes dtype); the rest is a fixed number of foreach ops per batch.
        ps = _pieces(params)
        norms = []
        i = 0
        while i < len(ps):
            j, size = i + 1, ps[i].numel()
            while j < len(ps) and size + ps[j].numel() <= BATCH:
                size += ps[j].numel()
                j += 1
            weights = [p.to(torch.float64, copy=True) for p in ps[i:j]]
            torch._foreach_abs_(weights)
            if eta != 0.0:
                torch._foreach_add_(weights, eta)
            torch._foreach_mul_(weights, gs[i:j])
            norms.extend(torch._foreach_norm(weights, 2))
            i = j
    return torch.linalg.vector_norm(torch.stack(norms), 2).to(out_dtype)


def _cpu_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """fp64 norm of CPU tensors through one :data:`CPU_BLOCK`-element fp64 scratch buffer.

    The tensors (those above the block size split into views of it) are copied into the
    scratch in batches that fill it, one ``_foreach_copy_`` (the fp64 conversion) and one
    ``vector_norm`` per batch; the batches' norms are combined in fp64. A fixed number of ops
    per batch: the ops of a call grow with its elements / CPU_BLOCK, not with its tensors.
    """
    parts: list[torch.Tensor] = []  # 1-D where the tensor allows (no view per block then)
    for t in grads:
        n = t.numel()
        if not n:
            continue
        if t.is_contiguous() or n > CPU_BLOCK:  # reshape: a view, or (strided) a copy
            flat = t.reshape(-1)
            parts.extend(flat.split(CPU_BLOCK) if n > CPU_BLOCK else (flat,))
        else:
            parts.append(t)
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    scratch = torch.empty(CPU_BLOCK, dtype=torch.float64)
    norms = []
    i = 0
    while i < len(parts):
        j, size = i + 1, parts[i].numel()
        while j < len(parts) and size + parts[j].numel() <= CPU_BLOCK:
            size += parts[j].numel()
            j += 1
        if j == i + 1:
            views = (scratch[:size],)
        else:
            views = scratch[:size].split([t.numel() for t in parts[i:j]])
        dst = [v if t.dim() == 1 else v.view(t.shape) for v, t in zip(views, parts[i:j])]
        torch._foreach_copy_(dst, parts[i:j])
        norms.append(torch.linalg.vector_norm(scratch[:size]))
        i = j
    return torch.linalg.vector_norm(torch.stack(norms))
