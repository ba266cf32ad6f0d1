"""Rho proportional to the lr (:class:`ProportionalRho`, GSAM's rule for any class): the one
schedule that reads each group's current ``lr`` at every step.

Separate from the closed-form schedules (:mod:`python_api._schedulers_factor`), which depend on
the step only, because its arguments and values follow the optimizer's lr (built and stepped
after the LR scheduler).
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer

from python_api._schedulers_base import RhoScheduler, _check_optimizer, _float, _number


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
