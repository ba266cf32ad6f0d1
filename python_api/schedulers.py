"""Rho schedules: torch-style schedulers that drive each param group's ``rho``.

Every SAM-family optimizer keeps ``rho`` in its param groups (shared with the base optimizer) and
re-reads it at every step, so a scheduler only has to write ``group["rho"]``. These follow
:class:`torch.optim.lr_scheduler.LRScheduler`'s conventions:

- construction records each group's ``initial_rho`` (as ``initial_lr``; with ``last_epoch=-1``
  it is set from ``rho`` if absent, on resume it must be there) and applies the value for
  step 0;
- :meth:`RhoScheduler.step` advances ``last_epoch`` by one and writes every group's rho;
  call it once per optimizer step, after ``opt.step(...)``;
- :meth:`RhoScheduler.get_last_rho` gives the values last written; :meth:`~RhoScheduler.state_dict`
  / :meth:`~RhoScheduler.load_state_dict` hold everything but the optimizer.

Every value is ``initial_rho * factor(t)`` (``ProportionalRho``: ``rho_min`` plus a fraction of
``initial_rho - rho_min``), clamped at 0, so a group with ``rho = 0`` (excluded from the ascent:
norm layers, biases) stays at 0 and no rho is ever negative (big_vision #80: a rho tied to a
warm-up lr went negative).

With an LR scheduler on the same optimizer, step both after ``opt.step``: the LR scheduler
first, then the rho scheduler (``ProportionalRho`` reads the lr it just wrote, as GSAM's
reference steps its lr scheduler before its ``ProportionScheduler``). Build the LR scheduler
first too, so ``ProportionalRho``'s first value follows the step-0 lr.

torch's ``SequentialLR``/``ChainedScheduler`` drive ``lr`` only (they reset ``lr`` to
``initial_lr`` and call LR-only methods): they do not compose rho schedulers. Use
:class:`SequentialRho` (milestones as ``SequentialLR``) or :class:`WarmupCosineRho`.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any

import torch
from torch.optim import Optimizer

from python_api._base import SAMFamily

__all__ = [
    "ConstantRho",
    "CosineRho",
    "LinearRho",
    "ProportionalRho",
    "RhoScheduler",
    "SequentialRho",
    "WarmupCosineRho",
]


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


class ConstantRho(RhoScheduler):
    """``rho_t = initial_rho * factor`` for ``t < total_iters``, then ``initial_rho``.

    As torch's ``ConstantLR``; the defaults (``factor=1``, ``total_iters=0``) keep rho constant
    (a placeholder, e.g. a phase of :class:`SequentialRho`).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        factor: float = 1.0,
        total_iters: int = 0,
        last_epoch: int = -1,
    ) -> None:
        self.factor = _number("factor", factor)
        self.total_iters = _iters("total_iters", total_iters, low=0)
        super().__init__(optimizer, last_epoch)

    def _factors(self, t: int) -> list[float]:
        f = self.factor if t < self.total_iters else 1.0
        return [f] * len(self.base_rhos)


