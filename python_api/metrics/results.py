"""The result types: one frozen dataclass per metric, all deriving from :class:`MetricResult`.

Kept apart from the estimators so that code which only reads results (a report, a logger, a
saved table) needs none of the Hessian machinery.
"""

from __future__ import annotations

from dataclasses import dataclass


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
