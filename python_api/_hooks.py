"""The step-hook protocol: how AMP, DDP and FSDP2 join one step of a SAM-family optimizer.

An integration joins a step by installing a :class:`StepHooks` object on the optimizer for
the duration of that step, in one of two slots (:func:`installed`):

- ``opt._amp``: the GradScaler's hooks (:class:`python_api.amp.AmpStep`), installed by the
  ``scaler=`` argument of every ``step`` (:func:`python_api.amp.with_scaler_kwarg`);
- ``opt._dist``: the data-parallel hooks, installed by :class:`python_api.distributed.SAMDDPStep`
  (``_DDPHook``) and :class:`python_api.sharded.FSDP2SAMStep` (``_ShardHook``).

The slots are empty between steps (and never copied or pickled, see :mod:`python_api._state`).
The family core (:class:`python_api._base.SAMFamily`) never calls an installed object itself:
it calls the few methods of :class:`HookCalls` below, one per kind of call site, and each of
them walks the installed hooks in the order **AMP, then distributed**. That order matters for
:meth:`StepHooks.gate`: the scaler's found-inf is folded into the finite flag first, and the
distributed vote (MIN over the ranks) then spreads any rank's overflow to every rank, so the
replicas skip or step together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch

#: the two slots a hook is installed in, in the order the core calls them
SLOTS = ("_amp", "_dist")


def _distributed() -> bool:
    """torch.distributed is initialized (every rank runs the step)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _all_reduce_min(flag: torch.Tensor, group: Any = None, *, own: bool = False) -> torch.Tensor:
    """The minimum of a 0-d flag over the ranks of ``group`` (device op, no host read).

    ``own``: ``flag`` is the caller's own new tensor, reduced in place (no copy; the step
    plan's flag, python_api._step_plan)."""
    import torch.distributed as dist

    if not own:
        flag = flag.detach().clone()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return flag


class StepHooks:
    """What an integration may do inside one step; every method defaults to "nothing".

    Implemented by :class:`python_api.amp.AmpStep` (``after_eval``, ``scale_loss``, ``gate``,
    ``nonfinite_is_routine``), ``python_api.distributed._DDPHook`` (``eval_context``, ``gate``,
    ``vote``, ``spans_ranks``) and ``python_api.sharded._ShardHook`` (``reduce_norm``, ``gate``,
    ``vote``, ``spans_ranks``, ``sharded``). Every method returns device tensors and reads
    nothing on the host.
    """

    #: the optimizer holds local shards of parameters sharded over the ranks: a global scalar
    #: (a norm, AE-SAM's statistic) must come from :meth:`reduce_norm`
    sharded: bool = False
    #: the hook makes the ranks agree (:meth:`vote`); without such a hook, a step under an
    #: initialized process group votes on its own finite flag (plain DDP)
    spans_ranks: bool = False
    #: a non-finite value is routine here (a GradScaler's overflow): the step skips and never
    #: raises under ``on_nonfinite="raise"``
    nonfinite_is_routine: bool = False

    def eval_context(self, what: str) -> AbstractContextManager:
        """The context one closure evaluation runs in (``what == "w"``: the first one, at
        ``w``; algorithms name the others). Entered around the closure's forward and backward;
        it may change how the backward reduces (DDP's ``no_sync``), not the weights."""
        return nullcontext()

    def after_eval(self, opt: Any) -> None:
        """Called after every evaluation that wrote gradients (the closure at ``w`` and at each
        perturbed point, the user's own first backward, :meth:`HookCalls._backward`), before the
        step reads them. May change the new gradients in place (the scaler unscales them) and
        record what it saw (found-inf); must not change weights or optimizer state."""

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor to call ``backward()`` on when the step runs a backward itself (ESAM)."""
        return loss

    def gate(self, ok: torch.Tensor) -> torch.Tensor:
        """The step's finite flag (1.0 step, 0.0 skip) as the base step uses it. Called once
        per base step, AMP's hook first, then the distributed one; may only lower ``ok``."""
        return ok

    def vote(self, x: torch.Tensor) -> torch.Tensor:
        """A per-rank scalar made the same on every rank (the minimum over the group): a
        host decision's code, the scaler's found-inf. Identity for a single-process hook."""
        return x

    def reduce_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The global norm from this rank's norm (sharded parameters: over every shard)."""
        return norm


