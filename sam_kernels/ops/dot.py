"""Global inner product: ``<a, b> = sum_i <a_i, b_i>`` over two lists of tensors.

GSAM (Zhuang et al. 2022) needs ``<g0, g1>`` between the gradients at ``w`` and ``w + e`` for
the cosine of its surrogate gap; any two-list statistic of that form can use it.

Accuracy. The result is a 0-d **float64** tensor on the tensors' device (no host read). Every
backend multiplies and sums in fp64:

- Triton: each element is loaded, converted to fp64 and multiplied in fp64 (exact for fp32,
  bf16 and fp16 inputs: a product of two 24-bit significands fits in fp64's 53 bits), then
  summed in fp64 per program and over the programs' partials in a fixed order: no atomics, the
  same bits on every run. The only rounding is that of the fp64 sums (relative to
  ``sum_i sum |a_i b_i|``: ~1e-16 times log of the size).
- eager (the reference): the same fp64 products, formed in batches of at most :data:`BATCH`
  elements (tensors above :data:`PIECE` elements are split into views first), so the fp64
  temporaries never exceed 128 MiB; the products of a batch are summed in fp64 with
  ``torch._foreach_norm`` and the signed-sum identity ``sum(x) = 2 * sum(max(x, 0)) -
  sum(|x|)`` (no foreach op sums signed values): the cancellation costs at most a few fp64 ulps
  of ``sum |a_i b_i|``. GSAM's former private ``_dot`` formed fp32 products (so products of
  elements above ~1.8e19 overflowed to ``inf`` and each product was rounded to fp32, relative
  error ~6e-8 per term); this reference does not: it is finite and accurate wherever the fp64
  sum is, like the Triton kernels.
- the compiled extension (``"ext"`` backend): one C++ op over the two lists on CPU tensors,
  the fp64 products summed in fp64 over fixed chunks, each chunk in a fixed order (interleaved
  fp64 lanes) and the chunk sums in chunk order: the same bits whatever the thread count. A
  pair of different dtypes is read through fp32 copies (exact). On CUDA tensors it declines
  (:class:`sam_kernels._backend.Declined`) and the chooser runs Triton's kernels (when Triton
  can run), else the eager reference.

fp64 inputs always run on the eager reference (as every op's do). The result is ``inf`` or
``nan`` when some element is not finite (``inf * 0`` and ``inf - inf`` give ``nan``), which is
how callers detect it without a host read; finite inputs give a finite result unless the true
value exceeds the fp64 range. Empty lists and empty tensors contribute 0.
"""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops import _common
from sam_kernels.ops._common import TensorList, pick
from sam_kernels.ops._declare import declare, run
from sam_kernels.ops.grad_norm import BATCH, PIECE


def dot(a: TensorList, b: TensorList, *, backend: str | None = None) -> torch.Tensor:
    """``sum_i <a_i, b_i>``: the inner product of two equal-length lists of equal-shape tensors.

    Returns a 0-d float64 tensor on the tensors' device (0 for empty lists; never read on the
    host). Products and sums are in fp64 on every backend (see the module docstring); ``nan`` or
    ``inf`` when an element is not finite. The ``"ext"`` backend (the compiled extension) runs
    it on CPU tensors (on CUDA tensors Triton's kernels run, else eager).

    Raises ``ValueError`` (naming the argument and index) when the lists differ in length, a
    pair of tensors differs in shape, or the tensors are on more than one device. The declared
    op: ``torch.ops.sam_kernels.dot``.
    """
    return run(DECLARED, backend, list(a), list(b))


def _zero(a, b) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


def _choose(backend, a, b):
    if not a and not b:
        # no tensor, no device: 0 whatever the backend (a device-only backend named for empty
        # lists would otherwise be refused as unavailable on the CPU)
        return _zero
    impl = pick("dot", backend, ("a", "b"), a, b)
    if not getattr(_common._TRUST, "on", False):
        for i, (x, y) in enumerate(zip(a, b)):
            if x.shape != y.shape:
                raise ValueError(
                    f"b[{i}] has shape {tuple(y.shape)} but a[{i}] has shape {tuple(x.shape)}: "
                    "dot pairs tensors of equal shapes"
                )
    return impl


def _fake(a, b, backend=None) -> torch.Tensor:
    return a[0].new_empty((), dtype=torch.float64) if a else torch.zeros((), dtype=torch.float64)


DECLARED = declare(
    "dot", "dot(Tensor[] a, Tensor[] b, str? backend=None) -> Tensor", _choose, fake=_fake
)


def _pieces2(a: TensorList, b: TensorList) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both lists with the tensors above :data:`PIECE` elements flattened and split alike."""
    pa: list[torch.Tensor] = []
    pb: list[torch.Tensor] = []
    for x, y in zip(a, b):
        if x.numel() > PIECE:
            pa.extend(x.reshape(-1).split(PIECE))
            pb.extend(y.reshape(-1).split(PIECE))
        else:
            pa.append(x)
            pb.append(y)
    return pa, pb


@register("dot", "eager")
def dot_eager(a: TensorList, b: TensorList) -> torch.Tensor:
    a, b = list(a), list(b)
    if not a:
        return torch.zeros((), dtype=torch.float64)
    pa, pb = _pieces2(a, b)
    pos: list[torch.Tensor] = []
    mag: list[torch.Tensor] = []
    i = 0
    while i < len(pa):
        j, size = i + 1, pa[i].numel()
        while j < len(pa) and size + pa[j].numel() <= BATCH:
            size += pa[j].numel()
            j += 1
        # fp64 products (exact for fp32/bf16/fp16 inputs, never overflowing): the one
        # per-tensor loop (a dtype conversion; no foreach op changes dtype), then a fixed
        # number of foreach ops per batch
        prods = [x.to(torch.float64, copy=True) for x in pa[i:j]]
        torch._foreach_mul_(prods, pb[i:j])
        mag.extend(torch._foreach_norm(prods, 1))  # sum |x|
        torch._foreach_clamp_min_(prods, 0.0)  # NaN stays NaN
        pos.extend(torch._foreach_norm(prods, 1))  # sum max(x, 0)
        i = j
    return 2.0 * torch.stack(pos).sum() - torch.stack(mag).sum()
