"""The compiled-extension backend (``backend="ext"``, formerly ``"cuda"``): the fused ops as
torch custom ops, on CPU and CUDA tensors.

``setup.py`` builds ``sam_kernels/_C*.so`` from ``csrc/``: the ops ``torch.ops.sam_kernels_C.*``
with a CPU implementation (C++/OpenMP, always built when a compiler is present) and a CUDA
implementation (multi-tensor kernels, built when a CUDA toolchain and a CUDA build of torch are
present). Importing this module loads that library and registers the ops with the backend
chooser; it raises ``ImportError`` when the library is not built (the chooser then falls back to
Triton / eager, and says why when this backend was asked for).

:func:`supports` tells the chooser where the ops run: CPU tensors always (the C++ ops), CUDA
tensors when the library was built with CUDA. Calls the extension cannot take (a noise tensor
given directly, more gradient terms than its kernels combine, and ``dot``,
``filter_noise_perturb`` and LookSAM's two ops on CUDA tensors, whose kernels are CPU-only) are
declined
(:class:`sam_kernels._backend.Declined`): the chooser runs them on the next backend.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from sam_kernels._backend import Declined, register
from sam_kernels.ops import philox
from sam_kernels.ops._step_args import AdamWHyper, SgdHyper
from sam_kernels.ops.filter_noise import sigma_values
from sam_kernels.ops.lincomb import LinComb

NAMESPACE = "sam_kernels_C"
_HERE = Path(__file__).resolve().parent
# the kernels' limits: more terms than this run on eager
MAX_LINCOMB_TERMS = {"cpu": 8, "cuda": 4}
MAX_STEP_GRAD_TERMS = 3

_BUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` (torch installed first; a CUDA "
    "toolkit and a CUDA build of torch for the CUDA kernels), or pick another backend"
)


def _unavailable(reason: str) -> ImportError:
    msg = (
        f"sam_kernels: the compiled extension (backend 'ext') is not available: {reason}. "
        f"Ops run on the Triton / eager backends instead; {_BUILD_HINT}."
    )
    # shown once per process (the chooser imports this module once; the default warnings
    # filter shows a given message from one place once)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return ImportError(msg)


def library_path() -> Path | None:
    """The built extension library inside the package, if any."""
    env = os.environ.get("SAM_KERNELS_EXT_PATH")
    if env:
        return Path(env)
    found = sorted(_HERE.glob("_C*.so")) + sorted(_HERE.glob("_C*.pyd"))
    return found[0] if found else None


def _load_library() -> Path:
    if os.environ.get("SAM_KERNELS_NO_EXT", "").strip() in ("1", "true", "yes"):
        raise _unavailable("disabled by SAM_KERNELS_NO_EXT")
    if hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), "restore_"):
        return library_path() or Path("<already loaded>")
    path = library_path()
    if path is None:
        raise _unavailable(f"no sam_kernels/_C*.so next to {__file__} (not built)")
    try:
        torch.ops.load_library(str(path))
    except Exception as exc:  # OSError: wrong torch ABI, missing CUDA libraries, ...
        raise _unavailable(f"loading {path} failed ({type(exc).__name__}: {exc})") from exc
    return path


LIBRARY = _load_library()
_ops = getattr(torch.ops, NAMESPACE)


def has_cuda_kernels() -> bool:
    """True if the library was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::restore_", "CUDA")


