"""CR-SAM: curvature-regularized SAM (Wu, Luo, Wunsch, AAAI 2024).

Reference code: TrustAIoT/CR-SAM ``utils/crsam.py`` (class ``CRSAM``, driven by
``crsam_train.py``), whose ``gamma`` is our ``alpha``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api import _step_plan
from python_api._base import Closure, SAMFamily, check_nonneg

#: a log term of the paper form is used only while its argument exceeds this
LOG_ARG_MIN = 1e-12


class CRSAM(_step_plan.PlannedSteps, SAMFamily):
    r"""CR-SAM: SAM with a normalized-Hessian-trace (curvature) regularizer.

    .. code-block:: text

        v  = g0 / (||g0|| + 1e-12);   e = rho * v       (global norm; per-group rho)
        g+ = grad L(w + e),  L+ = L(w + e)
        g- = grad L(w - e),  L- = L(w - e)              (w - e formed from the saved w)
        reference form (default; what TrustAIoT/CR-SAM applies):
            g = g+ + alpha (g+ + g- - 2 g0) + beta (g+ - g-)
        paper form (log_form=True; eq. 5-7, the gradient of
            L(w+e) + alpha log(L+ + L- - 2 L0) + beta log(L+ - L-) with e held constant):
            g = g+ + alpha (g+ + g- - 2 g0) / (L+ + L- - 2 L0) + beta (g+ - g-) / (L+ - L-)
            a log term is used only while its argument is > 1e-12 (else its coefficient is 0)
        base.step() at w (restored bit for bit) with g

    Wu, Luo, Wunsch, "CR-SAM: Curvature Regularized Sharpness-Aware Minimization", AAAI 2024.
    Three forward/backward passes per step. ``g0`` and ``g+`` are kept in per-parameter buffers
    while ``g-`` is computed; the combination is handed to the base step as a
    :class:`sam_kernels.LinComb`, so fused backends form it inside the step's single pass. The
    paper form's coefficients are computed on the device from the three losses (averaged over
    the ranks under torch.distributed): neither form reads a value on the host.

    Memory (bytes per fp32 parameter, 4 = one copy; the base optimizer's state and the
    gradients not counted): 4 between steps and 4 at the peak of a step, the backup of ``w``
    (kept between steps like SAM's, so the cached step plans keep it; live from the ascent to
    the base step, which restores from it). ``g0`` and ``g+`` are not copied: the step keeps
    the gradient tensors that the evaluations at ``w`` and ``w + e`` wrote (``p.grad`` is then
    set to ``None``, so the next evaluation writes a new tensor), read-only, and drops them when
    it returns or raises; a gradient that is a view (DDP's ``gradient_as_bucket_view``) is
    copied into a step-local buffer instead (+4 for such parameters). While ``g-`` is computed,
    ``w``, ``g0`` and ``g+`` are all needed in full (the combination is formed in one pass, and
    no order of a partial sum gives the same rounding), so the step holds three gradients and
    the backup at its peak (16 bytes per parameter with ``g-``); before this layout it held
    ``g0`` and ``g+`` as copies, 12 bytes of its own between steps and the same 16 at the peak.

    Args:
        params: parameters or parameter groups. A group may set its own ``rho``; ``rho=0`` (or
            ``sam=False``) keeps a group unperturbed, and its gradient is the same combination
            of the gradients at ``w + e``, ``w - e`` and ``w`` (as SAM uses the gradient at
            ``w + e`` for such a group).
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius (>= 0). Default 0.1 (the reference script).
        alpha: weight of the curvature term (the reference's ``gamma``; >= 0). Default 0.1.
        beta: weight of the gradient-norm term (>= 0). Default 0.01. ``alpha`` and ``beta``
            are attributes of the optimizer, not param-group keys: group keys are shared with
            the base optimizer, where ``alpha`` means something else (RMSprop's smoothing).
        log_form: use the paper's log form (needs ``L0``: give ``step(closure, loss=L0)`` when
            the gradients at ``w`` are already present, else the closure is evaluated at ``w``).
        model: if given, evaluations other than the first at ``w`` leave BN running statistics
            as they were.
        on_nonfinite: ``"skip"`` (default; the step changes nothing, decided on the device) or
            ``"raise"`` (a host read per evaluation, then :class:`NonFiniteError`).
        backend: force ``"eager"``, ``"triton"`` or ``"ext"`` (the compiled extension;
            ``"cuda"``, its former name, still works) for the fused ops.
        process_group: the group over which the paper form's losses are averaged.

    ``step(closure, loss=None)`` returns ``L0`` when it evaluated it or was given it, else
    ``L+``. After a step ``p.grad`` holds an unspecified gradient of the step (call
    ``zero_grad`` before the next one, as usual).

    Planned steps: over a fused SGD or AdamW base on the compiled extension (the CPU default),
    the reference form with ``on_nonfinite="skip"``, no clipping and one process, a step is
    three ops of a cached plan around the two perturbed evaluations (``crsam_ascent``,
    ``crsam_middle``, ``crsam_descent``; :mod:`python_api._step_plan`), the same ops in the same
    order as the unplanned step, so the same bits (tests/optim/test_crsam_plan.py).
    """

    #: only the backup (the one copy of ``w`` kept between steps, as SAM's); ``g0`` and ``g+``
    #: are the evaluations' gradient tensors, kept by the step's locals (see Memory above)
    _transient_state = ("backup",)
    #: the global norm (all-reduced over the shards) and the losses (averaged over the ranks)
    sharded_safe = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.1,
        alpha: float = 0.1,
        beta: float = 0.01,
        log_form: bool = False,
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        process_group: Any = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        check_nonneg("alpha", alpha)
        check_nonneg("beta", beta)
        if not isinstance(log_form, bool):
            raise TypeError(f"log_form must be a bool, got {log_form!r}")
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho),
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            process_group=process_group,
            **base_kwargs,
        )
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.log_form = log_form
        self._const_coefs: dict[tuple, torch.Tensor] = {}
        self._step_plan = None  # (python_api._step_plan.PlannedSteps)
        self._marks_by = None

    # ----------------------------------------------------------------- coefficients
    def _coefs(
        self,
        alpha: float,
        beta: float,
        dtype: torch.dtype,
        inv: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Coefficients on ``(g+, g-, g0)``: ``(1 + a + b, a - b, -2 a)``.

        Reference form: ``a = alpha, b = beta`` (a cached constant). Paper form:
        ``a = alpha * inv[0], b = beta * inv[1]`` with the device scalars
        ``inv = (1/(L+ + L- - 2 L0) or 0, 1/(L+ - L-) or 0)``.
        """
        if inv is None:
            key = (alpha, beta, dtype)
            c = self._const_coefs.get(key)
            if c is None:
                vals = [1.0 + alpha + beta, alpha - beta, -2.0 * alpha]
                c = torch.tensor(vals, dtype=dtype, device=self._device)
                self._const_coefs[key] = c
            return c
        a = alpha * inv[0]
        b = beta * inv[1]
        return torch.stack([1.0 + a + b, a - b, -2.0 * a]).to(dtype)

    def _log_inverses(
        self, l0: torch.Tensor, lp: torch.Tensor, lm: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``1/(L+ + L- - 2 L0)`` and ``1/(L+ - L-)`` where the argument is > 1e-12, else 0."""
        dt = torch.promote_types(torch.promote_types(l0.dtype, lp.dtype), lm.dtype)
        dt = torch.promote_types(dt, dtype)
        l0, lp, lm = (self._reduce_loss(v).reshape(()).to(self._device, dt) for v in (l0, lp, lm))
        s1 = lp + lm - 2.0 * l0
        s2 = lp - lm
        zero = torch.zeros((), dtype=dt, device=self._device)
        inv1 = torch.where(s1 > LOG_ARG_MIN, 1.0 / s1, zero)
        inv2 = torch.where(s2 > LOG_ARG_MIN, 1.0 / s2, zero)
        return inv1, inv2

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Closure | None = None, loss: torch.Tensor | float | None = None
    ) -> torch.Tensor | None:
        """One CR-SAM step: gradients at ``w``, ``w + e`` and ``w - e``, one base step at ``w``.

        Gradients already present are ``g0``; otherwise the closure is first run at ``w``.
        With ``log_form`` the loss ``L0`` comes from ``loss=`` or from that evaluation (the
        closure is run at ``w`` once more if gradients are present and ``loss`` is not given).
        """
        closure = self._require_closure(closure)
        check_nonneg("alpha", self.alpha)  # attributes: a user may have changed them
        check_nonneg("beta", self.beta)
        l0, ps = self._evaluate_w(closure, loss, need_loss=self.log_form)
        if not ps:  # nothing to perturb: the base step has been taken
            return l0
        plan = self._crsam_plan()
        if plan is not None:
            ok = plan.plan.crsam_ascent(l0)
            if ok is not None:
                return self._planned_rest(plan, closure, ok, l0)
            self._step_plan = None  # the gradients changed: unplanned, plans rebuilt

        # g0 kept (the gradient tensors themselves, no copy); e = rho * g0 / (||g0|| + 1e-12)
        # (a zero scale if not finite)
        g0 = self._take_grads(ps)
        norm = self._grad_norm()
        ok = self._and_finite(None, norm, l0)
        self._check_raise(ok, "the evaluation at w (loss L0, gradient g0)")
        groups = self._perturbed_groups()
        pert = [p for _, gps in groups for p in gps]
        g0_of = {id(p): b for p, b in zip(ps, g0)}
        g0_pert = [g0_of[id(p)] for p in pert]
        backups = self._backups(pert)
        scale = neg_scale = None
        if pert:
            # rho / (||g0|| + 1e-12) per tensor (0 if not finite), and its negation for w - e
            scale, neg_scale = sk.ascent_scale(
                norm, self._rho_vector(groups), negated=True, backend=self.backend
            )
            sk.perturb_(pert, g0_pert, backups, scale, backend=self.backend)
            self._live.extend(pert)

        # w + e: g+ kept (the gradient tensors themselves). Unless a non-finite value raises,
        # its finite flag is folded into the one of w - e (one finite_and for both)
        raises = self._raises_on_nonfinite
        at = "the evaluation at w + e (loss L+, gradient g+)"
        lp, _, ok, n_plus = self._evaluate_perturbed(
            closure, ps, pert, ok, "w + e", self.log_form, at, flag=raises
        )
        gplus_of = {id(p): g for p, g in zip(ps, self._take_grads(ps))}

        # w - e, formed from the saved w (never from w + e): w = b - e in one pass (the restore
        # and the step by -e, the backups read, not written again)
        if pert:
            sk.perturb_(pert, g0_pert, backups, neg_scale, save_backup=False, backend=self.backend)
        at = "the evaluation at w - e (loss L-, gradient g-)"
        lm, _, ok, n_minus = self._evaluate_perturbed(
            closure, ps, pert, ok, "w - e", self.log_form, at, flag=raises
        )
        if not raises:
            ok = self._and_finite(ok, n_plus, lp, n_minus, lm)
        self._combined_step(ps, pert, g0_of, gplus_of, ok, l0, lp, lm)
        return l0 if l0 is not None else lp

    def _combined_step(self, ps, pert, g0_of, gplus_of, ok, l0, lp, lm) -> None:
        """The base step with ``g = c0 g+ + c1 g- + c2 g0`` (``g-`` in ``p.grad``), combined
        inside it; ``ok`` the flag of every evaluation."""
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in ps) else torch.float32
        inv_l = self._log_inverses(l0, lp, lm, dtype) if self.log_form else None
        coefs = self._coefs(self.alpha, self.beta, dtype, inv_l)
        if inv_l is not None:  # (finite by the 1e-12 guard unless alpha/beta are huge)
            ok = ok * torch.isfinite(coefs).all().to(torch.float32)

        def grad_of(gps: list[torch.Tensor]) -> sk.LinComb:
            terms = (
                [gplus_of[id(p)] for p in gps],
                [p.grad for p in gps],
                [g0_of[id(p)] for p in gps],
            )
            return sk.LinComb(terms, coefs)

        self._base_step(ok, pert, grad_of)

    # ----------------------------------------------------------------- the planned step
    def _crsam_plan(self) -> _step_plan.PlannedStep | None:
        """The plan of this step, where one may run it (see the class docstring)."""
        if (
            type(self) is not CRSAM
            or not self.plan_steps
            or self.log_form
            or self.max_grad_norm is not None
            or torch.compiler.is_compiling()
            or not sk.step_plan.crsam_available(self._device)
            or _step_plan.distributed()
        ):
            return None
        plan = self._current_plan()
        if plan is not None and plan.adaptive:  # a group with adaptive=True: SAM's key, not ours
            self._step_plan = _step_plan.Unplanned(plan.key)
            return None
        return plan

    def _planned_rest(
        self, plan: _step_plan.PlannedStep, closure: Closure, ok: torch.Tensor, l0
    ) -> torch.Tensor | None:
        """The step after a planned ascent: the two perturbed evaluations around the plan's
        middle, then its descent (or, where the groups or a learning rate changed during the
        closures, the unplanned base step from the gradients the plan kept)."""
        pert = plan.perturbed
        self._live = list(pert)
        try:
            lp = self._call_closure(
                closure, perturbed=True, need_loss=False, what="w + e", restore=pert
            )
            n_plus = plan.plan.crsam_middle()
            lm = self._call_closure(
                closure, perturbed=True, need_loss=False, what="w - e", restore=pert
            )
            hyper = plan.hyper()
            if hyper is not None and plan.valid(self, half="descent"):
                coefs = self._coefs(self.alpha, self.beta, torch.float32, None)
                plan.plan.crsam_descent(ok, n_plus, lp, lm, coefs, hyper)
                self._live = []
                self._marks_by = plan
            else:
                self._step_plan = None
                ps = plan.norm_params
                kept = plan.plan.kept()
                g0_of = {id(p): g for p, g in zip(ps, kept[: len(ps)])}
                gplus_of = {id(p): g for p, g in zip(ps, kept[len(ps) :])}
                n_minus = self._checked_norm(self._collect_grads(ps))
                ok = self._and_finite(ok, n_plus, lp, n_minus, lm)
                self._combined_step(ps, pert, g0_of, gplus_of, ok, l0, lp, lm)
        finally:
            plan.plan.release()
        return l0 if l0 is not None else lp
