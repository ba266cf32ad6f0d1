"""The base class of the rho schedulers (:mod:`python_api.schedulers`, whose docstring gives
the conventions): :class:`RhoScheduler` (construction, ``initial_rho``, ``step``, checkpoints)
and the argument checks every scheduler uses.

Separate from the schedules themselves (:mod:`python_api._schedulers_factor`,
:mod:`python_api._schedulers_proportional`, :mod:`python_api._schedulers_sequential`), which
only say what rho is at step ``t``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from python_api._base import SAMFamily


def _number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf) -> float:
    """A finite real number in ``[low, high]`` (bools and tensors refused), as a float."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        rng = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")
    return float(value)


def _iters(name: str, value: Any, *, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_optimizer(sched: Any, optimizer: Any) -> None:
    if not isinstance(optimizer, SAMFamily):
        raise TypeError(
            f"{type(sched).__name__} drives the rho of a SAM-family optimizer "
            f"(python_api.SAMFamily), got {type(optimizer).__name__}; for a plain torch "
            "optimizer use torch.optim.lr_scheduler"
        )


def _float(value: Any) -> float:
    """A group value as a float (a 0-d tensor lr or rho: one host read)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class RhoScheduler:
    """Base class: sets every param group's ``rho`` from :meth:`get_rho` at each :meth:`step`.

    Args:
        optimizer: a SAM-family optimizer (:class:`python_api.SAMFamily`): its param groups
            hold ``rho``.
        last_epoch: ``-1`` to start (each group's ``initial_rho`` is set from its ``rho`` if
            absent); ``>= 0`` to resume, which needs ``initial_rho`` in every group (a loaded
            optimizer state dict has it). The constructor then steps once, as torch's
            schedulers: ``last_epoch`` becomes ``last_epoch + 1`` and that step's rho is written.

    Subclasses implement :meth:`_factors` (closed form in ``t``), or override :meth:`_rho_at`.
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        _check_optimizer(self, optimizer)
        if not isinstance(last_epoch, int) or isinstance(last_epoch, bool) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an int >= -1, got {last_epoch!r}")
        self.optimizer = optimizer
        for i, group in enumerate(optimizer.param_groups):
            if "rho" not in group:
                raise KeyError(
                    f"param_groups[{i}] has no 'rho': {type(self).__name__} needs every group "
                    "of the optimizer to hold 'rho'"
                )
            if last_epoch == -1:
                group.setdefault("initial_rho", _float(group["rho"]))
            elif "initial_rho" not in group:
                raise KeyError(
                    f"param 'initial_rho' is not specified in param_groups[{i}] when resuming a "
                    f"{type(self).__name__} with last_epoch >= 0 (load the optimizer's state "
                    "dict first, or start with last_epoch=-1)"
                )
            _number(f"param_groups[{i}]['initial_rho']", group["initial_rho"])
        self.base_rhos: list[float] = [float(g["initial_rho"]) for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._last_rho: list[float] = []
        self._initial_step()

    def _initial_step(self) -> None:
        self.step()

    # ----------------------------------------------------------------- the schedule
    def _factors(self, t: int) -> list[float]:
        """Per-group factor on ``initial_rho`` at step ``t``; subclasses implement it."""
        raise NotImplementedError

    def _rho_at(self, t: int) -> list[float]:
        return [base * f for base, f in zip(self.base_rhos, self._factors(t), strict=True)]

    def get_rho(self) -> list[float]:
        """Each group's rho for the current ``last_epoch`` (clamped at 0)."""
        return [max(0.0, float(r)) for r in self._rho_at(self.last_epoch)]

    def get_last_rho(self) -> list[float]:
        """The rho values last written to the groups."""
        return list(self._last_rho)

    def step(self) -> None:
        """Advance one step (``last_epoch += 1``) and write every group's rho."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_rhos):
            raise ValueError(
                f"the optimizer has {len(groups)} param groups but {type(self).__name__} was "
                f"built for {len(self.base_rhos)}; build the scheduler after add_param_group"
            )
        self.last_epoch += 1
        values = self.get_rho()
        for group, rho in zip(groups, values, strict=True):
            group["rho"] = rho
        self._last_rho = values

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute but the optimizer (as torch's schedulers)."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output and write its last rho values to the groups.

        The groups then hold the saved step's rho whether the optimizer's state dict was
        loaded before or after this scheduler was built.
        """
        self.__dict__.update(state_dict)
        groups = self.optimizer.param_groups
        if len(self._last_rho) == len(groups):
            for group, rho in zip(groups, self._last_rho, strict=True):
                group["rho"] = rho

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, rho={self._last_rho})"