@contextmanager
def installed(opt: Any, slot: str, hook: StepHooks) -> Iterator[StepHooks]:
    """Install ``hook`` in ``opt``'s ``slot`` (one of :data:`SLOTS`) for the ``with`` block."""
    if slot not in SLOTS:
        raise ValueError(f"slot must be one of {SLOTS}, got {slot!r}")
    setattr(opt, slot, hook)
    try:
        yield hook
    finally:
        setattr(opt, slot, None)


@contextmanager
def _nested(hooks: tuple[StepHooks, ...], what: str) -> Iterator[None]:
    with ExitStack() as stack:
        for h in hooks:
            stack.enter_context(h.eval_context(what))
        yield


class HookCalls:
    """The methods through which :class:`python_api._base.SAMFamily` calls its hooks.

    One method per kind of call site: :meth:`_eval_context` (around each closure evaluation),
    :meth:`_after_eval` (after each evaluation's backward), :meth:`_backward` (a backward the
    step runs itself), :meth:`_gate_ok` (the base step's finite flag), :meth:`_vote` (a host
    decision made the same on every rank), :meth:`_reduce_norm` (a global norm), and the
    properties :attr:`_nonfinite_is_routine`, :attr:`_ranks_agree`, :attr:`_on_shards`.
    """

    _amp: StepHooks | None = None
    _dist: StepHooks | None = None
    process_group: Any

    def _step_hooks(self) -> tuple[StepHooks, ...]:
        """The installed hooks, AMP's first."""
        amp, dist = self._amp, self._dist
        if amp is None:
            return () if dist is None else (dist,)
        return (amp,) if dist is None else (amp, dist)

    def _eval_context(self, what: str) -> AbstractContextManager:
        """Context of one closure evaluation (``what == "w"``: the first one, at ``w``).

        Per-replica DDP (:mod:`python_api.distributed`) runs the evaluation at ``w`` under
        ``model.no_sync()``; otherwise nothing.
        """
        hooks = self._step_hooks()
        if not hooks:
            return nullcontext()
        if len(hooks) == 1:
            return hooks[0].eval_context(what)
        return _nested(hooks, what)

    def _after_eval(self) -> None:
        """An evaluation wrote new gradients (GradScaler: they are unscaled in place)."""
        for h in self._step_hooks():
            h.after_eval(self)

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` for algorithms that run the backward themselves (ESAM).

        Under a GradScaler the loss is scaled and the new gradients are unscaled in place.
        """
        hooks = self._step_hooks()
        for h in hooks:
            loss = h.scale_loss(loss)
        loss.backward()
        for h in hooks:
            h.after_eval(self)

    def _gate_ok(self, ok: torch.Tensor) -> torch.Tensor:
        """The finite flag of the step as the base step uses it (device ops, no host read).

        Under a GradScaler (:mod:`python_api.amp`): also 0 if any unscaled evaluation found a
        non-finite gradient. Under the DDP helper: the minimum over the ranks (one scalar
        all-reduce), so every replica skips or steps together.
        """
        hooks = self._step_hooks()
        for h in hooks:
            ok = h.gate(ok)
        if not any(h.spans_ranks for h in hooks) and _distributed():
            # plain DDP (no helper): the gradients are all-reduced, but a loss is each rank's
            # own; a rank that skipped alone would leave the replicas apart. MIN over the
            # ranks: one scalar all-reduce on the device, no host read
            ok = _all_reduce_min(ok, self.process_group)
        return ok

    def _vote(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` made the same on every rank by the installed hooks (MIN over the group under
        a data-parallel helper; unchanged otherwise)."""
        for h in self._step_hooks():
            x = h.vote(x)
        return x

    def _reduce_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The global norm from this rank's (sharded parameters: sqrt of the all-reduced
        squared local norms)."""
        for h in self._step_hooks():
            norm = h.reduce_norm(norm)
        return norm

    @property
    def _nonfinite_is_routine(self) -> bool:
        """A non-finite value skips the step and never raises (under a GradScaler)."""
        return any(h.nonfinite_is_routine for h in self._step_hooks())

    @property
    def _ranks_agree(self) -> bool:
        """A data-parallel helper makes the ranks agree (:meth:`_vote`) in this step."""
        return any(h.spans_ranks for h in self._step_hooks())

    @property
    def _on_shards(self) -> bool:
        """The parameters are local shards (:mod:`python_api.sharded`) in this step."""
        return any(h.sharded for h in self._step_hooks())
