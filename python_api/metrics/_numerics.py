"""Reductions over weight-shaped lists of tensors, and the mean of Monte-Carlo samples.

Everything is accumulated in float64 on the host, so an estimate does not depend on the
parameters' dtype beyond the HVPs themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``<a, b>`` over all tensors together."""
    return float(sum(torch.sum(x.double() * y.double()).item() for x, y in zip(a, b, strict=True)))


def norm(a: Sequence[Tensor]) -> float:
    """Global L2 norm over all tensors together."""
    sq = sum(torch.linalg.vector_norm(x, dtype=torch.float64).item() ** 2 for x in a)
    return math.sqrt(sq)


def mean_stderr(samples: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error (``nan`` for one sample: no spread to estimate)."""
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)
