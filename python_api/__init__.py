"""python_api: the SAM-family optimizers and sharpness metrics, built on :mod:`sam_kernels`."""

__version__ = "0.1.0"  # the distribution's (sam-kernels, pyproject.toml)

from python_api._base import NonFiniteError, SAMFamily
from python_api.aesam import AESAM, AELookSAM
from python_api.batchnorm import disable_running_stats, enable_running_stats
from python_api.crsam import CRSAM
from python_api.distributed import SAMDDPStep, sam_ddp_step
from python_api.esam import ESAM
from python_api.friendly_sam import FriendlySAM
from python_api.gsam import GSAM
from python_api.looksam import LookSAM
from python_api.metrics import (
    approximation_ratio,
    gradient_norm,
    hessian_frobenius_norm,
    hessian_trace,
    normalized_hessian_trace,
    sharpness_report,
    top_hessian_eigenvalue,
)
from python_api.msam import MSAM, AdamWMSAM
from python_api.recipes import accumulate_closure, param_groups_no_decay
from python_api.rsam import RSAM
from python_api.sam import SAM
from python_api.schedulers import (
    ConstantRho,
    CosineRho,
    LinearRho,
    ProportionalRho,
    RhoScheduler,
    SequentialRho,
    WarmupCosineRho,
)
from python_api.sharded import FSDP2SAMStep, LocalShards, sharded_grad_norm
from python_api.sssam import SSSAM
from python_api.universal import DetSAM, FrobSAM, TraceSAM

__all__ = [
    "AELookSAM",
    "AESAM",
    "AdamWMSAM",
    "CRSAM",
    "ConstantRho",
    "CosineRho",
    "DetSAM",
    "ESAM",
    "FSDP2SAMStep",
    "FriendlySAM",
    "FrobSAM",
    "GSAM",
    "LinearRho",
    "LocalShards",
    "LookSAM",
    "MSAM",
    "NonFiniteError",
    "ProportionalRho",
    "RSAM",
    "RhoScheduler",
    "SAM",
    "SAMDDPStep",
    "SAMFamily",
    "SSSAM",
    "SequentialRho",
    "TraceSAM",
    "WarmupCosineRho",
    "accumulate_closure",
    "approximation_ratio",
    "disable_running_stats",
    "enable_running_stats",
    "gradient_norm",
    "hessian_frobenius_norm",
    "hessian_trace",
    "normalized_hessian_trace",
    "param_groups_no_decay",
    "sam_ddp_step",
    "sharded_grad_norm",
    "sharpness_report",
    "top_hessian_eigenvalue",
]
