"""Perturb with exact backup: ``b_i = p_i;  p_i += s_i * T(p_i)^2 * g_i`` in one pass.

With ``save_backup=False`` the perturbation starts from the backup instead, which it only reads:
``p_i = b_i + s_i * T(b_i)^2 * g_i`` (CR-SAM's ``w - e`` after ``w + e``: the restore and the
second ascent in one pass, the same bits as ``restore_`` followed by ``perturb_``).

SAM (Foret et al. 2021): ``T = 1``, ``s = rho / (||g|| + 1e-12)``.
ASAM (Kwon et al. 2021): ``T(p) = |p| + eta`` (davda54/sam: eta = 0, so ``T^2 = p^2``).
The scale ``s`` is a device tensor (0-d, or one entry per tensor for per-group rho): the host
never reads it. The backup holds the parameters bit for bit in their own dtype, so the restore
that follows is exact.

Also the noise perturbation of the universal class (Tahmasebi et al. 2024):
``p_i = b_i + s_i * eps_i`` with Gaussian or uniform-in-cube ``eps``.
"""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops._common import TensorList, per_tensor, pick, scratch_ok
from sam_kernels.ops._declare import declare, run
from sam_kernels.ops.philox import NOISE_KINDS, list_noise


def perturb_(
    params: TensorList,
    grads: TensorList,
    backups: TensorList,
    scale: torch.Tensor,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    save_backup: bool = True,
    backend: str | None = None,
) -> None:
    """``backups[i] <- params[i]``; ``params[i] += scale[i] * T(params[i])^2 * grads[i]``.

    ``scale``: 0-d or ``[len(params)]`` float32 tensor on the parameters' device.
    ``T(p) = |p| + eta`` if ``adaptive`` else 1. ``save_backup=False``: the backups are read,
    not written, and the perturbation starts from them: ``params[i] <- backups[i]`` first (one
    pass in all: ``restore_`` then ``perturb_``, bit for bit). The declared op:
    ``torch.ops.sam_kernels.perturb_``.
    """
    run(PERTURB, backend, params, grads, backups, scale, adaptive, eta, save_backup)


def _choose_perturb(backend, params, grads, backups, scale, adaptive, eta, save_backup):
    names = ("params", "grads", "backups")
    # the backups are written (save_backup) or read: separate from params either way
    return pick(
        "perturb", backend, names, params, grads, backups, outputs=("params", "backups"),
        scalars={"scale": scale},
    )  # fmt: skip


PERTURB = declare(
    "perturb",
    "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor scale, "
    "bool adaptive, float eta, bool save_backup, str? backend=None) -> ()",
    _choose_perturb,
)


@register("perturb", "eager")
def perturb_eager(params, grads, backups, scale, adaptive, eta, save_backup=True) -> None:
    params = list(params)
    if not params:
        return
    backups, grads = list(backups), list(grads)
    if not save_backup:  # from the backups: the restore, then the same perturbation
        torch._foreach_copy_(params, backups)
    if not scratch_ok(params, grads):
        return _perturb_with_temporary(params, grads, backups, scale, adaptive, eta, save_backup)
    if save_backup:
        torch._foreach_copy_(backups, params)
    if _fma_ok(params, adaptive):
        # CPU fp32/fp64: ``p += s * g`` as one fused multiply-add (ATen's addcmul), a pass
        # where the formulation below takes three (the product is not rounded on its own)
        torch._foreach_addcmul_(params, grads, _scales(scale, len(params)))
        return
    # The step ``t = s * T^2 * g`` is formed in the parameters themselves (their values are in
    # the backups now), then ``p = t + b``: the same roundings as ``p + t`` (addition commutes),
    # without a temporary list (on the CPU a fresh one costs its page faults, more than a pass)
    if adaptive:
        torch._foreach_abs_(params)
        if eta != 0.0:
            torch._foreach_add_(params, eta)
        torch._foreach_mul_(params, params)
        torch._foreach_mul_(params, grads)
    else:
        torch._foreach_copy_(params, grads)
    torch._foreach_mul_(params, per_tensor(scale, len(params)))
    torch._foreach_add_(params, backups)


def _perturb_with_temporary(params, grads, backups, scale, adaptive, eta, save_backup) -> None:
    """The same values, through a temporary list: for gradients sharing memory with params,
    and while torch.compile traces (:func:`scratch_ok` is False there). The same operations as
    the path above: where that one is ATen's addcmul (one rounding of ``p + s * g``), so is this
    one, out of place; ``(g * s) + p`` would round the product on its own (an ulp apart)."""
    if save_backup:
        torch._foreach_copy_(backups, params)
    if _fma_ok(params, adaptive):
        t = torch._foreach_addcmul(params, grads, _scales(scale, len(params)))
        torch._foreach_copy_(params, t)
        return
    if adaptive:
        t = torch._foreach_abs(params)
        if eta != 0.0:
            torch._foreach_add_(t, eta)
        torch._foreach_mul_(t, t)
        torch._foreach_mul_(t, grads)
    else:
        t = torch._foreach_mul(grads, 1.0)
    torch._foreach_mul_(t, per_tensor(scale, len(params)))
    torch._foreach_add_(params, t)


