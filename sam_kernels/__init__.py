"""sam_kernels: fused multi-tensor ops for the Sharpness-Aware Minimization family.

Import never fails for lack of Triton or of the compiled extension: those backends load lazily
the first time they are chosen (see :mod:`sam_kernels._backend`).
"""

from sam_kernels._backend import BACKENDS, ENV_VAR, available, backend_name
from sam_kernels.ops import (
    DECISION_ERM,
    DECISION_NONFINITE,
    DECISION_SAM,
    NOISE_KINDS,
    LinComb,
    adamw_step_,
    aesam_stats_,
    counter_uniform,
    finite_flag,
    frob_accumulate_,
    grad_norm,
    lincomb_,
    looksam_project_,
    looksam_reuse,
    noise_perturb_,
    perturb_,
    restore_,
    sgd_step_,
    uniform_threshold,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DECISION_ERM",
    "DECISION_NONFINITE",
    "DECISION_SAM",
    "ENV_VAR",
    "NOISE_KINDS",
    "LinComb",
    "adamw_step_",
    "aesam_stats_",
    "counter_uniform",
    "available",
    "backend_name",
    "finite_flag",
    "frob_accumulate_",
    "grad_norm",
    "lincomb_",
    "looksam_project_",
    "looksam_reuse",
    "noise_perturb_",
    "perturb_",
    "restore_",
    "sgd_step_",
    "uniform_threshold",
]
