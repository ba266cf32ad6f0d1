"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021).

A drop-in replacement for davda54/sam: same constructor, ``first_step`` / ``second_step`` /
``step(closure)``, ``base_optimizer`` attribute and shared ``param_groups``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from python_api import _conventions, _step_plan
from python_api._base import Closure, SAMFamily, check_nonneg
from python_api._hooks import _all_reduce_min


class SAM(_step_plan.PlannedSteps, SAMFamily):
    r"""Sharpness-Aware Minimization; ``adaptive=True`` gives ASAM.

    .. code-block:: text

        T(p) = |p| + eta  if adaptive else 1
        n    = || T(p) * g0 ||                      (global, over every parameter with a grad)
        e(p) = rho / (n + 1e-12) * T(p)^2 * g0(p)
        first_step:  save w (exact);  p += e(p)
        (closure at w + e gives g1)
        second_step: p = saved w;  base.step() with g1

    Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021; Kwon, Kim, Park, Choi, "ASAM", ICML 2021. The default rho is
    0.05 whether or not ``adaptive`` (as in davda54/sam); ASAM's authors use rho = 2.0.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``; ``rho=0``
            keeps a group in the norm but unperturbed). ``None`` with a base optimizer instance.
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius (>= 0).
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: ASAM's offset in ``T(p) = |p| + eta`` (0 = davda54/sam).
        model: if given, evaluations at perturbed weights leave BN running statistics as they
            were.
        on_nonfinite: ``"skip"`` (default; the step changes nothing, on the device) or
            ``"raise"`` (a host read per evaluation, then :class:`NonFiniteError`).
        backend: force ``"eager"``, ``"triton"`` or ``"ext"`` (the compiled extension;
            ``"cuda"``, its former name, still works) for the fused ops.
        **base_kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...). For SGD and
            AdamW, ``foreach``/``fused`` ``None`` or ``True`` and any ``capturable`` keep the
            wrapper's fused step; ``foreach=False`` or ``fused=False`` runs torch's own step
            with that flag (see :class:`python_api.SAMFamily`).
    """

    #: the base step uses only the second pass's gradient: per-replica DDP (m-sharpness) is
    #: defined (python_api.distributed)
    per_replica_safe = True
    #: one global norm (all-reduced over the shards), then elementwise work
    sharded_safe = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        check_nonneg("eta", eta)
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho, adaptive=adaptive, eta=eta),
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        self._perturbed: list[torch.Tensor] = []
        self._ok = torch.ones((), dtype=torch.float32, device=self._device)
        self._step_plan = None  # (python_api._step_plan.PlannedSteps)
        self._one = torch.ones((), dtype=torch.float32, device=self._device)
        self._marks_by = None

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_nonneg("eta", group.get("eta", 0.0))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save ``w`` and move to ``w + e(w)`` along the current gradients (``g0``).

        The two calls are one optimizer step: the step pre-hooks
        (``register_step_pre_hook``) run here, the post-hooks at the end of
        :meth:`second_step`, once each, as ``step(closure)`` runs them.
        """
        self = _conventions.owner(self)  # Lightning's LightningOptimizer: the optimizer itself
        _conventions.step_started(self)
        self._followed = False  # a new step: the parameters are looked at again
        self._check_settings()
        planned = self._planned_ascent(None)
        self._ok, self._perturbed = planned if planned is not None else self._ascend()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, loss: torch.Tensor | None = None) -> None:
        """Restore ``w`` exactly and take the base step with the current gradients (``g1``).

        The step is complete here: the step post-hooks run, and an LR scheduler stepped after
        this call sees the optimizer step (no "lr_scheduler.step() before optimizer.step()").
        """
        self = _conventions.owner(self)
        ok, perturbed = self._ok, self._perturbed
        self._perturbed = []
        self._ok = self._one  # until the next first_step (never written in place)
        try:
            if not self._planned_descent(ok, perturbed, loss):
                self._descend(ok, perturbed, loss)
        except BaseException:
            self._abort_step()  # w restored from the backups (a setting refused, a kernel error)
            raise
        if zero_grad:
            self.zero_grad()
        self._mark_grads()  # the end of a step: what is left is stale for the next one
        _conventions.step_finished(self)

    # The two halves take and return their state explicitly: inside a compiled training step
    # (torch.compile of the caller), state handed from one half to the other through attributes
    # was lost across dynamo's graph breaks (the perturbed list came back empty, so nothing was
    # restored); ``step`` therefore passes it as locals and only the public halves use attributes.
    def _ascend(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._follow_device()
        norm = self._grad_norm()
        ok = self._ok_from(norm)
        self._check_raise(ok, "the first evaluation (gradient at w)")
        return ok, self._perturb_along_grad(norm)

    # The planned step (python_api._step_plan): each half one op of the compiled extension, the
    # same results; None / False where the step runs unplanned (the methods above and below).
    def _planned_ascent(
        self, loss: torch.Tensor | None, drop_grads: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        # a subclass may change the halves; dynamo traces the unplanned path (the plan's ops take
        # a C++ object it does not trace)
        if type(self) is not SAM or not self.plan_steps or torch.compiler.is_compiling():
            return None
        plan = self._current_plan()
        if plan is None:
            return None
        ok = plan.plan.ascent(loss, drop_grads)  # drop_grads: zero_grad(set_to_none=True) too
        if ok is None:  # the gradients or parameters changed: unplanned, plans rebuilt
            self._step_plan = None
            return None
        self._live = list(plan.perturbed)
        return ok, plan.perturbed

    def _planned_descent(
        self, ok: torch.Tensor, perturbed: list[torch.Tensor], loss: torch.Tensor | None
    ) -> bool:
        plan = self._step_plan
        if (
            torch.compiler.is_compiling()
            or not isinstance(plan, _step_plan.PlannedStep)
            or perturbed is not plan.perturbed
            or not plan.valid(self, half="descent")
        ):
            return False
        hyper = plan.hyper()
        if hyper is None:
            self._step_plan = None
            return False
        if _step_plan.distributed():
            return self._planned_gated_descent(plan, ok, perturbed, loss, hyper)
        if not plan.plan.descent(ok, hyper, loss, self.max_grad_norm):
            self._step_plan = None
            return False
        self._live = []
        self._marks_by = plan  # this step's stale-gradient marks: recorded by its plan
        return True

    def _planned_gated_descent(
        self,
        plan: _step_plan.PlannedStep,
        ok: torch.Tensor,
        perturbed: list[torch.Tensor],
        loss: torch.Tensor | None,
        hyper: list[float],
    ) -> bool:
        # A distributed step (plain DDP; the key rules out every hook): the descent in two ops
        # with _gate_ok's all-reduce between them. Every path performs that one all-reduce and
        # no other (the reasoning: python_api._step_plan's docstring).
        flag = plan.plan.descent_flag(ok, loss)
        if flag is None:  # before the all-reduce: the unplanned descent performs it
            self._step_plan = None
            return False
        ok, n1 = flag
        # _gate_ok with no hook installed: MIN over the ranks (the flag is the op's new tensor)
        ok = _all_reduce_min(ok, self.process_group, own=True)
        if plan.plan.descent_apply(ok, n1, hyper, self.max_grad_norm):
            self._live = []
            self._marks_by = plan
        else:  # after the all-reduce: the unplanned base step from after its gate
            self._step_plan = None
            self._base_step(ok, perturbed, norm=n1, gated=True)
        return True

    def _descend(
        self, ok: torch.Tensor, perturbed: list[torch.Tensor], loss: torch.Tensor | None
    ) -> None:
        ps = self._params_with_grad()
        if perturbed and not ps:
            # a closure (or the code between the halves) ran no backward at w + e
            raise self._no_backward_error()
        # the finite check is the fused norm of g1: clipping (max_grad_norm) reuses it
        n1 = self._checked_norm([p.grad for p in ps])
        ok = self._and_finite(ok, n1, loss)  # one fused op: ok * [n1, loss finite]
        self._check_raise(ok, "the perturbed evaluation (gradient at w + e)", perturbed)
        self._base_step(ok, perturbed, norm=n1)

    def step(  # type: ignore[override]
        self, closure: Closure | None = None, loss: torch.Tensor | float | None = None
    ) -> torch.Tensor | None:
        """One SAM step: ``first_step``, the closure at ``w + e``, ``second_step``.

        Gradients already present are ``g0`` (davda54/sam's loop); otherwise the closure is
        first run at ``w``. Returns ``L0`` when evaluated or given, else the perturbed loss.
        """
        closure = self._require_closure(closure)
        l0, _ = self._initial_eval(closure, loss, need_loss=False)
        with torch.no_grad():
            # the loss check folded in (on_nonfinite="skip"), and zero_grad(set_to_none=True) of
            # the plan's parameters (every parameter of the groups)
            planned = self._planned_ascent(l0, drop_grads=True)
            if planned is not None:
                ok, perturbed = planned
            else:
                ok, perturbed = self._ascend()
                if l0 is not None:
                    ok = self._and_finite(ok, l0)
                    self._check_raise(ok, "the loss at w", perturbed)
                self._drop_grads()
        l1 = self._call_closure(
            closure, perturbed=True, need_loss=False, what="w + e", restore=perturbed
        )
        with torch.no_grad():
            if not self._planned_descent(ok, perturbed, l1):
                self._descend(ok, perturbed, l1)
        return l0 if l0 is not None else l1
