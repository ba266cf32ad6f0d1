"""Batch-norm running statistics during evaluations at perturbed weights.

The SAM family evaluates the loss at perturbed points; only the evaluation at the unperturbed
weights may update BN running statistics. Two tools:

- :func:`preserve_bn_stats` (used by the optimizers when ``model=`` is given): saves every BN
  buffer (running mean, running variance, batch count) before a perturbed evaluation and copies it
  back afterwards, touching no attribute a user may set (never ``momentum``).
- :func:`disable_running_stats` / :func:`enable_running_stats`: davda54/sam's helpers (BN momentum
  set to 0 for the second pass, the old value kept in ``backup_momentum``), for user code written
  for that package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    bufs: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                b = getattr(m, name, None)
                if b is not None:
                    bufs.append(b)
    return bufs


class BNStatsKeeper:
    """Saves and restores a model's BN buffers with two foreach copies (buffers reused)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._saved: list[torch.Tensor] = []
        self._live: list[torch.Tensor] = []

    def save(self) -> None:
        live = _bn_buffers(self.model)
        if len(live) != len(self._live) or any(a is not b for a, b in zip(live, self._live)):
            self._live = live
            self._saved = [b.detach().clone() for b in live]
        elif live:
            torch._foreach_copy_(self._saved, [b.detach() for b in live])

    def restore(self) -> None:
        if self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._saved)


@contextmanager
def preserve_bn_stats(keeper: BNStatsKeeper | None) -> Iterator[None]:
    """Run the body, then put every BN buffer back as it was before (no-op for None)."""
    if keeper is None:
        yield
        return
    keeper.save()
    try:
        yield
    finally:
        keeper.restore()


def disable_running_stats(model: nn.Module) -> None:
    """davda54/sam's helper: BN momentum 0 (statistics frozen), old value in backup_momentum."""

    def _disable(module: nn.Module) -> None:
        if isinstance(module, _BatchNorm):
            module.backup_momentum = module.momentum
            module.momentum = 0

    model.apply(_disable)


def enable_running_stats(model: nn.Module) -> None:
    """davda54/sam's helper: restore the BN momentum saved by :func:`disable_running_stats`."""

    def _enable(module: nn.Module) -> None:
        if isinstance(module, _BatchNorm) and hasattr(module, "backup_momentum"):
            module.momentum = module.backup_momentum

    model.apply(_enable)
