"""Sharpness metrics: the loss-landscape measurements reported by the SAM-family papers.

Every function measures the **full-data loss** of a model,

    L(w) = (1/N) * sum_b n_b * L_b(w),        N = sum_b n_b,

where ``L_b`` is ``loss_fn(model(inputs_b), targets_b)`` on batch ``b`` of ``n_b`` examples (the
mean over batches weighted by batch size; with ``reduction="mean"`` losses this is the mean loss
over all examples). Gradients and Hessian-vector products (HVPs) are those of ``L``; an HVP is
computed by double backward, ``Hv = d/dw <dL/dw, v>``.

| function | quantity | reference |
| --- | --- | --- |
| :func:`gradient_norm` | ``||grad L(w)||_2`` | CR-SAM, Table 3 |
| :func:`hessian_trace` | ``Tr(H)`` by Hutchinson's estimator | Hutchinson 1989; PyHessian |
| :func:`top_hessian_eigenvalue` | dominant eigenvalue of ``H`` by power iteration | PyHessian |
| :func:`hessian_frobenius_norm` | ``||H||_F = sqrt(E||Hv||^2)``, ``v ~ N(0, I)`` | Tahmasebi 2024 |
| :func:`normalized_hessian_trace` | ``C(w) = Tr(H) / ||grad L||`` | CR-SAM eq. 4 |
| :func:`approximation_ratio` | AR of one-step SAM ascent | CR-SAM eq. 2 |
| :func:`sharpness_report` | CR-SAM Table 3 for several models | CR-SAM, Table 3 |

References: T. Wu, T. Luo, D. C. Wunsch II, "CR-SAM: Curvature Regularized Sharpness-Aware
Minimization", AAAI 2024. M. F. Hutchinson, "A stochastic estimator of the trace of the influence
matrix for Laplacian smoothing splines", 1989. Z. Yao et al., "PyHessian", IEEE BigData 2020.
B. Tahmasebi, A. Soleymani, D. Bahri, S. Jegelka, P. Jaillet, "A Universal Class of
Sharpness-Aware Minimization Algorithms", ICML 2024.

Common arguments. ``data`` is one ``(inputs, targets)`` batch or an iterable of them (a
``DataLoader``); ``model(inputs)`` is called with the inputs as its single argument. ``seed``
seeds a local ``torch.Generator`` (probes, start vectors); the global random state is left as it
was. Each pass over ``data`` runs with the global generator temporarily reseeded from ``seed``, so
a shuffling loader, random augmentation or dropout see the same numbers on every pass and the
loss is one fixed function of ``w`` (numpy/random-module augmentation is not covered). Two calls
with the same ``seed`` give identical results on the CPU; on CUDA they agree to rounding (about
1e-9 relative) unless ``torch.use_deterministic_algorithms(True)`` removes the atomics of CUDA
kernels. ``device`` (default: the device of the first trainable parameter) is where the
computation runs; batches and a copy of the weights are moved there, the model stays put.
``eval_mode=True`` (the default, as PyHessian does) evaluates the model in eval mode;
``eval_mode=False`` keeps the model's own train/eval flags (BatchNorm in train mode then uses
batch statistics). ``progress`` shows a tqdm bar (``None``: only on a terminal; no bar if tqdm is
not installed).

Every function leaves the model exactly as it was: weights, ``.grad`` fields, buffers (BatchNorm
running statistics and batch counts) and each module's train/eval flag. The model is evaluated
with :func:`torch.func.functional_call` on detached copies of its parameters and buffers and
gradients come from :func:`torch.autograd.grad`, so nothing of the model is written; the flags and
buffers are also saved and restored around the call.

Each function returns a frozen dataclass deriving from :class:`MetricResult`: ``estimate``,
``stderr`` (the standard error of a Monte-Carlo estimate; ``0.0`` for exact quantities, ``nan``
when one sample gives no error estimate), ``n`` (the number of samples behind ``stderr``) and
method-specific fields.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

try:  # optional dependency: no progress bar without it
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - exercised only where tqdm is absent
    _tqdm = None

__all__ = [
    "ApproximationRatioResult",
    "GradientNormResult",
    "HessianFrobeniusResult",
    "HessianTraceResult",
    "MetricResult",
    "NormalizedHessianTraceResult",
    "SharpnessReport",
    "SharpnessRow",
    "TopEigenvalueResult",
    "approximation_ratio",
    "gradient_norm",
    "hessian_frobenius_norm",
    "hessian_trace",
    "normalized_hessian_trace",
    "sharpness_report",
    "top_hessian_eigenvalue",
]

LossFn = Callable[[Any, Any], Tensor]
Batch = tuple[Any, Any]
Data = Batch | Iterable[Batch]
DeviceLike = torch.device | str | None


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricResult:
    """Fields shared by every metric: the estimate, its standard error and the sample count."""

    estimate: float
    stderr: float
    n: int


@dataclass(frozen=True)
class GradientNormResult(MetricResult):
    """``||grad L(w)||_2`` (exact: ``stderr == 0``; ``n`` is the number of examples)."""

    loss: float


@dataclass(frozen=True)
class HessianTraceResult(MetricResult):
    """Hutchinson estimate of ``Tr(H)``; ``n`` probes, ``samples`` the per-probe ``v^T H v``."""

    n_examples: int
    samples: tuple[float, ...]


@dataclass(frozen=True)
class TopEigenvalueResult(MetricResult):
    """Power-iteration eigenvalue of largest magnitude; ``n`` is the number of iterations.

    ``stderr`` is the residual ``||H v - lambda v||`` at the returned unit vector ``v``: an error
    bound (not a statistical standard error), since some eigenvalue of the symmetric ``H`` lies
    within it of ``estimate``.
    """

    n_examples: int
    converged: bool
    residual: float


@dataclass(frozen=True)
class HessianFrobeniusResult(MetricResult):
    """``||H||_F = sqrt(E||Hv||^2)`` over ``n`` Gaussian probes.

    ``squared``/``squared_stderr`` are the unbiased estimate of ``||H||_F^2`` and its standard
    error; ``stderr`` of the norm follows by the delta method, ``squared_stderr / (2 estimate)``.
    """

    n_examples: int
    squared: float
    squared_stderr: float
    samples: tuple[float, ...]


@dataclass(frozen=True)
class NormalizedHessianTraceResult(MetricResult):
    """``C(w) = Tr(H)/||grad L||`` (CR-SAM eq. 4); ``n`` probes for the trace.

    ``stderr = trace_stderr / grad_norm`` (the gradient norm is exact).
    """

    n_examples: int
    trace: float
    trace_stderr: float
    grad_norm: float
    loss: float


@dataclass(frozen=True)
class ApproximationRatioResult(MetricResult):
    """Mean per-example approximation ratio (CR-SAM eq. 2) over ``n`` examples.

    ``ratios`` are the per-example values; ``n_skipped`` examples had no measurable increase of
    the loss in the ball (zero gradient, or ``l(w+d*) - l(w)`` at rounding level) and are left
    out of the mean.
    """

    n_skipped: int
    rho: float
    steps: int
    ratios: tuple[float, ...]


# ----------------------------------------------------------------------------------------------
# helpers: validation, data, model state, random numbers
# ----------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _is_single_batch(data: Any) -> bool:
    """One ``(inputs, targets)`` pair (targets a tensor), as opposed to an iterable of pairs."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for v in obj:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _batch_size(inputs: Any, targets: Any) -> int:
    for t in (_first_tensor(targets), _first_tensor(inputs)):
        if t is not None and t.dim() >= 1:
            return int(t.shape[0])
    raise ValueError("data: cannot tell the batch size (no tensor with a batch dimension)")


