"""Optimizers that choose, step by step, between a SAM step and a cheaper one-pass step.

AE-SAM, AE-LookSAM, LookSAM and SS-SAM share one step structure:

1. ``g0`` (and ``L0`` when the closure is run at ``w``): the closure contract of the spec;
2. a decision computed on the device, folded with the finiteness of ``g0`` and ``L0`` into one
   int32 value (1 = SAM step, 0 = the cheap step, -1 = non-finite) that the host reads: the one
   host read of the step;
3. -1: the step is skipped (nothing changes, the skip counter goes up, or ``NonFiniteError``
   with ``on_nonfinite="raise"``);
   1: a SAM step (perturb along ``g0``, the closure at ``w + e``, restore, base step with ``gs``),
   gated on the device by the finiteness of the second evaluation;
   0: the cheap step (ERM, or LookSAM's reuse), with no further evaluation: ``g0`` is known to
   be finite, so no other host read happens, whatever the base optimizer.

With SGD or AdamW as the base, a step reads exactly one value. With another base optimizer a
SAM step reads one more (the finite flag of the perturbed evaluation, before calling its
``step()``, as the spec's non-finite rule requires); cheap steps still read one.

The step count ``t`` (applied steps, from 0) lives on the device and advances only on applied
steps, so a skipped step leaves the schedule (LookSAM's ``t mod k``, AE-SAM's ``c_t``, the
counter of SS-SAM's random stream) exactly where it was. What a SAM step changes in the
algorithm's state (``t``, AE-SAM's statistics, LookSAM's stored ``gv``, the counts) is gated by
the flag the base step used: the finiteness of both evaluations, a GradScaler's found-inf, and
the data-parallel helper's vote.

Data parallel (:mod:`python_api.distributed`, global mode): under the helper the decision is
reduced with MIN over the ranks before the read, so every replica takes the same branch (a
replica that saw a non-finite value makes all skip). Without the helper, plain DDP all-reduces
the gradients, so ``g0`` and every decision are equal on all ranks; the loss at ``w`` is each
rank's own, so there its finiteness gates the step on the device instead of entering the
decision (no rank runs a second pass alone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from python_api._base import Closure, NonFiniteError, SAMFamily, _distributed

DECISION_SAM = 1
DECISION_CHEAP = 0
DECISION_NONFINITE = -1


class SwitchingSAM(SAMFamily):
    """Base class: one host-read decision per step between a SAM step and a one-pass step.

    Subclasses implement :meth:`_decide` and may override :meth:`_cheap_grad` (default: ERM,
    ``p.grad = g0``), :meth:`_after_sam_eval`, :meth:`_undo` and :meth:`_commit`.
    """

    host_decisions = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        own_defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            own_defaults,
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        dev = self._device
        # t: applied steps (from 0); [SAM steps, cheap steps] applied
        self._t = torch.zeros((), dtype=torch.int64, device=dev)
        self._decisions = torch.zeros(2, dtype=torch.int64, device=dev)
        self._one = torch.ones((), dtype=torch.float32, device=dev)
        self._norm0: torch.Tensor | None = None
        #: the decision of the last step on the host (1 SAM, 0 ERM/reuse, -1 non-finite)
        self.last_decision: int | None = None

    # ----------------------------------------------------------------- statistics
    @property
    def sam_steps(self) -> int:
        """Applied SAM steps (host read)."""
        return int(self._decisions[0].item())

    @property
    def cheap_steps(self) -> int:
        """Applied one-pass steps: ERM steps, or LookSAM's reuse steps (host read)."""
        return int(self._decisions[1].item())

    @property
    def sam_fraction(self) -> float:
        """Fraction of applied steps that were SAM steps (``%SAM / 100``; 0.0 before any)."""
        sam, cheap = (int(v) for v in self._decisions.tolist())
        return sam / (sam + cheap) if sam + cheap else 0.0

    # ----------------------------------------------------------------- hooks
    def _decide(self, params: list[torch.Tensor]) -> torch.Tensor:
        """0-d int32 device tensor: 1 SAM, 0 cheap step, -1 ``g0`` not finite. No host read.

        May set ``self._norm0`` (the global ``||g0||``) for the SAM step to reuse. State it
        changes must be undone by :meth:`_undo` / gated by :meth:`_commit`.
        """
        raise NotImplementedError

    def _decide_on_norm(self, rule: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A :meth:`_decide` whose finite check is the norm of ``g0`` (LookSAM, SS-SAM).

        The global ``||g0||`` (kept in ``self._norm0`` for the SAM step's ascent), then
        ``rule()``: the choice, a 0-d device tensor true (1) for a SAM step (bool or int32),
        made ``DECISION_NONFINITE`` where the norm is not finite. No host read.
        """
        norm = self._grad_norm()
        self._norm0 = norm
        sam = rule()
        return torch.where(torch.isfinite(norm), sam.to(torch.int32), DECISION_NONFINITE)

    def _undo(self) -> None:
        """Revert what :meth:`_decide` changed (a skip known on the host)."""

    def _commit(self, ok: torch.Tensor) -> None:
        """Keep what :meth:`_decide` changed only if ``ok`` (device flag, no host read)."""

    def _after_sam_eval(
        self,
        params: list[torch.Tensor],
        g0: list[torch.Tensor],
        gs: list[torch.Tensor],
        ok: torch.Tensor,
    ) -> None:
        """Called after the base step of a SAM step, with both gradients and the flag the step
        used (``gs`` may be non-finite where ``ok`` is 0)."""

    def _cheap_grad(self, params: list[torch.Tensor]):
        """``grad_of`` for the cheap step's base step (``None``: ``p.grad = g0``)."""
        return None

    # ----------------------------------------------------------------- the step
    def step(  # type: ignore[override]
        self, closure: Closure | None = None, loss: torch.Tensor | float | None = None
    ) -> torch.Tensor | None:
        """One step: the decision, then a SAM step or a one-pass step.

        Gradients already present are ``g0`` (then a one-pass step runs no closure at all);
        otherwise the closure is first run at ``w``. Returns ``L0`` when evaluated or given,
        else the perturbed loss of a SAM step (``None`` for a one-pass step on given
        gradients without ``loss=``).
        """
        closure = self._require_closure(closure)
        l0, _ = self._initial_eval(closure, loss, need_loss=False)
        ps = self._params_with_grad()
        # the loss at w is each rank's own: fold it into the decision only where the decision
        # is not shared across ranks or the helper makes the ranks agree; under plain DDP
        # without the helper it gates the step on the device instead (a rank that skipped
        # the second pass alone would leave the others waiting in its all-reduce)
        l0_gate = None
        with torch.no_grad():
            code = self._decide(ps)
            if l0 is not None:
                l0_ok = torch.isfinite(l0.reshape(()).to(code.device))
                if not self._ranks_agree and _distributed():
                    l0_gate = l0_ok.to(torch.float32)
                else:
                    code = torch.where(l0_ok, code, DECISION_NONFINITE)
            if self._ranks_agree:
                # data-parallel helper: every replica takes the same branch (MIN: a replica
                # that saw a non-finite value makes all skip; otherwise the cheap step wins)
                code = self._vote(code.to(torch.float32)).to(torch.int32)
            decision = int(code.item())  # the one host read of the step
        self.last_decision = decision
        if decision == DECISION_NONFINITE:
            self._undo()
            self._norm0 = None
            if self.on_nonfinite == "raise" and not self._nonfinite_is_routine:  # overflow: skip
                raise NonFiniteError(
                    f"{type(self).__name__}: non-finite loss or gradient at w (the first "
                    "evaluation); weights and optimizer state are unchanged"
                )
            self._counters[1].add_(1.0)
            return l0
        if decision == DECISION_SAM:
            return self._sam_step(closure, ps, l0, l0_gate)
        self._norm0 = None
        with torch.no_grad():
            known = l0_gate is None  # g0 (and L0) finite: read above
            ok = self._one if known else l0_gate
            try:
                ok = self._base_step(ok, (), self._cheap_grad(ps), ok_known=known)
            except BaseException:
                self._undo()  # the decision's statistics: as before the step
                raise
            self._commit(ok)
            iok = ok.to(torch.int64)
            self._t.add_(iok)
            self._decisions[1].add_(iok)
        return l0

    def _sam_step(
        self,
        closure: Closure,
        ps: list[torch.Tensor],
        l0: torch.Tensor | None,
        l0_gate: torch.Tensor | None = None,
    ):
        try:
            with torch.no_grad():
                norm = self._norm0 if self._norm0 is not None else self._grad_norm()
                self._norm0 = None
                g0 = [p.grad for p in ps]
                perturbed = self._perturb_along_grad(norm)
                self._drop_grads()
            l1 = self._call_closure(
                closure, perturbed=True, need_loss=False, what="w + e", restore=perturbed
            )
        except BaseException:
            self._undo()
            raise
        with torch.no_grad():
            # everything up to the base step's launch undone if it raises: the gradients
            # collected (a sparse one refused), the flag, the base step's own checks (the AE
            # statistics, updated at the decision, were left changed by an error here)
            try:
                # a parameter without a gradient at w + e is restored and not stepped
                kept, gs = self._grads_at_perturbed(ps)
                if kept is not None:
                    ps, g0 = [ps[i] for i in kept], [g0[i] for i in kept]
                n1 = self._checked_norm(gs)  # the norm: reused by clipping
                ok = self._ok_from(n1, l1)  # one fused op: [n1, l1 finite]
                if l0_gate is not None:
                    ok = ok * l0_gate
                self._check_raise(ok, "the perturbed evaluation (gradient at w + e)", perturbed)
                # the flag the base step used (gated by a GradScaler / the DDP helper's vote)
                ok = self._base_step(ok, perturbed, norm=n1)
            except BaseException:
                self._undo()
                raise
            self._after_sam_eval(ps, g0, gs, ok)
            self._commit(ok)
            iok = ok.to(torch.int64)
            self._t.add_(iok)
            self._decisions[0].add_(iok)
        return l0 if l0 is not None else l1

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra["t"] = self._t.clone()
        extra["decisions"] = self._decisions.clone()
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._t.copy_(extra["t"].to(self._t.device))
        self._decisions.copy_(extra["decisions"].to(self._decisions.device))
