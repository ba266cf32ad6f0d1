"""The one base step at the unperturbed weights: fused SGD/AdamW or the base's own ``step()``,
gradient clipping folded into it, and the step/skip counters.

:class:`BaseStep` is a part of :class:`python_api._base.SAMFamily`; what does not change from
step to step is prepared once in :mod:`python_api._plans`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import sam_kernels as sk
from python_api._checks import _combine_norms, _dense_grads

#: elements combined at once when the norm of a LinComb gradient is taken for clipping
#: (step-local scratch of at most this size, or of one tensor when that is larger)
CLIP_CHUNK = 1 << 24


class StepCounters:
    """The device counters ``_counters = [steps applied, steps skipped]`` (float32, updated on
    the device with no host read) and their host reads: a part of ``SAMFamily`` (through
    :class:`BaseStep`) and of Momentum-SAM's ``MomentumSAMCore``, which create the tensor."""

    _counters: torch.Tensor

    def _add_step(self, ok: torch.Tensor) -> None:
        """Count one step: applied where ``ok`` is 1, skipped where it is 0 (device op)."""
        # counters += [ok, 1 - ok]: one fused op
        sk.count_step_(self._counters, ok, backend=getattr(self, "backend", None))

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because a loss or gradient it checked was not finite
        (host read)."""
        return int(self._counters[1].item())

    @property
    def steps_taken(self) -> int:
        """Number of steps applied (host read)."""
        return int(self._counters[0].item())


class BaseStep(StepCounters):
    """The base step, clipping and counters (a part of ``SAMFamily``)."""

    # ----------------------------------------------------------------- the opening of a step
    def _evaluate_w(
        self, closure: Callable[[], Any], loss: Any, need_loss: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The evaluation at ``w`` of a step that perturbs along ``g0``: ``(L0, ps)``.

        ``L0`` as :meth:`_initial_eval` gives it (``None`` when not evaluated or given),
        ``ps`` the parameters with a gradient (``g0``). The caller folds the finite flag of
        ``L0`` into its first one, with the norm of ``g0`` (one ``finite_and``, checked as
        "the evaluation at w"). With no gradient there is nothing to perturb: the step is then
        complete here (the flag of ``L0`` checked for ``on_nonfinite="raise"``, the base step
        taken with it, which counts the step) and the caller returns ``L0``.
        """
        l0, _ = self._initial_eval(closure, loss, need_loss=need_loss)
        ps = self._params_with_grad()
        if not ps:
            ok = self._ok_from(l0)
            self._check_raise(ok, "the loss at w")
            self._base_step(ok)
        return l0, ps

    # ----------------------------------------------------------------- base step
    def _base_step(
        self,
        ok: torch.Tensor,
        perturbed: Sequence[torch.Tensor] = (),
        grad_of: Callable[[list[torch.Tensor]], Any] | None = None,
        *,
        ok_known: bool = False,
        norm: torch.Tensor | None = None,
        gated: bool = False,
    ) -> torch.Tensor:
        """Restore ``perturbed`` and take one base step at the unperturbed weights, if ``ok``.

        ``grad_of(params)`` gives the gradient for a list of parameters (a list of tensors or a
        :class:`sam_kernels.LinComb`); by default ``p.grad``. Parameters without a gradient are
        not stepped (as in torch). Updates the device step/skip counters.
        ``ok_known``: the caller has already read on the host that ``ok`` is 1 (the
        host-decision classes fold the finite check into their decision), so a base optimizer
        other than SGD/AdamW is stepped without another host read.
        Returns the flag as gated by :meth:`_gate_ok` (what the step used), for callers that
        gate their own state on it.

        ``max_grad_norm`` (gradient clipping, as ``torch.nn.utils.clip_grad_norm_`` on the
        base-step gradient): the global norm of that gradient over every parameter stepped
        (all groups) gives ``min(1, max_grad_norm / (norm + 1e-6))``, a device scalar folded
        into the fused step as a coefficient (a list gradient becomes a one-term
        :class:`sam_kernels.LinComb`, a ``LinComb``'s coefficients are scaled): no pass of its
        own, no host read. ``norm``: the caller's plain norm of exactly that gradient (this
        rank's part; SAM's finite check of ``g1``), reused; otherwise it is computed here (one
        fused norm over a list gradient; a ``LinComb`` is combined into step-local scratch,
        :data:`CLIP_CHUNK` elements at a time, and its norm taken). A non-finite norm skips the
        step (the flag). A generic base gets ``p.grad`` scaled in place before its ``step()``.

        ``gated``: ``ok`` has been through :meth:`_gate_ok` already (a step plan that fell back
        after its all-reduce, python_api._step_plan): not gated again (no second all-reduce).

        Atomic: every group's launch is prepared and checked (shapes, dtypes, devices of the
        gradients and of every state buffer) before the first one runs, and state entries
        created for this step are only added once every launch has run; if anything raises,
        the weights are restored from their backups and nothing else has changed.
        """
        self._check_settings()  # a group edited inside the step (its closure): checked first
        self._follow_device()
        if not gated:
            ok = self._gate_ok(ok)
        clip = self.max_grad_norm
        if self._fused is not None:
            plan = self._base_plan(perturbed)
            grads = [
                grad_of(gp.params) if grad_of is not None else _dense_grads(self, gp.params)
                for gp in plan.groups
            ]
            # a rank without a gradient still joins the sharded norm's all-reduce (no hang)
            if clip is not None and (plan.groups or self._ranks_agree):
                scale, ok = self._clip_scale(grads, ok, norm)
                grads = [_scaled(g, scale) for g in grads]
            launches = [gp.launch(g, ok, self.backend) for gp, g in zip(plan.groups, grads)]
            try:
                self._restore(plan.restore_first)
                with sk.prevalidated():  # every launch's lists checked when the plan was built
                    for fn, kwargs in launches:
                        fn(**kwargs)
            except BaseException:
                self._restore(list(perturbed))
                raise
            if plan.pending:  # state entries created for this step: stored, plan rebuilt next
                for states, p, key, value in plan.pending:
                    states[p][key] = value
                self._plan = None
            self._count(ok)
            return ok
        # generic base optimizer: restore, put the gradient in p.grad, one host read
        self._restore(list(perturbed))
        if grad_of is not None:
            for group in self.param_groups:
                ps = [p for p in group["params"] if p.grad is not None]
                if ps:
                    g = grad_of(ps)
                    if isinstance(g, sk.LinComb):
                        out = [torch.empty_like(p.grad) for p in ps]
                        sk.lincomb_(out, g.terms, g.coefs, backend=self.backend)
                        g = out
                    for p, gi in zip(ps, g):
                        if gi is not p.grad:
                            p.grad.copy_(gi)
        if clip is not None:
            gs = [p.grad for p in self._params_with_grad()]
            if gs:
                scale, ok = self._clip_scale([gs], ok, norm)
                torch._foreach_mul_(gs, scale.to(gs[0].dtype))
        self._count(ok)
        if ok_known or bool(ok.item()):
            self.base_optimizer.step()
        return ok

    def _clip_scale(
        self, grads: list, ok: torch.Tensor, norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``min(1, max_grad_norm / (||g|| + 1e-6))`` over every group's base-step gradient
        (lists or :class:`sam_kernels.LinComb`), and ``ok`` times the norm's finite flag.

        Device ops only. ``norm``: this rank's norm of exactly that gradient (reused).
        """
        if norm is None:
            plain = [t for g in grads if not isinstance(g, sk.LinComb) for t in g]
            norms = []
            if plain:
                with sk.prevalidated():  # the parameters' gradients: checked by the plan
                    norms.append(sk.grad_norm(plain, backend=self.backend))
            norms.extend(self._lincomb_norm(g) for g in grads if isinstance(g, sk.LinComb))
            if not norms:  # nothing stepped on this rank: its part of the norm is 0
                norm = torch.zeros((), dtype=torch.float32, device=self._device)
            elif len(norms) == 1:
                norm = norms[0]
            else:  # combined in fp64 (no overflow of the squares)
                n64 = torch.stack([n.to(self._device, torch.float64) for n in norms])
                norm = torch.linalg.vector_norm(n64).to(norms[0].dtype)
        norm = norm.to(self._device)
        norm = self._reduce_norm(norm)  # sharded parameters: the global norm over the shards
        ok = self._and_finite(ok, norm)
        scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        # a non-finite norm skips the step (ok = 0); its scale is made harmless
        scale = torch.nan_to_num(scale, nan=0.0, posinf=0.0, neginf=0.0)
        return scale, ok

    def _lincomb_norm(self, comb: sk.LinComb) -> torch.Tensor:
        """``||sum_k c_k t_k||``: the combination formed by the fused ``lincomb_`` op into
        step-local scratch, at most :data:`CLIP_CHUNK` elements (one tensor if larger) at a
        time, and its fused norm; chunk norms combined in fp64."""
        terms = [list(t) for t in comb.terms]
        n = len(terms[0])
        norms: list[torch.Tensor] = []
        i = 0
        while i < n:
            j, size = i + 1, terms[0][i].numel()
            while j < n and size + terms[0][j].numel() <= CLIP_CHUNK:
                size += terms[0][j].numel()
                j += 1
            coefs = comb.coefs if comb.coefs.dim() == 1 else comb.coefs[:, i:j]
            out = self._scratch(terms[0][i:j])
            sk.lincomb_(out, [t[i:j] for t in terms], coefs, backend=self.backend)
            norms.append(sk.grad_norm(out, backend=self.backend))
            del out
            i = j
        return _combine_norms(norms, norms[0].device)

    def _count(self, ok: torch.Tensor) -> None:
        """The step has been applied (or skipped on the device): counters, no live backups."""
        self._add_step(ok)
        self._live = []


def _scaled(grad: Any, scale: torch.Tensor) -> sk.LinComb:
    """A base-step gradient (list or :class:`sam_kernels.LinComb`) times a device scalar, as a
    ``LinComb`` the fused step combines in its pass (no pass of its own)."""
    if isinstance(grad, sk.LinComb):
        return sk.LinComb(grad.terms, grad.coefs * scale.to(grad.coefs.dtype))
    grad = list(grad)
    f64 = any(g.dtype == torch.float64 for g in grad)
    coef = scale.to(torch.float64 if f64 else torch.float32).reshape(1)
    return sk.LinComb((grad,), coef)
