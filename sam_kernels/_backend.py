"""The one place that picks a backend for a fused op.

Every op in :mod:`sam_kernels.ops` has one signature for all backends. Backends register an
implementation per op name with :func:`register`; :func:`resolve` chooses which one runs:

1. the ``backend=`` argument of the call, if given;
2. else the environment variable ``SAM_KERNELS_BACKEND`` (``eager``, ``triton``, ``ext``);
3. else by device: CUDA tensors use Triton when it is importable (then the compiled extension,
   then eager); CPU tensors use the compiled extension when it is built (its vectorised CPU
   kernels), else eager; every other device uses eager.

Backends: ``"eager"`` (the PyTorch reference, every device and dtype), ``"triton"`` (CUDA
tensors; CPU tensors only under ``TRITON_INTERPRET=1``) and ``"ext"``, the compiled C++/CUDA
extension built from ``csrc/`` (CPU and CUDA tensors). ``"cuda"`` is the extension's former
name and still selects it.

Two exceptions to the CPU default: ``noise_perturb`` and ``filter_noise_perturb`` (R-SAM's
filter-wise noise) stay on eager for CPU tensors unless a backend is asked for, because their
eager implementations draw from the global generator, the reference code's random stream
(dbahri/universal_sam, R-SAM's per-tensor ``torch.randn``, on the CPU), when no seed is given;
the fused backends, and eager given a ``seed``, draw from the counter-based ``(seed, offset)``
stream instead (:mod:`sam_kernels.ops.philox`: the same bits on eager, Triton and the
extension).

A backend that is asked for explicitly but cannot run raises a ``RuntimeError`` that says why;
the automatic choice never fails (eager runs everywhere).

A backend may also decline one call: an implementation raises :class:`Declined` before it
writes anything when these arguments are outside what its kernels take (a dtype, a layout, more
gradient terms than a kernel combines). The call then runs on the next implementation of the
chain :func:`resolve` builds (on CUDA tensors the other fused backend, then eager): this module
is the only place that falls back; no backend calls another one itself.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("eager", "triton", "ext")
#: former names that still select a backend
ALIASES = {"cuda": "ext"}
#: ops whose CPU default stays the eager reference (see the module docstring)
_EAGER_BY_DEFAULT_ON_CPU = frozenset({"noise_perturb", "filter_noise_perturb"})
ENV_VAR = "SAM_KERNELS_BACKEND"
_INTERPRET = "TRITON_INTERPRET"

# op name -> backend name -> implementation
_REGISTRY: dict[str, dict[str, Callable]] = {}
# backend name -> module that registers its implementations when imported (lazy, so that
# `import sam_kernels` never fails or slows down when triton / the extension are missing)
_LAZY_MODULES = {"triton": "sam_kernels.triton", "ext": "sam_kernels.cuda_ext"}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED: set[str] = {"eager"}


class Declined(Exception):
    """Raised by a backend's implementation, before it writes anything, for arguments its
    kernels do not take: the chooser runs the next implementation of the chain instead."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    backend = ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        _RESOLVED.clear()  # a chain may now include it
        return fn

    return deco


# run, not traced, while torch.compile traces (an import is not traceable): a constant there
@torch.compiler.assume_constant_result
def _load(backend: str) -> bool:
    """Import a lazily registered backend once; remember why it failed."""
    if backend in _LOADED:
        return True
    if backend in _LOAD_ERRORS:
        return False
    try:
        importlib.import_module(_LAZY_MODULES[backend])
    except Exception as exc:  # ImportError, missing compiled library, broken triton install
        _LOAD_ERRORS[backend] = f"{type(exc).__name__}: {exc}"
        return False
    _LOADED.add(backend)
    return True


