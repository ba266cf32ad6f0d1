"""AE-SAM statistics and decision in one op (Jiang et al., ICLR 2023).

```
s_t   = ||g0||^2
mu_t  = delta * mu_{t-1} + (1 - delta) * s_t
var_t = delta * var_{t-1} + (1 - delta) * (s_t - mu_t)^2
SAM this step  iff  s_t >= mu_t + c_t * sqrt(var_t)
```
``s_t`` is summed in fp64 on every backend and kept in fp32, as ``stats`` is: a squared norm
beyond the fp32 range (about 3.4e38) counts as non-finite, and ``var`` (in units of
``||g||^4``) saturates to ``inf`` from ``||g||`` ~ 4e9 on.
``stats`` is a float32 device tensor ``[mu, var]`` updated in place (starting at 0). The result
is a 0-d int32 device tensor: 1 = SAM step, 0 = ERM step, -1 = the gradient is not finite (then
``stats`` is left unchanged). It is the one value the host reads per AE-SAM step.
"""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops._common import TensorList, check_lists, pick
from sam_kernels.ops._declare import declare, run

DECISION_SAM = 1
DECISION_ERM = 0
DECISION_NONFINITE = -1


def aesam_stats_(
    grads: TensorList,
    stats: torch.Tensor,
    *,
    delta: float,
    c: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Update ``stats = [mu, var]`` with ``s = ||grads||^2`` and return the decision (a 0-d
    int32 tensor; the declared op: ``torch.ops.sam_kernels.aesam_stats_``)."""
    return run(DECLARED, backend, grads, stats, delta, c)


def _choose(backend, grads, stats, delta, c):
    if stats.shape != (2,) or stats.dtype != torch.float32:
        raise ValueError("stats must be a float32 tensor of shape [2] holding [mu, var]")
    device = check_lists(("grads",), grads)
    if device is not None and stats.device != device:
        raise ValueError(f"stats is on {stats.device} but grads are on {device}")
    return pick("aesam_stats", backend, ("grads",), grads)


DECLARED = declare(
    "aesam_stats",
    "aesam_stats_(Tensor[] grads, Tensor(a!) stats, float delta, float c, "
    "str? backend=None) -> Tensor",
    _choose,
    fake=lambda grads, stats, delta, c, backend=None: stats.new_empty((), dtype=torch.int32),
)


@register("aesam_stats", "eager")
def aesam_stats_eager(grads, stats, delta, c) -> torch.Tensor:
    grads = list(grads)
    if grads:
        # accumulated in fp64 (see grad_norm), kept in fp32 as the statistics are: a squared
        # norm beyond the fp32 range (~3.4e38) counts as non-finite
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
        s = torch.stack(norms).square().sum().float()
    else:
        s = torch.zeros((), dtype=torch.float32, device=stats.device)
    finite = torch.isfinite(s)
    mu = delta * stats[0] + (1.0 - delta) * s
    var = delta * stats[1] + (1.0 - delta) * (s - mu) ** 2
    use_sam = s >= mu + c * torch.sqrt(var)
    new = torch.stack([mu, var])
    stats.copy_(torch.where(finite, new, stats))
    decision = torch.where(use_sam, DECISION_SAM, DECISION_ERM)
    return torch.where(finite, decision, DECISION_NONFINITE).to(torch.int32)