def _tensor_vars(values: Sequence[Tensor]) -> list[Tensor]:
    return [v.detach().requires_grad_(True) for v in values]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum(torch.sum(x.double() * y.double()).item() for x, y in zip(a, b, strict=True)))


def _norm(a: Sequence[Tensor]) -> float:
    sq = sum(torch.linalg.vector_norm(x, dtype=torch.float64).item() ** 2 for x in a)
    return math.sqrt(sq)


def _mean_stderr(samples: Sequence[float]) -> tuple[float, float]:
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)


def _rademacher(like: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """Entries +-1 with probability 1/2 each, drawn on the CPU from ``gen`` (device-independent)."""
    out = []
    for p in like:
        r = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8)
        out.append(r.to(device=p.device, dtype=p.dtype).mul_(2).sub_(1))
    return out


def _gaussian(like: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """Standard normal entries drawn on the CPU from ``gen`` (device-independent)."""
    out = []
    for p in like:
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        out.append(torch.randn(p.shape, generator=gen, dtype=dt).to(device=p.device, dtype=p.dtype))
    return out


def _local_generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


@contextlib.contextmanager
def _rng_sandbox(seed: int, device: torch.device) -> Iterator[None]:
    """Run with the global generators reseeded from ``seed`` and restore them afterwards."""
    cuda: list[int] = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _preserved(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Save the model's train/eval flags and buffers, optionally switch to eval, restore after."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if eval_mode:
            for m, _ in flags:
                m.training = False
        with torch.enable_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _progress_bar(progress: bool | None, total: int | None, desc: str) -> Any:
    if progress is False or _tqdm is None:
        return None
    return _tqdm(total=total, desc=desc, leave=False, disable=None if progress is None else False)


def _tick(bar: Any) -> None:
    if bar is not None:
        bar.update(1)


def _close(bar: Any) -> None:
    if bar is not None:
        bar.close()


# ----------------------------------------------------------------------------------------------
# the objective: full-data loss, gradient, HVP
# ----------------------------------------------------------------------------------------------
class _Objective:
    """The full-data loss ``L(w) = sum_b n_b L_b(w) / N`` as a function of the trainable weights.

    The model is called through ``functional_call`` with detached copies of its parameters and
    clones of its buffers (BatchNorm in train mode updates the clones, never the model).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        device: DeviceLike,
        seed: int,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(outputs, targets)")
        named = list(model.named_parameters())
        trainable = [(n, p) for n, p in named if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        self.device = torch.device(device) if device is not None else trainable[0][1].device
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.seed = seed
        self.single = _is_single_batch(data)
        self.names = [n for n, _ in trainable]
        self.w = [p.detach().to(self.device) for _, p in trainable]
        self.frozen = {n: p.detach().to(self.device) for n, p in named if not p.requires_grad}
        self.buffers = {n: b.detach().to(self.device, copy=True) for n, b in model.named_buffers()}
        self._graph: tuple[list[Tensor], list[Tensor | None], int] | None = None
        self.n_examples: int | None = None

    # -- data --------------------------------------------------------------------------------
    def _prepare(self, batch: Any) -> tuple[Any, Any, int]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                "data must be an (inputs, targets) pair or an iterable of such pairs; "
                f"got a batch of type {type(batch).__name__}"
            )
        inputs, targets = batch
        n = _batch_size(inputs, targets)
        move = lambda t: t.to(self.device)
        return _map_tensors(inputs, move), _map_tensors(targets, move), n

    def _iterate(self) -> Iterator[tuple[Any, Any, int]]:
        total = 0
        source: Iterable[Any] = [self.data] if self.single else self.data
        for batch in source:
            inputs, targets, n = self._prepare(batch)
            if n == 0:
                continue
            total += n
            yield inputs, targets, n
        if total == 0:
            raise ValueError("data is empty: it yielded no examples")
        self.n_examples = total

    @contextlib.contextmanager
    def batches(self) -> Iterator[Iterator[tuple[Any, Any, int]]]:
        """One pass over the data, with the global generators reseeded (same pass every time).

        A context manager, so that the global random state is restored even when the pass is
        left early or by an exception.
        """
        with _rng_sandbox(self.seed, self.device):
            it = self._iterate()
            try:
                yield it
            finally:
                it.close()

    # -- evaluation --------------------------------------------------------------------------
    def loss(self, w: Sequence[Tensor], inputs: Any, targets: Any) -> Tensor:
        params = dict(zip(self.names, w, strict=True))
        params.update(self.frozen)
        out = functional_call(self.model, (params, self.buffers), (inputs,))
        loss = self.loss_fn(out, targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                "loss_fn must return a scalar (0-dim) tensor, e.g. with reduction='mean'; "
                f"got {shape}"
            )
        if not loss.is_floating_point():
            raise ValueError(f"loss_fn must return a floating-point tensor, got {loss.dtype}")
        return loss

    def _grad(self, loss: Tensor, leaves: Sequence[Tensor], create_graph: bool) -> list[Any]:
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn's result does not depend on the model's trainable parameters "
                "(was it detached or computed under torch.no_grad?)"
            )
        return list(torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True))

    def loss_and_grad_at(
        self, w: Sequence[Tensor], inputs: Any, targets: Any
    ) -> tuple[float, list[Tensor]]:
        leaves = _tensor_vars(w)
        loss = self.loss(leaves, inputs, targets)
        grads = self._grad(loss, leaves, create_graph=False)
        return loss.item(), [
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)
        ]

    def loss_and_grad(self, progress: bool | None = False) -> tuple[float, list[Tensor], int]:
        """Full-data loss, its gradient and the number of examples (one pass)."""
        acc = [torch.zeros_like(x) for x in self.w]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        bar = _progress_bar(progress, None, "gradient")
        try:
            with self.batches() as batches:
                for inputs, targets, n in batches:
                    leaves = _tensor_vars(self.w)
                    loss = self.loss(leaves, inputs, targets)
                    for a, g in zip(acc, self._grad(loss, leaves, create_graph=False), strict=True):
                        if g is not None:
                            a.add_(g, alpha=n)
                    total += loss.detach().double() * n
                    count += n
                    _tick(bar)
        finally:
            _close(bar)
        return total.item() / count, [a.div_(count) for a in acc], count

    @staticmethod
    def _hv(
        grads: Sequence[Tensor | None], leaves: Sequence[Tensor], v: Sequence[Tensor], retain: bool
    ) -> list[Tensor]:
        terms = [
            torch.sum(g * vi)
            for g, vi in zip(grads, v, strict=True)
            if g is not None and g.requires_grad
        ]
        if not terms:  # the gradient does not depend on w: H = 0
            return [torch.zeros_like(x) for x in leaves]
        dot = torch.stack(terms).sum()
        hv = torch.autograd.grad(dot, leaves, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(x) if h is None else h for h, x in zip(hv, leaves, strict=True)]

    def hvp(self, v: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` of the full-data loss, by double backward, batch by batch."""
        if self.single:  # one batch: build the gradient graph once and reuse it for every probe
            if self._graph is None:
                with self.batches() as batches:
                    for inputs, targets, n in batches:
                        leaves = _tensor_vars(self.w)
                        loss = self.loss(leaves, inputs, targets)
                        self._graph = (leaves, self._grad(loss, leaves, create_graph=True), n)
            assert self._graph is not None
            leaves, grads, _ = self._graph
            return self._hv(grads, leaves, v, retain=True)
        acc = [torch.zeros_like(x) for x in self.w]
        count = 0
        with self.batches() as batches:
            for inputs, targets, n in batches:
                leaves = _tensor_vars(self.w)
                loss = self.loss(leaves, inputs, targets)
                grads = self._grad(loss, leaves, create_graph=True)
                for a, h in zip(acc, self._hv(grads, leaves, v, retain=False), strict=True):
                    a.add_(h, alpha=n)
                count += n
        return [a.div_(count) for a in acc]


def _hutchinson(
    obj: _Objective, n_probes: int, seed: int, progress: bool | None
) -> tuple[float, float, tuple[float, ...]]:
    gen = _local_generator(seed)
    samples: list[float] = []
    bar = _progress_bar(progress, n_probes, "Hessian trace")
    try:
        for _ in range(n_probes):
            v = _rademacher(obj.w, gen)
            samples.append(_dot(v, obj.hvp(v)))
            _tick(bar)
    finally:
        _close(bar)
    mean, se = _mean_stderr(samples)
    return mean, se, tuple(samples)


# ----------------------------------------------------------------------------------------------
# public metrics
# ----------------------------------------------------------------------------------------------
def gradient_norm(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> GradientNormResult:
    """Gradient norm of the full-data loss, ``||grad L(w)||_2`` (CR-SAM, Wu et al. 2024, Table 3).

    ``grad L = (1/N) sum_b n_b grad L_b`` over all trainable parameters together (the global L2
    norm). Exact: ``stderr = 0`` and ``n`` is the number of examples. ``seed`` only fixes the
    global random state seen by the data pass (shuffling, augmentation, dropout).
    """
    _local_generator(seed)
    obj = _Objective(model, loss_fn, data, device, seed)
    with _preserved(model, eval_mode):
        loss, grad, count = obj.loss_and_grad(progress)
        return GradientNormResult(estimate=_norm(grad), stderr=0.0, n=count, loss=loss)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    n_probes: int = 100,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> HessianTraceResult:
    """Hutchinson's estimate of the Hessian trace (Hutchinson 1989; as in PyHessian).

    ``Tr(H) = E_v[v^T H v]`` for Rademacher probes ``v`` (entries +-1); the estimate is the mean
    of ``v_i^T H v_i`` over ``n_probes`` probes and ``stderr`` their standard deviation over
    ``sqrt(n_probes)`` (``nan`` for one probe). The variance per probe is
    ``2 (||H||_F^2 - sum_i H_ii^2)``: exact for a diagonal Hessian. ``H v`` is a double-backward
    Hessian-vector product of the full-data loss.
    """
    _check_int("n_probes", n_probes, 1)
    _local_generator(seed)
    obj = _Objective(model, loss_fn, data, device, seed)
    with _preserved(model, eval_mode):
        mean, se, samples = _hutchinson(obj, n_probes, seed, progress)
        return HessianTraceResult(
            estimate=mean,
            stderr=se,
            n=n_probes,
            n_examples=obj.n_examples or 0,
            samples=samples,
        )


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> TopEigenvalueResult:
    """Dominant Hessian eigenvalue by power iteration (as in PyHessian, Yao et al. 2020).

    From a Gaussian start ``v_0`` (seeded), iterate ``lambda_k = v_k^T H v_k``,
    ``v_{k+1} = H v_k / ||H v_k||`` until ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|``
    (``converged=True``) or ``max_iter`` HVPs. This finds the eigenvalue of largest **magnitude**,
    sign included (negative when the most curved direction is concave), which is the top
    eigenvalue near a minimum. ``stderr`` is the residual ``||H v - lambda v||`` (an eigenvalue
    of ``H`` lies within it of ``estimate``); ``n`` is the number of iterations.
    """
    tol = _check_positive("tol", tol)
    _check_int("max_iter", max_iter, 1)
    gen = _local_generator(seed)
    obj = _Objective(model, loss_fn, data, device, seed)
    with _preserved(model, eval_mode):
        v = _gaussian(obj.w, gen)
        nv = _norm(v)
        v = [x / nv for x in v]
        lam, prev, residual, converged, it = 0.0, None, 0.0, False, 0
        bar = _progress_bar(progress, max_iter, "top eigenvalue")
        try:
            for it in range(1, max_iter + 1):  # noqa: B007 (it is reported)
                hv = obj.hvp(v)
                lam = _dot(v, hv)
                residual = _norm([h - lam * x for h, x in zip(hv, v, strict=True)])
                _tick(bar)
                nh = _norm(hv)
                if nh == 0.0:  # v in the null space: H = 0 (a random start misses it otherwise)
                    converged = True
                    break
                if prev is not None and abs(lam - prev) <= tol * abs(lam):
                    converged = True
                    break
                prev = lam
                v = [h / nh for h in hv]
        finally:
            _close(bar)
        return TopEigenvalueResult(
            estimate=lam,
            stderr=residual,
            n=it,
            n_examples=obj.n_examples or 0,
            converged=converged,
            residual=residual,
        )


def hessian_frobenius_norm(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    n_probes: int = 100,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> HessianFrobeniusResult:
    """Hessian Frobenius norm, ``||H||_F = sqrt(E_v ||H v||^2)`` with ``v ~ N(0, I)``.

    The estimator of the universal-class paper (Tahmasebi et al. 2024, Appendix I):
    ``E||Hv||^2 = Tr(H^T H) = ||H||_F^2``. ``squared`` is the mean of ``||H v_i||^2`` over
    ``n_probes`` Gaussian probes (unbiased for ``||H||_F^2``, variance per probe ``2 Tr(H^4)``),
    ``estimate = sqrt(squared)`` and ``stderr = squared_stderr / (2 estimate)`` (delta method).
    """
    _check_int("n_probes", n_probes, 1)
    gen = _local_generator(seed)
    obj = _Objective(model, loss_fn, data, device, seed)
    with _preserved(model, eval_mode):
        samples: list[float] = []
        bar = _progress_bar(progress, n_probes, "Hessian Frobenius norm")
        try:
            for _ in range(n_probes):
                v = _gaussian(obj.w, gen)
                samples.append(_norm(obj.hvp(v)) ** 2)
                _tick(bar)
        finally:
            _close(bar)
        sq, sq_se = _mean_stderr(samples)
        est = math.sqrt(max(sq, 0.0))
        se = sq_se / (2.0 * est) if est > 0 else (0.0 if sq_se == 0 else math.nan)
        return HessianFrobeniusResult(
            estimate=est,
            stderr=se,
            n=n_probes,
            n_examples=obj.n_examples or 0,
            squared=sq,
            squared_stderr=sq_se,
            samples=tuple(samples),
        )


def normalized_hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    n_probes: int = 100,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> NormalizedHessianTraceResult:
    """Normalized Hessian trace ``C(w) = Tr(H) / ||grad L(w)||_2`` (CR-SAM, Wu et al. 2024, eq. 4).

    ``Tr(H)`` is :func:`hessian_trace` with the same ``n_probes`` and ``seed`` (same probes, same
    value) and ``||grad L||`` is :func:`gradient_norm`; ``stderr = trace_stderr / grad_norm``.
    A zero gradient gives ``inf`` (``nan`` when the trace is 0 too).
    """
    _check_int("n_probes", n_probes, 1)
    _local_generator(seed)
    obj = _Objective(model, loss_fn, data, device, seed)
    with _preserved(model, eval_mode):
        loss, grad, count = obj.loss_and_grad(False)
        gnorm = _norm(grad)
        del grad
        tr, tr_se, _ = _hutchinson(obj, n_probes, seed, progress)
        if gnorm > 0:
            c, c_se = tr / gnorm, tr_se / gnorm
        else:
            c = math.copysign(math.inf, tr) if tr != 0 else math.nan
            c_se = math.nan
        return NormalizedHessianTraceResult(
            estimate=c,
            stderr=c_se,
            n=n_probes,
            n_examples=count,
            trace=tr,
            trace_stderr=tr_se,
            grad_norm=gnorm,
            loss=loss,
        )


def approximation_ratio(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    rho: float = 0.05,
    steps: int = 20,
    step_size: float = 0.5,
    adaptive: bool = True,
    init: Literal["sam", "zero"] = "sam",
    max_examples: int | None = None,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> ApproximationRatioResult:
    """Approximation ratio of one-step SAM ascent (CR-SAM, Wu et al. 2024, eq. 2).

    Per example ``(x, y)`` with loss ``l(w) = loss_fn(model(x), y)`` (a batch of one)::

        AR(x, y) = (l(w + d) - l(w)) / (l(w + d*) - l(w)),      AR = mean over examples,

    ``d = rho g / (||g|| + 1e-12)``, ``g = grad l(w)``: the one-step SAM perturbation.
    ``d*`` approximates ``argmax_{||d|| <= rho} l(w + d)`` by ``steps`` (K = 20 as in the paper)
    steps of normalized projected gradient ascent in the rho-ball::

        d_{k+1} = P(d_k + eta_k * grad l(w + d_k) / ||grad l(w + d_k)||),
        P(d) = d * min(1, rho / ||d||)     (projection onto the L2 ball of radius rho),

    starting from ``d_0 = d`` (``init="sam"``, the default) or ``d_0 = 0`` (``init="zero"``), with
    ``eta_0 = step_size * rho``. With ``adaptive=True`` (default) the ascent is monotone: a step
    that does not increase the loss is rejected and halves ``eta``, an accepted one multiplies it
    by 1.5 (capped at ``2 rho``, the ball's diameter); ``adaptive=False`` keeps ``eta = step_size *
    rho`` fixed. Each step costs one forward and backward pass. ``l(w + d*)`` is the largest loss
    seen, the SAM point included, so every ratio is ``<= 1``; an example whose largest increase is
    not above rounding level (``8 eps |l|``) or whose gradient is zero is skipped. The paper
    averages 5000 training examples; ``max_examples`` stops after that many (in data order).
    In eval mode (the default) an example's loss does not depend on the rest of its batch.
    """
    rho = _check_positive("rho", rho)
    _check_int("steps", steps, 1)
    step_size = _check_positive("step_size", step_size)
    if init not in ("sam", "zero"):
        raise ValueError(f"init must be 'sam' or 'zero', got {init!r}")
    if max_examples is not None:
        _check_int("max_examples", max_examples, 1)
    _local_generator(seed)

    def ascent(obj: _Objective, x: Any, y: Any) -> tuple[float, float, float] | None:
        w = obj.w
        l0, g = obj.loss_and_grad_at(w, x, y)
        gn = _norm(g)
        if gn == 0.0 or not math.isfinite(gn):
            return None
        scale = rho / (gn + 1e-12)
        d_sam = [scale * gi for gi in g]
        if init == "sam":
            d = d_sam
            cur, gd = obj.loss_and_grad_at([a + b for a, b in zip(w, d, strict=True)], x, y)
            l_sam = cur
        else:
            with torch.no_grad():
                l_sam = obj.loss([a + b for a, b in zip(w, d_sam, strict=True)], x, y).item()
            d, cur, gd = [torch.zeros_like(a) for a in w], l0, g
        best = max(l_sam, cur)
        eta = step_size * rho
        for _ in range(steps):
            gdn = _norm(gd)
            if gdn == 0.0 or not math.isfinite(gdn):
                break
            cand = [a + (eta / gdn) * b for a, b in zip(d, gd, strict=True)]
            cn = _norm(cand)
            if cn > rho:
                cand = [a * (rho / cn) for a in cand]
            val, gcand = obj.loss_and_grad_at([a + b for a, b in zip(w, cand, strict=True)], x, y)
            if math.isfinite(val):
                best = max(best, val)
            if adaptive and not val > cur:
                eta *= 0.5
                continue
            d, cur, gd = cand, val, gcand
            if adaptive:
                eta = min(1.5 * eta, 2.0 * rho)
        return l0, l_sam, best

    ratios: list[float] = []
    skipped = 0
    obj = _Objective(model, loss_fn, data, device, seed)
    with _preserved(model, eval_mode):
        eps = torch.finfo(obj.w[0].dtype).eps if obj.w[0].is_floating_point() else 0.0
        bar = _progress_bar(progress, max_examples, "approximation ratio")
        seen = 0
        try:
            with obj.batches() as batches:
                for inputs, targets, n in batches:
                    for i in range(n):
                        pick = lambda t, i=i: t[i : i + 1]
                        x, y = _map_tensors(inputs, pick), _map_tensors(targets, pick)
                        res = ascent(obj, x, y)
                        seen += 1
                        _tick(bar)
                        if res is None:
                            skipped += 1
                        else:
                            l0, l_sam, best = res
                            den = best - l0
                            if not (den > 8 * eps * max(abs(l0), abs(best))):
                                skipped += 1
                            else:
                                ratios.append((l_sam - l0) / den)
                        if max_examples is not None and seen >= max_examples:
                            break
                    if max_examples is not None and seen >= max_examples:
                        break
        finally:
            _close(bar)
        if seen == 0:
            raise ValueError("data is empty: it yielded no examples")
        if ratios:
            mean, se = _mean_stderr(ratios)
        else:
            mean, se = math.nan, math.nan
        return ApproximationRatioResult(
            estimate=mean,
            stderr=se,
            n=len(ratios),
            n_skipped=skipped,
            rho=rho,
            steps=steps,
            ratios=tuple(ratios),
        )


# ----------------------------------------------------------------------------------------------
# report (CR-SAM Table 3)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SharpnessRow:
    """One model's geometry: gradient norm, Hessian trace, C(w), optionally the top eigenvalue."""

    name: str
    loss: float
    grad_norm: float
    trace: float
    trace_stderr: float
    normalized_trace: float
    normalized_trace_stderr: float
    top_eigenvalue: float | None = None
    top_eigenvalue_residual: float | None = None


def _fmt(x: float | None, se: float | None = None) -> str:
    if x is None:
        return "-"
    s = f"{x:.4g}"
    if se is not None and math.isfinite(se):
        s += f" ± {se:.2g}"
    return s


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass(frozen=True)
class SharpnessReport:
    """Several models' geometry on the same data, as in CR-SAM's Table 3.

    ``str(report)`` and :meth:`to_markdown` give the Markdown table (``±`` is the estimator's
    standard error, not a spread over runs); :meth:`to_dict` the JSON-ready content.
    """

    rows: tuple[SharpnessRow, ...]
    n_probes: int
    seed: int
    n_examples: int

    def to_markdown(self) -> str:
        eig = any(r.top_eigenvalue is not None for r in self.rows)
        head = ["optimizer", "‖∇L‖", "Tr(H)", "C(w)"] + (["λ_max"] if eig else [])
        lines = [
            "| " + " | ".join(head) + " |",
            "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |",
        ]
        for r in self.rows:
            cells = [
                r.name,
                _fmt(r.grad_norm),
                _fmt(r.trace, r.trace_stderr),
                _fmt(r.normalized_trace, r.normalized_trace_stderr),
            ]
            if eig:
                cells.append(_fmt(r.top_eigenvalue))
            lines.append("| " + " | ".join(cells) + " |")
        note = (
            f"\n{self.n_examples} examples, {self.n_probes} Hutchinson probes (seed {self.seed}); "
            "± is the estimator's standard error."
        )
        return "\n".join(lines) + "\n" + note + "\n"

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "n_probes": self.n_probes,
                "seed": self.seed,
                "n_examples": self.n_examples,
                "rows": [asdict(r) for r in self.rows],
            }
        )

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``<path>.md`` and ``<path>.json`` (a ``.md``/``.json`` suffix on ``path`` is
        replaced); returns the two paths."""
        p = Path(path)
        base = p.with_suffix("") if p.suffix in (".md", ".json") else p
        md, js = Path(f"{base}.md"), Path(f"{base}.json")
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(self.to_markdown(), encoding="utf-8")
        js.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", "utf-8")
        return md, js

    def __str__(self) -> str:
        return self.to_markdown()


def sharpness_report(
    models: Mapping[str, nn.Module],
    loss_fn: LossFn,
    data: Data,
    *,
    n_probes: int = 100,
    seed: int = 0,
    top_eigenvalue: bool = False,
    tol: float = 1e-3,
    max_iter: int = 100,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
    path: str | os.PathLike[str] | None = None,
    show: bool = True,
) -> SharpnessReport:
    """Model geometry of several models on the same data: CR-SAM (Wu et al. 2024) Table 3.

    For each ``name -> model`` (the name is the table's "optimizer" column): ``||grad L||``,
    ``Tr(H)`` (Hutchinson, ``n_probes`` Rademacher probes; the same ``seed``, hence the same
    probes, for every model) and ``C(w) = Tr(H)/||grad L||`` from one
    :func:`normalized_hessian_trace` call; with ``top_eigenvalue=True`` also
    :func:`top_hessian_eigenvalue` (``tol``, ``max_iter``). Prints the Markdown table when
    ``show``; with ``path`` saves it as ``<path>.md`` and ``<path>.json``.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping of name -> nn.Module")
    _check_int("n_probes", n_probes, 1)
    rows = []
    n_examples = 0
    for name, model in models.items():
        c = normalized_hessian_trace(
            model,
            loss_fn,
            data,
            n_probes=n_probes,
            seed=seed,
            device=device,
            progress=progress,
            eval_mode=eval_mode,
        )
        n_examples = c.n_examples
        eig = None
        if top_eigenvalue:
            eig = top_hessian_eigenvalue(
                model,
                loss_fn,
                data,
                tol=tol,
                max_iter=max_iter,
                seed=seed,
                device=device,
                progress=progress,
                eval_mode=eval_mode,
            )
        rows.append(
            SharpnessRow(
                name=str(name),
                loss=c.loss,
                grad_norm=c.grad_norm,
                trace=c.trace,
                trace_stderr=c.trace_stderr,
                normalized_trace=c.estimate,
                normalized_trace_stderr=c.stderr,
                top_eigenvalue=None if eig is None else eig.estimate,
                top_eigenvalue_residual=None if eig is None else eig.residual,
            )
        )
    report = SharpnessReport(rows=tuple(rows), n_probes=n_probes, seed=seed, n_examples=n_examples)
    if path is not None:
        report.save(path)
    if show:
        print(report.to_markdown())
    return report