def supports(device: torch.device | str) -> bool:
    """True if the extension's ops run on tensors of ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return has_cuda_kernels() and torch.cuda.is_available()
    return False


# ----------------------------------------------------------------------------- fake (meta) impls
# torch.compile traces the ops with fake tensors: shapes and dtypes only.
@torch.library.register_fake(f"{NAMESPACE}::grad_norm")
def _grad_norm_fake(grads, params, eta):
    return torch.empty((), dtype=torch.float32, device=grads[0].device)


@torch.library.register_fake(f"{NAMESPACE}::aesam_stats_")
def _aesam_stats_fake(grads, stats, delta, c):
    return torch.empty((), dtype=torch.int32, device=stats.device)


@torch.library.register_fake(f"{NAMESPACE}::finite_and")
def _finite_and_fake(ok, values):
    return torch.empty((), dtype=torch.float32, device=(ok if ok is not None else values[0]).device)


@torch.library.register_fake(f"{NAMESPACE}::empty_like_list")
def _empty_like_list_fake(like):
    return [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]


@torch.library.register_fake(f"{NAMESPACE}::ascent_scale")
def _ascent_scale_fake(norm, rho, factor_tensor, factor, negated):
    return [torch.empty_like(rho) for _ in range(2 if negated else 1)]


@torch.library.register_fake(f"{NAMESPACE}::dot")
def _dot_fake(a, b):
    return torch.empty((), dtype=torch.float64, device=a[0].device)


@torch.library.register_fake(f"{NAMESPACE}::looksam_reuse_coefs")
def _looksam_reuse_coefs_fake(g0, gv, alpha):
    return torch.empty((2, len(g0)), dtype=torch.float32, device=g0[0].device)


def _no_output(*args, **kwargs) -> None:
    return None


for _name in (
    "perturb_",
    "noise_perturb_",
    "filter_noise_perturb_",
    "restore_",
    "looksam_project_",
    "lincomb_",
    "frob_accumulate_",
    "count_step_",
    "zero_unless_",
    "sgd_step_",
    "adamw_step_",
    "_philox4x32_10",
    "_noise_math",
):
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _no_output)


# ----------------------------------------------------------------------------- argument helpers
def _f32(x: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A float32 contiguous tensor on ``device`` (no host read; a copy only when needed)."""
    if not isinstance(x, torch.Tensor):
        return torch.tensor(float(x), dtype=torch.float32, device=device)
    if x.device != device or x.dtype != torch.float32:
        x = x.to(device=device, dtype=torch.float32)
    return x.contiguous()


