"""sam_kernels: fused multi-tensor ops for the Sharpness-Aware Minimization family.

Import never fails for lack of Triton or of the compiled extension: those backends load lazily
the first time they are chosen (see :mod:`sam_kernels._backend`).
"""

from sam_kernels._backend import (
    BACKENDS,
    ENV_VAR,
    FUSED_DTYPES,
    Declined,
    available,
    backend_name,
    has_implementation,
    requested_backend,
    runs_on,
    why_unavailable,
)
from sam_kernels.identity import same_entries, same_group_params, same_values
from sam_kernels.ops import (
    DECISION_ERM,
    DECISION_NONFINITE,
    DECISION_SAM,
    NOISE_KINDS,
    LinComb,
    adamw_step_,
    aesam_stats_,
    ascent_scale,
    check_lists,
    check_no_overlap,
    count_step_,
    counter_uniform,
    dot,
    empty_like_list,
    filter_noise_perturb_,
    finite_and,
    finite_flag,
    frob_accumulate_,
    grad_norm,
    lincomb_,
    looksam_project_,
    looksam_reuse,
    noise_perturb_,
    perturb_,
    prevalidated,
    restore_,
    sanitize,
    sanitize_,
    select_,
    sgd_step_,
    uniform_threshold,
    zero_unless_,
)
from sam_kernels.step_plan import SamStepPlan
from sam_kernels.step_plan import available as step_plan_available

__version__ = "0.1.0"  # the distribution's (pyproject.toml); python_api has the same

# python_api's public names: ``from sam_kernels import SAM`` is the obvious wrong import (this
# package holds the ops; it never imports python_api, so the list is kept here and checked
# against python_api.__all__ by tests/optim/test_conventions.py)
_PYTHON_API_NAMES = frozenset(
    {
        "AELookSAM", "AESAM", "CRSAM", "DetSAM", "ESAM", "FSDP2SAMStep", "FrobSAM", "GSAM",
        "FriendlySAM", "RSAM",
        "LocalShards", "LookSAM", "NonFiniteError", "SAM", "SAMDDPStep", "SAMFamily", "SSSAM",
        "TraceSAM", "accumulate_closure", "approximation_ratio", "disable_running_stats",
        "enable_running_stats", "gradient_norm", "hessian_frobenius_norm", "hessian_trace",
        "normalized_hessian_trace", "param_groups_no_decay", "sam_ddp_step",
        "sharded_grad_norm", "sharpness_report", "top_hessian_eigenvalue",
        "ConstantRho", "CosineRho", "LinearRho", "ProportionalRho", "RhoScheduler",
        "SequentialRho", "WarmupCosineRho", "MSAM", "AdamWMSAM",
    }
)  # fmt: skip


def __getattr__(name: str):
    if name in _PYTHON_API_NAMES or name == "ASAM":
        # ImportError, not AttributeError: ``from sam_kernels import SAM`` turns an
        # AttributeError into a bare "cannot import name" and drops this message
        real = "SAM" if name == "ASAM" else name
        hint = " (ASAM is SAM(..., adaptive=True))" if name == "ASAM" else ""
        raise ImportError(
            f"sam_kernels has no {name!r}: it holds the fused ops; the optimizers live in "
            f"python_api: from python_api import {real}{hint}",
            name=__name__,
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "DECISION_ERM",
    "DECISION_NONFINITE",
    "DECISION_SAM",
    "ENV_VAR",
    "FUSED_DTYPES",
    "Declined",
    "NOISE_KINDS",
    "LinComb",
    "SamStepPlan",
    "adamw_step_",
    "aesam_stats_",
    "ascent_scale",
    "check_lists",
    "check_no_overlap",
    "count_step_",
    "counter_uniform",
    "available",
    "backend_name",
    "dot",
    "empty_like_list",
    "filter_noise_perturb_",
    "finite_and",
    "finite_flag",
    "frob_accumulate_",
    "grad_norm",
    "has_implementation",
    "lincomb_",
    "looksam_project_",
    "looksam_reuse",
    "noise_perturb_",
    "perturb_",
    "prevalidated",
    "requested_backend",
    "restore_",
    "runs_on",
    "same_entries",
    "same_group_params",
    "same_values",
    "sanitize",
    "sanitize_",
    "select_",
    "sgd_step_",
    "step_plan_available",
    "uniform_threshold",
    "why_unavailable",
    "zero_unless_",
]
