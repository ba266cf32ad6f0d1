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

Layout: the classes live in :mod:`python_api._schedulers_base` (:class:`RhoScheduler` and the
argument checks), :mod:`python_api._schedulers_factor` (the closed-form schedules),
:mod:`python_api._schedulers_proportional` (:class:`ProportionalRho`) and
:mod:`python_api._schedulers_sequential` (:class:`SequentialRho`); this module gives them all.
"""

from __future__ import annotations

from python_api._schedulers_base import RhoScheduler
from python_api._schedulers_base import _check_optimizer as _check_optimizer
from python_api._schedulers_base import _float as _float
from python_api._schedulers_base import _iters as _iters
from python_api._schedulers_base import _number as _number
from python_api._schedulers_factor import ConstantRho, CosineRho, LinearRho, WarmupCosineRho
from python_api._schedulers_proportional import ProportionalRho
from python_api._schedulers_sequential import SequentialRho

__all__ = [
    "ConstantRho",
    "CosineRho",
    "LinearRho",
    "ProportionalRho",
    "RhoScheduler",
    "SequentialRho",
    "WarmupCosineRho",
]
