"""The closed-form rho schedules, torch's LR schedulers' counterparts: a factor of each group's
``initial_rho`` that depends on the step ``t`` only (:class:`ConstantRho`, :class:`LinearRho`,
:class:`CosineRho`, :class:`WarmupCosineRho`).

Separate from the base class (:mod:`python_api._schedulers_base`) and from the schedules that
read something else at each step (the lr: :mod:`python_api._schedulers_proportional`; other
schedulers: :mod:`python_api._schedulers_sequential`).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from python_api._schedulers_base import RhoScheduler, _iters, _number


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