class LinearRho(RhoScheduler):
    """Linear warm-up or decay of a factor, as torch's ``LinearLR`` (closed form)::

        rho_t = initial_rho * (start_factor + (end_factor - start_factor) * min(t, T) / T)

    with ``T = total_iters``; held at ``end_factor`` after ``T``. Warm-up from zero:
    ``start_factor=0, end_factor=1``; decay: ``start_factor=1, end_factor=0.1``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        self.start_factor = _number("start_factor", start_factor)
        self.end_factor = _number("end_factor", end_factor)
        self.total_iters = _iters("total_iters", total_iters)
        super().__init__(optimizer, last_epoch)

    def _factors(self, t: int) -> list[float]:
        frac = min(t, self.total_iters) / self.total_iters
        f = self.start_factor + (self.end_factor - self.start_factor) * frac
        return [f] * len(self.base_rhos)


class CosineRho(RhoScheduler):
    """Cosine decay of a factor, as torch's ``CosineAnnealingLR`` in closed form::

        rho_t = initial_rho * (m + (1 - m) * (1 + cos(pi * min(t, T) / T)) / 2)

    with ``T = T_max`` and ``m = eta_min_factor``; held at ``initial_rho * m`` after ``T``
    (torch's lr would rise again: no restarts here).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_max: int,
        eta_min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.T_max = _iters("T_max", T_max)
        self.eta_min_factor = _number("eta_min_factor", eta_min_factor)
        super().__init__(optimizer, last_epoch)

    def _factors(self, t: int) -> list[float]:
        m = self.eta_min_factor
        f = m + (1.0 - m) * (1.0 + math.cos(math.pi * min(t, self.T_max) / self.T_max)) / 2.0
        return [f] * len(self.base_rhos)


class WarmupCosineRho(RhoScheduler):
    """Linear warm-up, then cosine decay of a factor (closed form)::

        t <  W:  f = s + (1 - s) * t / W
        t >= W:  f = m + (1 - m) * (1 + cos(pi * min(t - W, T - W) / (T - W))) / 2
        rho_t = initial_rho * f

    with ``W = warmup_iters`` (0: no warm-up), ``T = total_iters > W``,
    ``s = start_factor`` and ``m = eta_min_factor``; held at ``initial_rho * m`` after ``T``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_iters: int,
        total_iters: int,
        start_factor: float = 0.0,
        eta_min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_iters = _iters("warmup_iters", warmup_iters, low=0)
        self.total_iters = _iters("total_iters", total_iters, low=self.warmup_iters + 1)
        self.start_factor = _number("start_factor", start_factor)
        self.eta_min_factor = _number("eta_min_factor", eta_min_factor)
        super().__init__(optimizer, last_epoch)

    def _factors(self, t: int) -> list[float]:
        w, s, m = self.warmup_iters, self.start_factor, self.eta_min_factor
        if t < w:
            f = s + (1.0 - s) * t / w
        else:
            span = self.total_iters - w
            f = m + (1.0 - m) * (1.0 + math.cos(math.pi * min(t - w, span) / span)) / 2.0
        return [f] * len(self.base_rhos)


class ProportionalRho(RhoScheduler):
    """Rho proportional to the lr, GSAM's rule (its ``ProportionScheduler``) for any class::

        rho_t = max(0, rho_min + (initial_rho - rho_min) * (lr_t - lr_min) / (lr_max - lr_min))

    per group, with that group's current ``lr`` and ``initial_rho``; a group with
    ``initial_rho = 0`` stays 0. Step it after the LR scheduler (and build it after the LR
    scheduler), so each step's rho follows the lr that step runs with.

    Args:
        rho_min: rho at ``lr = lr_min`` (``0 <= rho_min <= initial_rho`` for every group with a
            nonzero rho); a float, or a list with one value per group.
        lr_max: the lr at which ``rho_t = initial_rho``: a float, a list per group, or None for
            each group's ``initial_lr`` (set by an LR scheduler built before) or else its lr.
        lr_min: the lr at which ``rho_t = rho_min`` (``lr_max > lr_min`` in every group).

    With one group this gives the values of ``GSAM(..., rho_min=, lr_max=, lr_min=).rho_t()``.
    A 0-d tensor lr is read on the host once per step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        rho_min: float | list[float],
        lr_max: float | list[float] | None = None,
        lr_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(self, optimizer)
        n = len(optimizer.param_groups)
        self.lr_min = _number("lr_min", lr_min)
        self.rho_mins = [
            _number(f"rho_min[{i}]" if isinstance(rho_min, (list, tuple)) else "rho_min", v)
            for i, v in enumerate(self._per_group("rho_min", rho_min, n))
        ]
        if lr_max is None:
            lr_maxs = [_float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        else:
            lr_maxs = [
                _number("lr_max", v, low=-math.inf) for v in self._per_group("lr_max", lr_max, n)
            ]
        for i, lm in enumerate(lr_maxs):
            if not (math.isfinite(lm) and lm > self.lr_min):
                raise ValueError(
                    f"lr_max of param_groups[{i}] ({lm!r}"
                    + (", its initial lr" if lr_max is None else "")
                    + f") must be > lr_min ({self.lr_min!r}); give lr_max"
                )
        self.lr_maxs = lr_maxs
        for i, group in enumerate(optimizer.param_groups):
            base = _float(group.get("initial_rho", group.get("rho", 0.0)))
            if base != 0.0 and self.rho_mins[i] > base:
                raise ValueError(
                    f"rho_min ({self.rho_mins[i]!r}) must be <= the rho of param_groups[{i}] "
                    f"({base!r}), as GSAM's scheduler asserts"
                )
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _per_group(name: str, value: Any, n: int) -> list[Any]:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} values for {n} param groups")
            return list(value)
        return [value] * n

    def _rho_at(self, t: int) -> list[float]:
        out = []
        for group, base, rmin, lmax in zip(
            self.optimizer.param_groups, self.base_rhos, self.rho_mins, self.lr_maxs, strict=True
        ):
            if base == 0.0:
                out.append(0.0)
                continue
            frac = (_float(group["lr"]) - self.lr_min) / (lmax - self.lr_min)
            out.append(rmin + (base - rmin) * frac)
        return out


class SequentialRho(RhoScheduler):
    """Rho schedulers in sequence, switching at ``milestones`` (as torch's ``SequentialLR``).

    ``schedulers[i]`` runs from ``milestones[i - 1]`` (0 for the first) with its own step count
    restarting at 0 there: ``rho_t`` is ``schedulers[i]``'s value at ``t - milestones[i - 1]``
    (closed form; their own ``last_epoch`` is not used). The schedulers must be on the same
    optimizer; only this one is stepped (building it writes the step-0 rho again).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedulers: list[RhoScheduler],
        milestones: list[int],
        last_epoch: int = -1,
    ) -> None:
        if not schedulers:
            raise ValueError("SequentialRho needs at least one scheduler")
        for i, s in enumerate(schedulers):
            if not isinstance(s, RhoScheduler):
                raise TypeError(
                    f"schedulers[{i}] must be a RhoScheduler, got {type(s).__name__} "
                    "(LR schedulers compose with torch's SequentialLR)"
                )
            if s.optimizer is not optimizer:
                raise ValueError(f"schedulers[{i}] is on another optimizer")
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                f"{len(schedulers)} schedulers need {len(schedulers) - 1} milestones, got "
                f"{len(milestones)}"
            )
        ms = [_iters(f"milestones[{i}]", m) for i, m in enumerate(milestones)]
        if ms != sorted(ms):
            raise ValueError(f"milestones must be increasing, got {milestones!r}")
        self._schedulers = list(schedulers)
        self._milestones = ms
        super().__init__(optimizer, last_epoch)

    def _rho_at(self, t: int) -> list[float]:
        i = bisect_right(self._milestones, t)
        start = self._milestones[i - 1] if i > 0 else 0
        return self._schedulers[i]._rho_at(t - start)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        subs = sd.pop("_schedulers")
        for s, ssd in zip(self._schedulers, subs, strict=True):
            s.load_state_dict(ssd)
        super().load_state_dict(sd)  # last: its values are the ones written
