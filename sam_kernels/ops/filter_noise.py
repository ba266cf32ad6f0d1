"""Filter-wise noise perturbation with its backup (R-SAM, Liu et al., NeurIPS 2022), one call.

.. code-block:: text

    b_i = p_i
    d_i = sigma_i * z_i * s(p_i),   z ~ N(0, 1) per element
    p_i = b_i + d_i

``s(p)`` is the norm of each output unit of ``p`` (over all dims but dim 0, broadcast back over
them) for ``ndim > 1``, and ``||p|| + eps_1d`` for 1-d and 0-d tensors (the reference's
``1e-16`` guard). ``s`` is taken from ``p`` before it is perturbed. ``d`` (the perturbation) is
written to ``deltas``: R-SAM needs it after the evaluation at ``w + d``.

Noise. With a ``seed``, ``z`` is the normal counter-based stream of
:func:`sam_kernels.noise_perturb_` (the noise contract of :mod:`sam_kernels.ops.philox`;
element ``j`` of the concatenated list uses counter ``offset + j``) on every backend: the Triton
kernel generates it, the eager reference computes it with tensor ops, the same bits (the
contract's own float32 ``log``/``cos``, no FMA contraction).
Element order within a tensor: memory order where the kernels run on the tensors in place
(contiguous; dense with dim 0 outermost, as channels-last, with the three lists' strides
equal), logical order otherwise (:func:`runs_in_place`). Without a seed the eager reference
draws ``z`` per tensor, in list order, from the global generator of the tensors' device
(``torch.normal(0, 1, p.shape)``: the numbers of ``torch.randn``, the reference code's stream,
in logical order), and the fused backends (Triton, the extension) draw a seed from torch's CPU
generator. On CPU tensors the automatic choice is therefore eager (the reference's stream, as
for ``noise_perturb``); ``backend="ext"`` runs the extension's kernels. ``noise`` (a
test hook) gives ``z`` directly (the eager reference runs then).

Launches on the Triton backend: a row-norm kernel (one program per output unit), then one
elementwise kernel (backup, noise, ``d`` and ``p`` in one pass), per dtype group, whatever the
number of tensors. The extension (``"ext"``, CPU tensors; it declines CUDA tensors, which run
on Triton) is one C++ op with the same two passes (csrc/cpu_filter_noise.cpp): fp64 row norms,
then the element-wise pass. The eager reference loops over the tensors (the norms of tensors of
different shapes; the draw from the global generator is per tensor anyway).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from sam_kernels._backend import register
from sam_kernels.ops import philox
from sam_kernels.ops._common import TensorList, pick
from sam_kernels.ops._declare import declare, run
from sam_kernels.ops.philox import _is_dense

#: the 1-d (and 0-d) tensors' noise scale is ``||p|| + EPS_1D`` (the reference's guard)
EPS_1D = 1e-16

Sigma = float | Sequence[float] | torch.Tensor


def filter_noise_perturb_(
    params: TensorList,
    backups: TensorList,
    deltas: TensorList,
    sigma: Sigma,
    *,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    eps_1d: float = EPS_1D,
    noise: TensorList | None = None,
    backend: str | None = None,
) -> None:
    """``backups[i] <- params[i]``; ``deltas[i] <- sigma_i * z_i * s(params[i])``;
    ``params[i] <- backups[i] + deltas[i]``.

    ``sigma``: one float for every tensor, a sequence of floats (one per tensor), or a 0-d or
    ``[len(params)]`` float tensor on the parameters' device. ``seed``/``offset``: the
    counter-based stream of fused backends (int64 one-element device tensors; ``seed=None``
    draws one from torch's CPU generator on the fused backends and the global generator's stream
    on eager,
    ``offset=None`` is 0). The caller advances ``offset`` by the number of elements. The
    declared op: ``torch.ops.sam_kernels.filter_noise_perturb_`` (without the ``noise`` hook).
    """
    sigma = _check_sigma(sigma, len(params))
    run(DECLARED, backend, params, backups, deltas, sigma, seed, offset, float(eps_1d), noise)


def _choose(backend, params, backups, deltas, sigma, seed, offset, eps_1d, noise):
    names, lists = ["params", "backups", "deltas"], [params, backups, deltas]
    if noise is not None:
        names.append("noise")
        lists.append(noise)
    for name, lst in zip(names[1:], lists[1:]):
        for i, (p, t) in enumerate(zip(params, lst)):
            if t.shape != p.shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(t.shape)}, params[{i}] {tuple(p.shape)}"
                )
    return pick(
        "filter_noise_perturb",
        backend if noise is None else "eager",
        names,
        *lists,
        outputs=("params", "backups", "deltas"),
        scalars={"sigma": sigma, "seed": seed, "offset": offset},
    )


def _to_schema(params, backups, deltas, sigma, seed, offset, eps_1d, noise) -> tuple:
    # the noise hook runs on eager only, which is traced, never called through the schema
    tensor = sigma if isinstance(sigma, torch.Tensor) else None
    values = [] if tensor is not None else [sigma] if isinstance(sigma, float) else list(sigma)
    seed, offset = (
        torch.tensor(x, dtype=torch.int64) if isinstance(x, int) else x for x in (seed, offset)
    )
    return params, backups, deltas, tensor, values, seed, offset, eps_1d


def _from_schema(params, backups, deltas, tensor, values, seed, offset, eps_1d) -> tuple:
    # one float for every tensor and a list of one float are the same call
    sigma = tensor if tensor is not None else values[0] if len(values) == 1 else list(values)
    sigma = _check_sigma(sigma, len(params))
    return params, backups, deltas, sigma, seed, offset, eps_1d, None


def _check_sigma(sigma, n: int) -> Sigma:
    """``sigma`` as a float, a list of ``n`` floats or a 0-d / ``[n]`` tensor; a ``ValueError``
    naming it otherwise."""
    if isinstance(sigma, torch.Tensor):
        if not sigma.is_floating_point():
            raise ValueError(f"sigma must be a floating-point tensor, got {sigma.dtype}")
        if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.numel() != n):
            raise ValueError(
                f"sigma must be a 0-d tensor or have one value per tensor ([{n}]), got shape "
                f"{tuple(sigma.shape)}"
            )
        return sigma
    if isinstance(sigma, numbers.Real):
        return float(sigma)
    try:
        vals = [float(s) for s in sigma]
    except TypeError:
        raise ValueError(
            f"sigma must be a float, a sequence of floats or a tensor, got {sigma!r}"
        ) from None
    if len(vals) != n:
        raise ValueError(f"sigma has {len(vals)} values, expected one per tensor ({n})")
    return vals


def row_scale(w: torch.Tensor, eps_1d: float = EPS_1D, dtype: torch.dtype | None = None):
    """``s(w)`` in ``dtype`` (default ``w``'s): per-output-unit norms shaped ``[d0, 1, ...]``
    for ``ndim > 1``, else the 0-d ``||w|| + eps_1d``."""
    kw = {} if dtype is None or dtype == w.dtype else {"dtype": dtype}
    if w.dim() > 1:
        s = torch.linalg.vector_norm(w.flatten(1), dim=1, **kw)
        return s.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.linalg.vector_norm(w, **kw) + eps_1d


def sigma_values(sigma: float | Sequence[float]) -> tuple[float, ...]:
    """A float ``sigma`` (or one per tensor) as the fused kernels take it: one value when every
    tensor has the same (R-SAM's single group: a 0-d multiplier), else one per tensor."""
    vals = (float(sigma),) if isinstance(sigma, int | float) else tuple(map(float, sigma))
    return vals[:1] if len(set(vals)) == 1 else vals


def _sigmas(sigma: Sigma, n: int) -> list:
    """One multiplier per tensor: Python floats, or 0-d tensors (no host read)."""
    if isinstance(sigma, torch.Tensor):
        if sigma.dim() == 0:
            return [sigma] * n
        if sigma.dim() != 1 or sigma.numel() != n:
            raise ValueError(f"sigma must be 0-d or [{n}], got shape {tuple(sigma.shape)}")
        return list(sigma.unbind(0))
    if isinstance(sigma, int | float):
        return [float(sigma)] * n
    return list(sigma)


#: dtypes whose eager noise is formed in their own precision (the reference's arithmetic);
#: bf16/fp16 are formed in fp32 and rounded once, as the fused kernels do
_OWN_PRECISION = (torch.float32, torch.float64)


def rows_outermost(t: torch.Tensor) -> bool:
    """Dense, with every row (index along dim 0) one contiguous run of memory (contiguous,
    channels-last)."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    if not _is_dense(t):
        return False
    return t.dim() <= 1 or t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def runs_in_place(p: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether the fused kernels work on index ``(p, b, d)`` in place, in memory order (every
    tensor contiguous, or ``p`` with rows outermost and all three with its strides), rather
    than on contiguous copies, in logical order. The counters follow that order."""
    if p.numel() <= 1 or (p.is_contiguous() and b.is_contiguous() and d.is_contiguous()):
        return True
    return rows_outermost(p) and b.stride() == p.stride() and d.stride() == p.stride()


def counter_noise(params, backups, deltas, seed, offset) -> list[torch.Tensor]:
    """``z`` of the fused kernels (float32, the tensors' shapes): the normal counter stream of
    :mod:`sam_kernels.ops.philox` (``noise_perturb_``'s), element ``j`` of the concatenated list
    at counter ``offset + j``, in the kernels' element order. One generation, then views."""
    device = params[0].device
    seed, offset = philox.stream_scalars(seed, offset, device)
    numels = [p.numel() for p in params]
    total = sum(numels)
    if total:
        flat = philox.normal(seed, offset, total)
    else:
        flat = torch.empty(0, dtype=torch.float32, device=device)
    out, start = [], 0
    for p, b, d, m in zip(params, backups, deltas, numels):
        if m > 1 and not p.is_contiguous() and runs_in_place(p, b, d):
            # element at memory position q of p takes flat[start + q]
            out.append(flat.as_strided(p.shape, p.stride(), start))
        else:
            out.append(flat[start : start + m].view(p.shape))
        start += m
    return out


@register("filter_noise_perturb", "eager")
def filter_noise_perturb_eager(params, backups, deltas, sigma, seed, offset, eps_1d, noise) -> None:
    params, backups, deltas = list(params), list(backups), list(deltas)
    if not params:
        return
    sig = _sigmas(sigma, len(params))
    if noise is None and seed is not None:
        # the fused backends' counter stream (a fixed number of ops), before anything is written
        noise = counter_noise(params, backups, deltas, seed, offset)
    torch._foreach_copy_(backups, params)
    for i, (w, d) in enumerate(zip(params, deltas)):
        # the reference's random stream: one draw per tensor, in list order, from the global
        # generator of the tensor's device, empty tensors included (they draw nothing)
        if noise is None:
            z = torch.normal(0.0, 1.0, size=w.shape, device=w.device)
        else:
            z = noise[i]
        if not w.numel():
            continue
        if w.dtype in _OWN_PRECISION:
            d.copy_(z)
            d.mul_(row_scale(w, eps_1d) * sig[i])
        else:
            c = row_scale(w, eps_1d, torch.float32) * sig[i]
            d.copy_(z.to(torch.float32) * c)
    torch._foreach_add_(params, deltas)


DECLARED = declare(
    "filter_noise_perturb",
    "filter_noise_perturb_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor(c!)[] deltas, "
    "Tensor? sigma_tensor, float[] sigma_values, Tensor? seed, Tensor? offset, float eps_1d, "
    "str? backend=None) -> ()",
    _choose,
    to_schema=_to_schema,
    from_schema=_from_schema,
)