def _flag(ok: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The step's flag as a 0-d float32 tensor (a 0-d one as it is: no view dispatched)."""
    if ok is None:
        return None
    ok = _f32(ok, device)
    return ok if ok.dim() == 0 else ok.reshape(())


def _grad_args(grads, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A gradient argument as (flattened term lists, coefs or None)."""
    if isinstance(grads, LinComb):
        return [t for term in grads.terms for t in term], _f32(grads.coefs, device)
    return list(grads), None


def _lr_args(lr, device: torch.device) -> tuple[torch.Tensor | None, float]:
    if isinstance(lr, torch.Tensor):
        return _f32(lr, device).reshape(()), 0.0
    return None, float(lr)


# ----------------------------------------------------------------------------- registered ops
@register("grad_norm", "ext")
def grad_norm_ext(grads, params, eta: float) -> torch.Tensor:
    grads = list(grads)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return _ops.grad_norm(grads, list(params) if params is not None else [], float(eta))


@register("perturb", "ext")
def perturb_ext(
    params, grads, backups, scale, adaptive: bool, eta: float, save_backup: bool = True
) -> None:
    params = list(params)
    if not params:
        return
    device = params[0].device
    _ops.perturb_(
        params, list(grads), list(backups), _f32(scale, device), bool(adaptive), float(eta),
        bool(save_backup),
    )  # fmt: skip


_NOISE_KIND = {"normal": 0, "uniform": 1}


@register("noise_perturb", "ext")
def noise_perturb_ext(
    params, backups, scale, kind, half_cube_len, save_backup, seed, offset, noise
) -> None:
    if noise is not None:  # the test hook: the caller gives eps itself
        raise Declined("noise given directly")
    params = list(params)
    if not params:
        return
    device = params[0].device
    _ops.noise_perturb_(
        params,
        list(backups),
        _f32(scale, device),
        _NOISE_KIND[kind],
        float(half_cube_len),
        bool(save_backup),
        *philox.stream_scalars(seed, offset, device),
    )


def _cpu_only(op: str, device: torch.device) -> None:
    # the ops with CPU kernels only: on CUDA tensors the chooser runs Triton's (then eager)
    if device.type != "cpu":
        raise Declined(f"the extension's {op} runs on CPU tensors only")


def _sigma_arg(sigma, device: torch.device) -> torch.Tensor:
    """``sigma`` (a float, floats, a 0-d or [n] tensor) as a float32 0-d or [n] tensor."""
    if isinstance(sigma, torch.Tensor):
        return _f32(sigma, device)
    vals = sigma_values(sigma)
    return torch.tensor(vals[0] if len(vals) == 1 else vals, dtype=torch.float32, device=device)


@register("filter_noise_perturb", "ext")
def filter_noise_perturb_ext(params, backups, deltas, sigma, seed, offset, eps_1d, noise) -> None:
    if noise is not None:  # the test hook: the caller gives z itself
        raise Declined("noise given directly")
    params = list(params)
    if not params:
        return
    device = params[0].device
    _cpu_only("filter_noise_perturb", device)
    sig = _sigma_arg(sigma, device)
    _ops.filter_noise_perturb_(
        params,
        list(backups),
        list(deltas),
        sig,
        float(eps_1d),
        *philox.stream_scalars(seed, offset, device),
    )


@register("dot", "ext")
def dot_ext(a, b) -> torch.Tensor:
    a = list(a)
    if not a:
        return torch.zeros((), dtype=torch.float64)
    _cpu_only("dot", a[0].device)
    return _ops.dot(a, list(b))


def _one_dtype_per_index(*lists) -> None:
    # the kernels read every list of an index as one dtype (the eager reference promotes)
    for ts in zip(*lists):
        if any(t.dtype != ts[0].dtype for t in ts):
            raise Declined("tensors of different dtypes at one index")


@register("looksam_project", "ext")
def looksam_project_ext(gv, g0, gs, ok) -> None:
    gv = list(gv)
    if not gv:
        return
    _cpu_only("looksam_project", gv[0].device)
    g0, gs = list(g0), list(gs)
    _one_dtype_per_index(gv, g0, gs)
    if ok is not None and (ok.dtype != torch.float32 or ok.device != gv[0].device):
        raise Declined(f"ok of dtype {ok.dtype} on {ok.device}")
    _ops.looksam_project_(gv, g0, gs, ok)


@register("looksam_reuse_coefs", "ext")
def looksam_reuse_coefs_ext(g0, gv, alpha: float) -> torch.Tensor:
    g0 = list(g0)
    if not g0:
        return torch.zeros((2, 0), dtype=torch.float32)
    _cpu_only("looksam_reuse_coefs", g0[0].device)
    gv = list(gv)
    _one_dtype_per_index(g0, gv)
    return _ops.looksam_reuse_coefs(g0, gv, float(alpha))


@register("restore", "ext")
def restore_ext(params, backups) -> None:
    params = list(params)
    if params:
        _ops.restore_(params, list(backups))


@register("lincomb", "ext")
def lincomb_ext(out, comb: LinComb) -> None:
    out = list(out)
    if not out:
        return
    device = out[0].device
    if len(comb.terms) > MAX_LINCOMB_TERMS.get(device.type, 4):
        raise Declined(f"{len(comb.terms)} terms")
    terms, coefs = _grad_args(comb, device)
    _ops.lincomb_(out, terms, coefs)


@register("frob_accumulate", "ext")
def frob_accumulate_ext(cross, gsum, grads, loss, init: bool = False) -> None:
    cross = list(cross)
    if not cross:
        return
    loss = _f32(loss, cross[0].device).reshape(())
    _ops.frob_accumulate_(cross, list(gsum), list(grads), loss, bool(init))


@register("sgd_step", "ext")
def sgd_step_ext(params, grads, momentum_buffers, steps, backups, hyper: SgdHyper, ok) -> None:
    lr, momentum, dampening = hyper.lr, hyper.momentum, hyper.dampening
    nesterov, weight_decay, maximize = hyper.nesterov, hyper.weight_decay, hyper.maximize
    params = list(params)
    if not params:
        return
    if isinstance(grads, LinComb) and len(grads.terms) > MAX_STEP_GRAD_TERMS:
        raise Declined(f"{len(grads.terms)} gradient terms")
    device = params[0].device
    flat, coefs = _grad_args(grads, device)
    lr_t, lr_f = _lr_args(lr, device)
    _ops.sgd_step_(
        params,
        flat,
        coefs,
        list(momentum_buffers) if momentum != 0.0 else [],
        list(steps),
        list(backups) if backups is not None else [],
        lr_t,
        lr_f,
        float(momentum),
        float(dampening),
        bool(nesterov),
        float(weight_decay),
        bool(maximize),
        _flag(ok, device),
    )


@register("adamw_step", "ext")
def adamw_step_ext(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups, hyper: AdamWHyper,
    ok,
) -> None:  # fmt: skip
    lr, beta1, beta2, eps = hyper.lr, hyper.beta1, hyper.beta2, hyper.eps
    weight_decay, amsgrad, maximize = hyper.weight_decay, hyper.amsgrad, hyper.maximize
    params = list(params)
    if not params:
        return
    if isinstance(grads, LinComb) and len(grads.terms) > MAX_STEP_GRAD_TERMS:
        raise Declined(f"{len(grads.terms)} gradient terms")
    device = params[0].device
    flat, coefs = _grad_args(grads, device)
    lr_t, lr_f = _lr_args(lr, device)
    _ops.adamw_step_(
        params,
        flat,
        coefs,
        list(exp_avgs),
        list(exp_avg_sqs),
        list(max_exp_avg_sqs) if amsgrad else [],
        list(steps),
        list(backups) if backups is not None else [],
        lr_t,
        lr_f,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(amsgrad),
        bool(maximize),
        _flag(ok, device),
    )


@register("aesam_stats", "ext")
def aesam_stats_ext(grads, stats, delta: float, c: float) -> torch.Tensor:
    return _ops.aesam_stats_(list(grads), stats, float(delta), float(c))


# the scalar glue of a step (csrc/scalar_glue.cpp, csrc/glue_kernels.cu): CPU scalars, and CUDA
# scalars of one device where the library has their CUDA kernels; the chooser runs other devices
# and dtypes on the next backend
_F32_F64 = (torch.float32, torch.float64)


def _glue_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Decline unless every given tensor is on one device on which ``op`` has a kernel."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise Declined(f"tensors on {sorted(map(str, devices))}: the scalar ops take one device")
    (device,) = devices
    if device.type == "cpu":
        return
    if device.type != "cuda" or not _has_cuda_kernel(op):
        raise Declined(f"a tensor on {device}: this build's {op} has no kernel there")


@functools.cache
def _has_cuda_kernel(op: str) -> bool:
    """Whether the loaded library has a CUDA kernel of ``op`` (fixed once it is loaded; asked
    by every glue op call on CUDA tensors)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", "CUDA")


def _cpu(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise Declined(f"a tensor on {t.device}: the scalar ops run on CPU tensors")


@register("finite_and", "ext")
def finite_and_ext(ok, values) -> torch.Tensor:
    values = list(values)
    if ok is None and not values:  # no tensor to dispatch on
        raise Declined("no tensor")
    _glue_device("finite_and", ok, *values)
    if ok is not None and ok.dtype != torch.float32:
        raise Declined(f"ok of dtype {ok.dtype}")
    if any(v.is_complex() for v in values):
        raise Declined("a complex value")
    return _ops.finite_and(ok, values)


@register("ascent_scale", "ext")
def ascent_scale_ext(norm, rho, factor, negated: bool) -> list[torch.Tensor]:
    factor_t = factor if isinstance(factor, torch.Tensor) else None
    _glue_device("ascent_scale", norm, rho, factor_t)
    if norm.dtype not in _F32_F64 or rho.dtype not in _F32_F64 or not rho.is_contiguous():
        raise Declined(f"norm {norm.dtype}, rho {rho.dtype} (contiguous: {rho.is_contiguous()})")
    if factor_t is not None and (factor_t.dim() != 0 or factor_t.dtype != norm.dtype):
        raise Declined("a factor tensor of another dtype or shape than the norm")
    f = 1.0 if factor_t is not None else float(factor)
    return _ops.ascent_scale(norm, rho, factor_t, f, bool(negated))


@register("count_step", "ext")
def count_step_ext(counters, ok) -> None:
    _glue_device("count_step_", counters, ok)
    if counters.dtype != torch.float32 or not counters.is_contiguous():
        raise Declined(f"counters of dtype {counters.dtype}")
    if ok.dtype != torch.float32:
        raise Declined(f"ok of dtype {ok.dtype}")
    _ops.count_step_(counters, ok)


# the per-tensor bookkeeping of a step (csrc/list_ops.cpp): the loop over the tensors in C++
@register("empty_like_list", "ext")
def empty_like_list_ext(like) -> list[torch.Tensor]:
    _cpu(*like)
    return list(_ops.empty_like_list(list(like)))


@register("zero_unless", "ext")
def zero_unless_ext(tensors, ok) -> None:
    _cpu(ok, *tensors)
    if ok.dtype != torch.float32:
        raise Declined(f"ok of dtype {ok.dtype}")
    _ops.zero_unless_(list(tensors), ok)


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    """One Philox4x32-10 block as the kernels compute it (a test hook; CPU)."""
    out = torch.empty(4, dtype=torch.int64)
    _ops._philox4x32_10(out, [int(c) for c in counter], [int(k) for k in key])
    return [int(v) for v in out.tolist()]


_NOISE_MATH = {"log": 0, "cos2pi": 1, "uniform": 2, "normal": 3}


def noise_math(fn: str, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The extension's float32 noise functions (csrc/ops_math.h) element by element, a test hook
    (CPU): ``"log"`` ``log_f32(x)``, ``"cos2pi"`` ``cos2pi_f32(x)``, ``"uniform"`` the uniform
    float of the uint32 words ``x`` (int64 tensor), ``"normal"`` ``normal_from_uniform(x, y)``."""
    if fn == "uniform":
        x = x.to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32)  # the same 32 bits
    x = x.contiguous()
    y = x if y is None else y.to(torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    _ops._noise_math(out, x, y, _NOISE_MATH[fn])
    return out