#: dtypes whose CPU perturbation is one fused multiply-add
_FMA = (torch.float32, torch.float64)


def _fma_ok(params: list[torch.Tensor], adaptive: bool) -> bool:
    """Whether perturb takes ``p + s * g`` as one addcmul (both eager paths decide alike)."""
    return not adaptive and all(p.device.type == "cpu" and p.dtype in _FMA for p in params)


def _scales(scale: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The scale as n 0-d tensors (the ``tensor2`` list of ``_foreach_addcmul``)."""
    return list((scale if scale.dim() else scale.expand(n)).unbind(0))


def noise_perturb_(
    params: TensorList,
    backups: TensorList,
    scale: torch.Tensor,
    *,
    kind: str = "normal",
    half_cube_len: float = 1.0,
    save_backup: bool = True,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    noise: TensorList | None = None,
    backend: str | None = None,
) -> None:
    """``backups[i] <- params[i]`` (if ``save_backup``); ``params[i] = backups[i] + s_i * eps_i``.

    ``eps ~ N(0, I)`` (``kind="normal"``) or ``Uniform[-a, a]`` per element (``"uniform"``,
    ``a = half_cube_len``).

    Streams. With a ``seed`` (an int64 0-d device tensor, or an int; ``offset`` likewise,
    default 0), ``eps`` is the counter-based noise contract of :mod:`sam_kernels.ops.philox`
    (Philox4x32-10: element ``j`` of the concatenated list takes counter ``offset + j`` under
    ``seed``; the normal kind through the contract's own float32 ``log``/``cos``), read on the
    device only; the caller advances ``offset`` by at least the number of elements between
    samples. Every backend (eager, Triton, the extension's CPU and CUDA kernels) generates the
    same values, bit for bit, for both kinds, and ``b + s * eps`` rounds alike (two float32
    roundings, then one to the dtype), so the whole op is bit-identical across backends.
    Without a seed the eager backend draws ``eps`` per tensor, in order, from the global
    generator (the reference code's stream, its default), and a fused backend draws a fresh
    seed from the global CPU generator. ``noise`` (a test hook) gives the values of ``eps``
    directly. The declared op:
    ``torch.ops.sam_kernels.noise_perturb_`` (without the hook).
    """
    run(
        NOISE_PERTURB, backend, params, backups, scale, kind, half_cube_len, save_backup, seed,
        offset, noise,
    )  # fmt: skip


def _choose_noise(
    backend, params, backups, scale, kind, half_cube_len, save_backup, seed, offset, noise
):  # fmt: skip
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {NOISE_KINDS}")
    names, lists = ["params", "backups"], [params, backups]
    if noise is not None:
        names.append("noise")
        lists.append(noise)
    return pick(
        "noise_perturb",
        backend if noise is None else "eager",
        names,
        *lists,
        # backups are read (save_backup=False) or written: separate from params either way
        outputs=("params", "backups"),
        scalars={"scale": scale, "seed": seed, "offset": offset},
    )


def _noise_to_schema(params, backups, scale, kind, half_cube_len, save_backup, seed, offset, noise):
    # the test hook runs on eager only, which is traced, never called through the schema
    seed, offset = (_as_tensor(x) for x in (seed, offset))
    return params, backups, scale, kind, float(half_cube_len), bool(save_backup), seed, offset


def _as_tensor(x: torch.Tensor | int | None) -> torch.Tensor | None:
    return torch.tensor(x, dtype=torch.int64) if isinstance(x, int) else x


NOISE_PERTURB = declare(
    "noise_perturb",
    "noise_perturb_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor scale, str kind, "
    "float half_cube_len, bool save_backup, Tensor? seed, Tensor? offset, "
    "str? backend=None) -> ()",
    _choose_noise,
    to_schema=_noise_to_schema,
    from_schema=lambda *a: (*a, None),
)


@register("noise_perturb", "eager")
def noise_perturb_eager(
    params, backups, scale, kind, half_cube_len, save_backup, seed, offset, noise
) -> None:
    params = list(params)
    if not params:
        return
    backups = list(backups)
    if noise is None and seed is not None:
        # the fused backends' counter stream (sam_kernels.ops.philox): a fixed number of ops
        # over the concatenated list, element order decided by the layouts as on Triton
        noise = list_noise(params, backups, seed, offset, kind, half_cube_len)
    if save_backup:
        torch._foreach_copy_(backups, params)
    if noise is None:
        # The reference's random stream: one draw per tensor, in parameter order, from the
        # global generator (the one documented exception to "ops do not grow with tensors").
        if kind == "normal":
            noise = [torch.normal(0.0, 1.0, size=p.shape, device=p.device) for p in params]
        else:
            a = half_cube_len
            noise = [2 * a * torch.rand(p.shape, device=p.device) - a for p in params]
    eps = torch._foreach_mul(list(noise), per_tensor(scale, len(params)))
    torch._foreach_copy_(params, backups)
    torch._foreach_add_(params, eps)
