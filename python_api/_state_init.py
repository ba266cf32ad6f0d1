"""DCP's state initialisation: ``torch.distributed.checkpoint.state_dict`` creates an empty
optimizer's state by calling ``step(closure=None)`` with every lr 0 and zero gradients; the
wrapped step (:func:`recognise_init_step`, applied to every algorithm's ``step`` by
``SAMFamily.__init_subclass__``) recognises that call and creates the state without a step.

Separate from the format's saving and loading (:mod:`python_api._state`,
:mod:`python_api._state_load`): it runs inside ``step``, not inside ``state_dict``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def _is_init_call(opt: Any, args: tuple, kwargs: dict) -> bool:
    """``step(closure=None)`` with every learning rate 0 and an empty ``opt.state``: what
    ``torch.distributed.checkpoint.state_dict`` calls to create an empty optimizer's state
    (after giving every parameter that requires grad a zero gradient)."""
    closure = args[0] if args else kwargs.get("closure")
    if closure is not None or len(args) > 1 or set(kwargs) - {"closure"}:
        return False
    if opt.state:  # DCP's own test: the wrapper's state is empty (a loaded SAM's stays so)
        return False
    for g in opt.param_groups:
        lr = g.get("lr", 0.0)
        if float(lr) != 0.0:
            return False
        for p in g["params"]:
            if p.requires_grad and p.grad is None:
                return False
    return True


@torch.no_grad()
def init_state(opt: Any) -> None:
    """Create the state a step would create, without a step: weights, counters and the
    algorithm's scalars unchanged (the values are those of a fresh optimizer)."""
    opt._follow_device()
    kind = opt._fused
    base = opt.base_optimizer
    if kind is None:
        # another base: its own step with zero gradients and lr 0, as DCP does for it
        base.step()
    for g in opt.param_groups:
        ps = [p for p in g["params"] if p.grad is not None]
        for p in ps:
            s = base.state[p]
            if kind == "sgd":
                if g["momentum"] != 0.0 and "momentum_buffer" not in s:
                    s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s.setdefault("step", torch.zeros((), dtype=torch.float32, device=p.device))
            elif kind == "adamw" and "exp_avg" not in s:
                sdt = torch.float64 if p.dtype == torch.float64 else torch.float32
                s["step"] = torch.zeros((), dtype=sdt, device=p.device)
                for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if g["amsgrad"] else ()):
                    s[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if ps:
            opt._init_param_state(ps)


def recognise_init_step(step: Callable) -> Callable:
    """Wrap an algorithm's ``step``: DCP's state-initialisation call creates the state only."""
    if getattr(step, "_sam_init_wrapped", False):
        return step

    @functools.wraps(step)
    def wrapped(self, *args: Any, **kwargs: Any):
        if _is_init_call(self, args, kwargs):
            init_state(self)
            return None
        return step(self, *args, **kwargs)

    wrapped._sam_init_wrapped = True  # type: ignore[attr-defined]
    return wrapped
