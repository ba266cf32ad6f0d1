"""LookSAM's two per-tensor operations (Liu, Mai, Chen, Hsieh, You, CVPR 2022).

On a SAM step, with ``g0 = grad L(w)`` and ``gs = grad L(w + e)``, each tensor keeps the part
of ``gs`` orthogonal to ``g0``::

    gv_i = gs_i - ||gs_i|| cos(theta_i) * g0_i / ||g0_i||
         = gs_i - (<g0_i, gs_i> / ||g0_i||^2) * g0_i        (coefficient 0 where ||g0_i|| = 0)

On a reuse step the stored ``gv`` is added back to the new ``g0``::

    g_i = g0_i + alpha * ||g0_i|| / (||gv_i|| + 1e-8) * gv_i  (coefficient 0 where ||gv_i|| = 0)

Norms and dot products are per tensor, accumulated in fp64 (squares of elements above ~1.8e19
overflow fp32, and fp32 sums lose accuracy over millions of elements), from ``torch._foreach_*``
reductions: the number of dispatched ops does not grow with the number of tensors. The
elementwise products ``g0 * gs`` are formed in the tensors' dtype; coefficients are returned in
fp32 (fp64 for fp64 tensors). The dot product uses ``sum(x) = 2 * sum(max(x, 0)) - sum(|x|)``
over the products, whose rounding error is bounded by ``eps * sum |g0 * gs|`` (that of a plain
dot product).

Both ops are declared (``torch.ops.sam_kernels.looksam_project_`` and
``torch.ops.sam_kernels.looksam_reuse_coefs``). The compiled extension (``"ext"``) runs them
on CPU tensors (csrc/cpu_looksam.cpp): per-tensor fp64 sums of exact fp64 products in one pass
each, then one element-wise pass ``gv = fl(fl(g0 * -c) + gs)`` computed in fp32 and rounded
once to the tensors' dtype. On ResNet-50's gradients (one core) the eager projection took
0.79 s, 0.62 s of it in the fp64 sums of its signed products (``torch._foreach_powsum`` with
``p=1`` and an fp64 result has no vectorised CPU kernel). On CUDA tensors the extension
declines and the eager reference (``torch._foreach_*`` multi-tensor kernels) runs.
"""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops import _common
from sam_kernels.ops._common import (
    TensorList,
    acc_dtype,
    per_tensor,
    pick,
    sanitize,
    select_,
)
from sam_kernels.ops._declare import declare, run
from sam_kernels.ops.lincomb import LinComb

#: the guard in LookSAM's reuse coefficient ``||g0|| / (||gv|| + 1e-8)``
REUSE_EPS = 1e-8


