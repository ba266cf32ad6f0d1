"""Data-parallel training with the SAM family: global and per-replica (m-sharpness) steps.

Two modes, both over ``torch.nn.parallel.DistributedDataParallel`` (DDP):

``mode="global"`` (what plain DDP gives):
    every backward all-reduces (averages) the gradients, so the norm, the perturbation and the
    update are computed from the gradient of the whole global batch: a step equals
    single-process training on the concatenated batch (per-group ``rho`` and all)::

        g0 = mean_r grad L_r(w);  e = rho g0/(||g0|| + 1e-12);  g1 = mean_r grad L_r(w + e)
        w <- base.step(w, g1)

``mode="per_replica"`` (the SAM paper's m-sharpness, m = the per-replica batch):
    the first pass (forward **and** backward: DDP decides at forward time whether the backward
    reduces) runs under ``model.no_sync()``, so each replica perturbs with its own gradient; the
    second pass all-reduces::

        g0_r = grad L_r(w);  e_r = rho g0_r/(||g0_r|| + 1e-12)          (local, no communication)
        g1 = mean_r grad L_r(w + e_r)                                   (DDP's all-reduce)
        w <- base.step(w, g1)                                           (same on every replica)

    It saves the first pass's all-reduce and is the setting the SAM paper found to generalise
    better (small m). Only algorithms whose base-step gradient comes from the passes after the
    first one are defined in this mode (``per_replica_safe``: SAM and ASAM); the others raise.

In both modes the helper also makes the replicas agree on non-finite skips: the step's finite
flag is reduced with MIN over the process group (one scalar all-reduce on the device, no host
read), so a replica never steps while another skips.

Usage (one object per model/optimizer pair, called once per step)::

    model = DDP(net)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05)
    step = SAMDDPStep(model, opt, mode="per_replica")      # or mode="global"
    for x, y in loader:
        def closure():
            loss = F.cross_entropy(model(x), y)            # forward through the DDP wrapper
            loss.backward()
            return loss
        loss = step(closure)                               # zero_grad + opt.step(closure)

``step(closure)`` clears the gradients and lets the optimizer run the first pass itself: that
is what lets the helper put it under ``no_sync``. A first backward run by the user outside the
helper (davda54/sam's loop) would be all-reduced already; that loop is plain global DDP and
needs no helper. ``with SAMDDPStep(...) as step:`` works too (nothing to clean up).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from python_api._base import SAMFamily
from python_api._hooks import StepHooks, _all_reduce_min, _distributed, installed

__all__ = ["MODES", "SAMDDPStep", "sam_ddp_step"]

MODES = ("global", "per_replica")


class _DDPHook(StepHooks):
    """Installed as ``opt._dist`` for one step: the first pass's context and the skip vote."""

    spans_ranks = True

    def __init__(self, model: Any, mode: str, group: Any) -> None:
        self.model, self.mode, self.group = model, mode, group

    def eval_context(self, what: str):
        if self.mode == "per_replica" and what == "w":
            return self.model.no_sync()
        return nullcontext()

    # reduce_norm: the default (every replica holds whole gradients)

    def vote(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce_min(x, self.group) if _distributed() else x

    gate = vote  # the skip vote: a replica never steps while another skips


class SAMDDPStep:
    """One SAM-family step over a DDP model in ``"global"`` or ``"per_replica"`` mode.

    Args:
        model: the ``DistributedDataParallel`` module the closure runs (``per_replica`` needs
            its ``no_sync``; ``global`` takes any module whose backward reduces gradients).
        optimizer: a :class:`python_api.SAMFamily` optimizer over ``model``'s parameters.
        mode: ``"global"`` or ``"per_replica"`` (see the module doc).
        process_group: the group to agree on skips over (default: the optimizer's
            ``process_group``, else the default group).
    """

    def __init__(
        self, model: Any, optimizer: Any, mode: str = "global", *, process_group: Any = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(optimizer, SAMFamily):
            raise TypeError(f"optimizer must be a SAMFamily optimizer, got {type(optimizer)}")
        if mode == "per_replica":
            if not hasattr(model, "no_sync"):
                raise TypeError(
                    "mode='per_replica' needs a DistributedDataParallel model (its no_sync() "
                    f"keeps the first pass local); got {type(model).__name__}"
                )
            if not getattr(optimizer, "per_replica_safe", False):
                raise ValueError(
                    f"{type(optimizer).__name__} is not defined in per-replica mode: its update "
                    "uses the first pass's gradient (or may take a one-pass step), which would "
                    "stay local to each replica and make the replicas drift apart; use "
                    "mode='global'"
                )
            if optimizer.on_nonfinite == "raise":
                raise ValueError(
                    "on_nonfinite='raise' decides on each replica's own first-pass gradient in "
                    "per-replica mode (a replica that raises leaves the others waiting in the "
                    "second pass's all-reduce); use the default on_nonfinite='skip'"
                )
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if hasattr(model, "parameters") and not params <= {id(p) for p in model.parameters()}:
            raise ValueError("the optimizer has parameters that are not the model's")
        self.model, self.optimizer, self.mode = model, optimizer, mode
        group = process_group if process_group is not None else optimizer.process_group
        self._hook = _DDPHook(model, mode, group)

    def __call__(self, closure: Any, **step_kwargs: Any) -> Any:
        """``optimizer.zero_grad(set_to_none=True)``, then ``optimizer.step(closure, **kw)``.

        ``step_kwargs`` go to the optimizer's ``step`` (e.g. ``scaler=`` for a GradScaler).
        """
        opt = self.optimizer
        if opt._dist is not None:
            raise RuntimeError("a SAMDDPStep is already running on this optimizer")
        opt.zero_grad(set_to_none=True)
        with installed(opt, "_dist", self._hook):
            return opt.step(closure, **step_kwargs)

    def __enter__(self) -> SAMDDPStep:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"SAMDDPStep(mode={self.mode!r}, optimizer={type(self.optimizer).__name__})"


def sam_ddp_step(model: Any, optimizer: Any, mode: str = "global", **kwargs: Any) -> SAMDDPStep:
    """Build a :class:`SAMDDPStep` (usable as ``with sam_ddp_step(...) as step:``)."""
    return SAMDDPStep(model, optimizer, mode, **kwargs)
