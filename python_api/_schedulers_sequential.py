"""Rho schedulers in sequence (:class:`SequentialRho`, as torch's ``SequentialLR``): the
composition of other rho schedulers, switching at milestones.

Separate from the schedules it composes (:mod:`python_api._schedulers_factor`,
:mod:`python_api._schedulers_proportional`): it holds other schedulers and their checkpoints
rather than a formula of its own.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

from torch.optim import Optimizer

from python_api._schedulers_base import RhoScheduler, _iters


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
