"""The fused-op interface: one function per hot spot, over lists of tensors.

Each op validates its lists (lengths, dense, one device) and calls the implementation the
backend chooser (:mod:`sam_kernels._backend`) picks. Every op has an eager reference built from
``torch._foreach_*`` in the same file; other backends register under the same op name.
"""

from sam_kernels.ops._common import (
    check_lists,
    check_no_overlap,
    prevalidated,
    sanitize,
    sanitize_,
    select_,
)
from sam_kernels.ops.adamw_step import adamw_step_
from sam_kernels.ops.aesam_stats import (
    DECISION_ERM,
    DECISION_NONFINITE,
    DECISION_SAM,
    aesam_stats_,
)
from sam_kernels.ops.ascent_scale import ascent_scale
from sam_kernels.ops.count_step import count_step_
from sam_kernels.ops.counter_rng import counter_uniform, uniform_threshold
from sam_kernels.ops.dot import dot
from sam_kernels.ops.filter_noise import filter_noise_perturb_
from sam_kernels.ops.finite_and import finite_and
from sam_kernels.ops.frob_accumulate import frob_accumulate_
from sam_kernels.ops.grad_norm import finite_flag, grad_norm
from sam_kernels.ops.lincomb import LinComb, lincomb_
from sam_kernels.ops.looksam import looksam_project_, looksam_reuse
from sam_kernels.ops.perturb import NOISE_KINDS, noise_perturb_, perturb_
from sam_kernels.ops.restore import restore_
from sam_kernels.ops.scratch import empty_like_list, zero_unless_
from sam_kernels.ops.sgd_step import sgd_step_

__all__ = [
    "DECISION_ERM",
    "DECISION_NONFINITE",
    "DECISION_SAM",
    "NOISE_KINDS",
    "LinComb",
    "adamw_step_",
    "ascent_scale",
    "check_lists",
    "check_no_overlap",
    "aesam_stats_",
    "count_step_",
    "counter_uniform",
    "dot",
    "empty_like_list",
    "filter_noise_perturb_",
    "finite_and",
    "finite_flag",
    "frob_accumulate_",
    "grad_norm",
    "lincomb_",
    "looksam_project_",
    "looksam_reuse",
    "noise_perturb_",
    "perturb_",
    "prevalidated",
    "restore_",
    "sanitize",
    "sanitize_",
    "select_",
    "sgd_step_",
    "zero_unless_",
    "uniform_threshold",
]