def _triton_can_run(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # The Triton interpreter runs kernels on CPU tensors (used by the test-suite).
    return device.type == "cpu" and os.environ.get(_INTERPRET, "0") == "1"


def available(backend: str, device: torch.device | str = "cpu") -> bool:
    """True if ``backend`` can run ops on tensors of ``device``."""
    device = torch.device(device)
    backend = ALIASES.get(backend, backend)
    if backend == "eager":
        return True
    if backend == "triton":
        return _triton_can_run(device) and _load("triton")
    if backend == "ext":
        if not _load("ext"):
            return False
        from sam_kernels import cuda_ext

        return cuda_ext.supports(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def why_unavailable(backend: str, device: torch.device | str) -> str:
    device = torch.device(device)
    backend = ALIASES.get(backend, backend)
    if backend == "triton" and not _triton_can_run(device):
        return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    if backend in _LOAD_ERRORS:
        return f"importing the {backend} backend failed: {_LOAD_ERRORS[backend]}"
    return f"the {backend} backend does not support device {device}"


def _ext_quietly(device: torch.device) -> bool:
    """``available("ext", device)`` without the extension's "not built" warning: the automatic
    choice falls back to eager silently (a request for ``"ext"`` still says why it failed)."""
    if "ext" in _LOADED or "ext" in _LOAD_ERRORS:  # loaded (or failed) once: no warning left
        return available("ext", device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return available("ext", device)


def default_backend(device: torch.device, op: str | None = None) -> str:
    """The automatic choice for tensors on ``device`` (for ``op``, when given)."""
    if device.type == "cuda":
        for name in ("triton", "ext"):
            if available(name, device):
                return name
    elif device.type == "cpu" and op not in _EAGER_BY_DEFAULT_ON_CPU and _ext_quietly(device):
        return "ext"
    return "eager"


def requested_backend(backend: str | None) -> str | None:
    """The explicitly requested backend (argument, else environment), validated."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if name is not None:
        name = name.strip().lower()
        name = ALIASES.get(name, name)
        if name not in BACKENDS:
            source = "backend" if backend is not None else ENV_VAR
            raise ValueError(
                f"{source}={name!r} is not a backend; expected one of {BACKENDS} (or the "
                f"former name 'cuda' for 'ext')"
            )
    return name


def common_device(tensors: Sequence[torch.Tensor], what: str = "tensors") -> torch.device | None:
    """The single device of ``tensors``; a clear error if they are on several."""
    device = None
    for t in tensors:
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(
                f"{what} are on different devices ({device} and {t.device}); one fused call "
                "takes tensors of one device"
            )
    return device


#: dtypes the fused backends implement; tensors of other dtypes (float64) run on eager
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve(
    op: str, device: torch.device | None, backend: str | None = None, fusable: bool = True
) -> Callable:
    """The implementation of ``op`` to run for tensors on ``device``.

    ``fusable=False`` (some tensor's dtype is not in :data:`FUSED_DTYPES`) always gives the
    eager reference, which handles every floating dtype. Where a fused implementation is
    chosen, the callable returned runs it and, if it raises :class:`Declined`, the next one
    of :func:`candidates` (eager last, which never declines).
    """
    if torch.compiler.is_compiling():  # traced: no cache for dynamo to guard on
        return _resolve(op, device, backend, fusable)
    key = (op, device, backend, fusable, os.environ.get(ENV_VAR), os.environ.get(_INTERPRET))
    impl = _RESOLVED.get(key)
    if impl is None:
        impl = _RESOLVED[key] = _resolve(op, device, backend, fusable)
    return impl


def _resolve(op: str, device: torch.device | None, backend: str | None, fusable: bool) -> Callable:
    chain = candidates(op, device, backend, fusable)
    if len(chain) == 1:
        return chain[0]
    return functools.partial(_run_chain, chain)


# What resolve() picked, per (op, device, backend, fusable) and the two environment variables
# it reads: the choice is otherwise fixed once the backends are loaded (they register their
# implementations when they load, which clears it). Every fused op call asks: 6 us of checks
# and environment reads per call without it (8 calls in a SAM step). A test that patches the
# registry or `available` clears it.
_RESOLVED: dict[tuple, Callable] = {}


def eager_impl(op: str) -> Callable:
    """The eager reference implementation of ``op``."""
    return _REGISTRY[op]["eager"]


def _run_chain(chain: tuple[Callable, ...], *args):
    for impl in chain[:-1]:
        try:
            return impl(*args)
        except Declined:
            continue
    return chain[-1](*args)


def candidates(
    op: str, device: torch.device | None, backend: str | None = None, fusable: bool = True
) -> tuple[Callable, ...]:
    """The implementations :func:`resolve` tries for ``op``, in order; eager is the last."""
    device = device or torch.device("cpu")
    name = requested_backend(backend)
    # the backend is chosen (and loaded, which registers its implementations) before the
    # registry is read: torch.compile guards on what it read
    if fusable:
        if name is None:
            name = default_backend(device, op)
        elif not available(name, device):
            raise RuntimeError(
                f"sam_kernels backend {name!r} was requested for op {op!r} but cannot run: "
                + why_unavailable(name, device)
            )
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"no fused op named {op!r}")
    eager = impls["eager"]
    if not fusable:
        return (eager,)
    # Backends may implement only part of the op set, or decline a call: on CUDA tensors the
    # other fused backend comes next when it has the op and can run (the extension's ``dot``
    # and ``filter_noise_perturb`` are CPU kernels that decline CUDA tensors: Triton's kernels
    # instead of eager's loop of per-tensor ops), then the reference implementation.
    chain = [impls[name]] if name in impls else []
    if device.type == "cuda":
        for other in ("triton", "ext"):
            if other != name and other in impls and available(other, device):
                chain.append(impls[other])
    if not chain or chain[-1] is not eager:
        chain.append(eager)
    return tuple(chain)


def backend_name(device: torch.device | str, backend: str | None = None) -> str:
    """Which backend :func:`resolve` picks for ``device`` (for logs and benchmarks)."""
    device = torch.device(device)
    name = requested_backend(backend)
    if name is None:
        return default_backend(device)
    if not available(name, device):
        raise RuntimeError(
            f"sam_kernels backend {name!r} cannot run: " + why_unavailable(name, device)
        )
    return name


def has_implementation(op: str, backend: str) -> bool:
    """Whether ``backend`` registers its own implementation of ``op`` (loading it if lazy)."""
    backend = ALIASES.get(backend, backend)
    if backend in _LAZY_MODULES:
        _load(backend)
    return backend in _REGISTRY.get(op, {})


def runs_on(op: str, tensors: Sequence[torch.Tensor], backend: str | None = None) -> str:
    """The backend whose implementation of ``op`` runs first for ``tensors`` (as
    :func:`resolve` picks it: on CUDA tensors the other fused backend where the chosen one
    lacks the op, and ``"eager"`` where no fused backend has it or a dtype is not fused; a
    call whose arguments that backend declines runs on the next one)."""
    device = tensors[0].device if len(tensors) else None
    fusable = all(t.dtype in FUSED_DTYPES for t in tensors)
    impl = candidates(op, device, backend, fusable)[0]
    for name, fn in _REGISTRY[op].items():
        if fn is impl and name != "eager":
            return name
    return "eager"
