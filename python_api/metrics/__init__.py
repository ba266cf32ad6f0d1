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

Layout (one job per file): ``_objective.py`` the loss/gradient/HVP engine over a model and data;
``_data.py`` the accepted data and batch handling; ``_rng.py`` the probe generator and the
global-RNG sandbox of a data pass; ``_measure.py`` the skeleton every estimator runs in;
``_progress.py`` the optional tqdm bar; ``_numerics.py`` float64 reductions and sample means;
``_checks.py`` argument validation; ``estimators.py`` the six metrics; ``results.py`` their
result types; ``report.py`` the CR-SAM Table 3 report and its files.
"""

from __future__ import annotations

from python_api.metrics._data import Batch as Batch
from python_api.metrics._data import Data as Data
from python_api.metrics._data import DeviceLike as DeviceLike
from python_api.metrics._data import LossFn as LossFn
from python_api.metrics.estimators import (
    approximation_ratio,
    gradient_norm,
    hessian_frobenius_norm,
    hessian_trace,
    normalized_hessian_trace,
    top_hessian_eigenvalue,
)
from python_api.metrics.report import SharpnessReport, SharpnessRow, sharpness_report
from python_api.metrics.results import (
    ApproximationRatioResult,
    GradientNormResult,
    HessianFrobeniusResult,
    HessianTraceResult,
    MetricResult,
    NormalizedHessianTraceResult,
    TopEigenvalueResult,
)

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
