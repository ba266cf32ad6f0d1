"""Helpers for training recipes: timm-style parameter groups and gradient accumulation.

- :func:`param_groups_no_decay`: the ViT/ConvNeXt recipe (timm's
  ``param_groups_weight_decay``) extended with SAM's ``rho``: biases, normalisation weights and
  the model's ``no_weight_decay()`` names get ``weight_decay=0`` and ``rho=0`` (not perturbed;
  they still count in the global gradient norm, as the spec's per-group rule says). Works
  without timm.
- :func:`accumulate_closure`: a closure that runs several micro-batches (forward and backward
  each) and leaves the gradient of the whole batch, for memory-bound batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["NORM_LAYERS", "accumulate_closure", "param_groups_no_decay"]

#: module types whose parameters are "norm" parameters (no decay, no perturbation)
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    _NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups_no_decay(
    model: nn.Module,
    weight_decay: float,
    rho: float,
    *,
    no_decay_rho: float = 0.0,
    skip_list: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Two parameter groups: ``{weight_decay, rho}`` and ``{0, no_decay_rho}``.

    A trainable parameter goes to the second ("no decay") group when it is 0- or 1-dimensional
    (biases, norm scales, as timm's rule ``ndim <= 1``), its name ends in ``.bias``, it belongs
    to a normalisation layer (:data:`NORM_LAYERS`), or its name is in ``skip_list`` or in
    ``model.no_weight_decay()`` (timm's hook, e.g. ``pos_embed``, ``cls_token``). Frozen
    parameters (``requires_grad=False``) are left out. Empty groups are dropped.

    Use with any optimizer of the family, e.g.
    ``SAM(param_groups_no_decay(model, 0.05, rho=2.0), torch.optim.AdamW, adaptive=True,
    lr=1e-3)``; the group values override the constructor's ``weight_decay`` and ``rho``.
    """
    if weight_decay < 0 or rho < 0 or no_decay_rho < 0:
        raise ValueError("weight_decay, rho and no_decay_rho must be >= 0")
    skip = set(skip_list)
    hook = getattr(model, "no_weight_decay", None)
    if callable(hook):
        skip |= set(hook())
    norm_params: set[int] = set()
    for m in model.modules():
        if isinstance(m, NORM_LAYERS):
            norm_params.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or id(p) in norm_params or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "rho": rho},
        {"params": no_decay, "weight_decay": 0.0, "rho": no_decay_rho},
    ]
    return [g for g in groups if g["params"]]


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    if isinstance(batch, dict) and batch:
        first = next(iter(batch.values()))
        if isinstance(first, torch.Tensor):
            return first.shape[0]
    raise TypeError("cannot infer a micro-batch's size: pass sizes=")


def accumulate_closure(
    loss_of: Callable[[Any], torch.Tensor],
    micro_batches: Sequence[Any],
    *,
    reduction: str = "mean",
    sizes: Sequence[int] | None = None,
    no_sync_model: nn.Module | None = None,
    scaler: Any = None,
) -> Callable[[], torch.Tensor]:
    """A closure running forward/backward over ``micro_batches``: the whole batch's gradient.

    ``loss_of(mb)`` returns the loss of one micro-batch, reduced as ``reduction`` says:

    - ``"mean"``: each micro-batch's loss is a mean over its examples; the closure backwards
      ``(n_i / N) * loss_i`` (``n_i`` its size, ``N`` the total), so the gradient is that of the
      mean over the whole batch, also for unequal sizes;
    - ``"sum"``: each loss is a sum; the closure backwards ``loss_i``, giving the gradient of
      the sum.

    The closure returns the whole batch's loss (detached). Sizes are read from the first tensor
    of each micro-batch unless ``sizes`` is given. ``no_sync_model`` (a DDP model): every
    micro-batch but the last runs under ``no_sync()``, so each evaluation all-reduces once
    (inside :class:`python_api.distributed.SAMDDPStep`'s per-replica first pass, which is
    already under ``no_sync``, nothing is reduced). ``scaler``: each backward is
    ``scaler.scale(.)``-ed (then step with ``opt.step(closure, scaler=scaler)``).

    The optimizer calls the closure once per evaluation (twice for SAM), so every evaluation
    sees all the micro-batches; gradients accumulate in ``p.grad`` across the micro-batches,
    which the optimizer clears between evaluations.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("micro_batches is empty")
    if sizes is None:
        sizes = [_batch_size(mb) for mb in micro_batches]
    if len(sizes) != len(micro_batches):
        raise ValueError("sizes and micro_batches differ in length")
    total = float(sum(sizes))
    weights = [n / total for n in sizes] if reduction == "mean" else [1.0] * len(sizes)
    last = len(micro_batches) - 1

    def closure() -> torch.Tensor:
        acc = None
        for i, (mb, w) in enumerate(zip(micro_batches, weights)):
            ctx = no_sync_model.no_sync() if no_sync_model is not None and i < last else None
            with ctx if ctx is not None else nullcontext():
                loss = loss_of(mb)
                part = loss * w if w != 1.0 else loss
                (scaler.scale(part) if scaler is not None else part).backward()
            acc = part.detach() if acc is None else acc + part.detach()
        return acc

    return closure
