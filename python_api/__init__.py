"""python_api: the SAM-family optimizers and sharpness metrics, built on :mod:`sam_kernels`."""

from python_api._base import NonFiniteError, SAMFamily
from python_api.batchnorm import disable_running_stats, enable_running_stats
from python_api.metrics import (
    approximation_ratio,
    gradient_norm,
    hessian_frobenius_norm,
    hessian_trace,
    normalized_hessian_trace,
    sharpness_report,
    top_hessian_eigenvalue,
)
from python_api.sam import SAM

__all__ = [
    "SAM",
    "NonFiniteError",
    "SAMFamily",
    "approximation_ratio",
    "gradient_norm",
    "hessian_frobenius_norm",
    "hessian_trace",
    "normalized_hessian_trace",
    "sharpness_report",
    "top_hessian_eigenvalue",
    "disable_running_stats",
    "enable_running_stats",
]
