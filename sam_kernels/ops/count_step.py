"""The step/skip counters in one op: ``counters += [ok, 1 - ok]``.

Every SAM-family step ends by counting itself on the device, with no host read:
``counters = [steps applied, steps skipped]`` (float32 [2]) and the step's flag ``ok``
(float32 0-d, 1.0 applied / 0.0 skipped). As ATen ops: ``rsub``, ``stack``, ``add_``; here one.
The eager reference is that chain; the extension's CPU op and CUDA kernel (one launch) add
the same float32 values (bit-identical).
"""

from __future__ import annotations

import torch

from sam_kernels._backend import common_device, register, resolve
from sam_kernels.ops._declare import declare, run


def count_step_(counters: torch.Tensor, ok: torch.Tensor, *, backend: str | None = None) -> None:
    """``counters += [ok, 1 - ok]`` in place (a float32 [2] tensor and a 0-d flag on its device;
    no host read). The declared op: ``torch.ops.sam_kernels.count_step_``."""
    run(DECLARED, backend, counters, ok)


def _choose(backend, counters, ok):
    if counters.shape != (2,) or ok.dim() != 0:
        raise ValueError(
            f"count_step_ takes counters of shape [2] and a 0-d ok, got {tuple(counters.shape)} "
            f"and {tuple(ok.shape)}"
        )
    device = common_device([counters, ok], "counters and ok")
    return resolve("count_step", device, backend)


DECLARED = declare(
    "count_step",
    "count_step_(Tensor(a!) counters, Tensor ok, str? backend=None) -> ()",
    _choose,
)


@register("count_step", "eager")
def count_step_eager(counters: torch.Tensor, ok: torch.Tensor) -> None:
    counters.add_(torch.stack([ok, 1.0 - ok]))