def looksam_project_(
    gv: TensorList,
    g0: TensorList,
    gs: TensorList,
    ok: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """``gv_i = gs_i - (<g0_i, gs_i> / ||g0_i||^2) g0_i`` in place, kept only if ``ok``.

    ``ok``: a 0-d float tensor (1.0 or 0.0) on the tensors' device; when it is 0 ``gv`` keeps
    its values, whatever ``gs`` holds (NaN included). No host read.

    Raises ``ValueError`` (naming the list and index) when the lists differ in length or a
    tensor's shape differs from ``gv``'s at its index. The declared op:
    ``torch.ops.sam_kernels.looksam_project_``.
    """
    run(PROJECT, backend, list(gv), list(g0), list(gs), ok)


def looksam_reuse(
    g0: TensorList, gv: TensorList, alpha: float, *, backend: str | None = None
) -> LinComb:
    """The reuse gradient ``g0_i + alpha ||g0_i|| / (||gv_i|| + 1e-8) gv_i`` as a :class:`LinComb`.

    The coefficients are computed on the device (``[2, n]``: ones, then the per-tensor
    coefficient); the step ops combine the terms inside their pass.
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0.0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    coefs = run(REUSE_COEFS, backend, list(g0), list(gv), float(alpha))
    return LinComb((list(g0), list(gv)), coefs)


def _same_shapes(names: tuple[str, ...], *lists: list[torch.Tensor]) -> None:
    if getattr(_common._TRUST, "on", False):
        return
    for other, lst in zip(names[1:], lists[1:]):
        for i, (x, y) in enumerate(zip(lists[0], lst)):
            if x.shape != y.shape:
                raise ValueError(
                    f"{other}[{i}] has shape {tuple(y.shape)} but {names[0]}[{i}] has shape "
                    f"{tuple(x.shape)}: LookSAM's ops pair tensors of equal shapes"
                )


def _choose_project(backend, gv, g0, gs, ok):
    names = ("gv", "g0", "gs")
    impl = pick("looksam_project", backend, names, gv, g0, gs, outputs=("gv",), scalars={"ok": ok})
    _same_shapes(names, gv, g0, gs)
    return impl


def _zero_coefs(g0, gv, alpha) -> torch.Tensor:
    return torch.zeros((2, 0), dtype=torch.float32)


def _choose_reuse_coefs(backend, g0, gv, alpha):
    if not g0 and not gv:
        # no tensor, no device: an empty [2, 0] whatever the backend (as ``dot``'s empty call)
        return _zero_coefs
    impl = pick("looksam_reuse_coefs", backend, ("g0", "gv"), g0, gv)
    _same_shapes(("g0", "gv"), g0, gv)
    return impl


def _reuse_coefs_fake(g0, gv, alpha, backend=None) -> torch.Tensor:
    if not g0:
        return torch.zeros((2, 0), dtype=torch.float32)
    return g0[0].new_empty((2, len(g0)), dtype=acc_dtype(g0 + gv))


PROJECT = declare(
    "looksam_project",
    "looksam_project_(Tensor(a!)[] gv, Tensor[] g0, Tensor[] gs, Tensor? ok, "
    "str? backend=None) -> ()",
    _choose_project,
)
REUSE_COEFS = declare(
    "looksam_reuse_coefs",
    "looksam_reuse_coefs(Tensor[] g0, Tensor[] gv, float alpha, str? backend=None) -> Tensor",
    _choose_reuse_coefs,
    fake=_reuse_coefs_fake,
)


def _dots(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor ``<a_i, b_i>`` as a ``[n]`` tensor of ``dtype``."""
    prod = torch._foreach_mul(a, b)
    total_abs = torch.stack(torch._foreach_powsum(prod, 1, dtype=dtype))
    torch._foreach_clamp_min_(prod, 0.0)
    total_pos = torch.stack(torch._foreach_powsum(prod, 1, dtype=dtype))
    return 2.0 * total_pos - total_abs


@register("looksam_project", "eager")
def looksam_project_eager(gv, g0, gs, ok) -> None:
    gv, g0, gs = list(gv), list(g0), list(gs)
    if not gv:
        return
    if ok is not None:
        g0 = sanitize(g0, ok)
        gs = sanitize(gs, ok)
    dot = _dots(g0, gs, torch.float64)
    n0sq = torch.stack(torch._foreach_powsum(g0, 2, dtype=torch.float64))
    positive = n0sq > 0
    coef = torch.where(positive, dot / torch.where(positive, n0sq, 1.0), 0.0)
    coef = coef.to(acc_dtype(g0 + gs))
    new = torch._foreach_mul(g0, per_tensor(-coef, len(g0)))
    torch._foreach_add_(new, gs)
    if ok is None:
        torch._foreach_copy_(gv, new)
    else:
        select_(gv, new, ok)


@register("looksam_reuse_coefs", "eager")
def looksam_reuse_coefs_eager(g0, gv, alpha: float) -> torch.Tensor:
    g0, gv = list(g0), list(gv)
    dtype = acc_dtype(g0 + gv)
    if not g0:
        return torch.zeros((2, 0), dtype=dtype)
    n0 = torch.stack(torch._foreach_norm(g0, 2, dtype=torch.float64))
    nv = torch.stack(torch._foreach_norm(gv, 2, dtype=torch.float64))
    c = torch.where(nv > 0, alpha * n0 / (nv + REUSE_EPS), 0.0).to(dtype)
    return torch.stack([torch.ones_like(c), c])
