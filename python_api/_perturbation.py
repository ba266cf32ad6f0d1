"""The ascent of the family: perturbed groups, backups and buffers, the global gradient norm,
the SAM/ASAM perturbation and the exact restore.

:class:`Perturbation` is a part of :class:`python_api._base.SAMFamily`; the norm's and the
ascent's parameter lists come from the cached :class:`python_api._plans._ModePlan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import torch

import sam_kernels as sk
from python_api._checks import _combine_norms, _dense_grads
from python_api._plans import _ModePlan


class Perturbation:
    """Perturbation, backups, the gradient norm and the restore (a part of ``SAMFamily``)."""

    # ----------------------------------------------------------------- perturbation
    def _perturbed_groups(self) -> list[tuple[dict, list[torch.Tensor]]]:
        out = []
        for g in self.param_groups:
            if g.get("rho", 0.0) == 0.0 or g.get("sam", True) is False:
                continue
            ps = [p for p in g["params"] if p.grad is not None]
            if ps:
                out.append((g, ps))
        return out

    def _buffers(
        self, params: Sequence[torch.Tensor], key: str, *, zeros: bool = False
    ) -> list[torch.Tensor]:
        """Per-parameter buffers ``state[p][key]`` shaped like ``p`` (allocated once).

        A missing entry, or one whose shape, dtype or device is not the parameter's, is
        replaced by a new buffer: uninitialised, or zero with ``zeros`` (the backups of ``w``
        are the former, FriendlySAM's moving averages the latter).
        Add ``key`` to :attr:`_transient_state` when the buffer is valid only inside a step.
        A buffer needed only inside a step is better a step-local :meth:`_scratch` (not kept
        between steps), or a gradient kept with :meth:`_take_grads` (no buffer at all).
        """
        new = torch.zeros_like if zeros else torch.empty_like
        out = []
        for p in params:
            st = self.state[p]
            b = st.get(key)
            if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                b = new(p, memory_format=torch.preserve_format)
                st[key] = b
            out.append(b)
        return out

    def _scratch(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Step-local buffers shaped like ``params`` (uninitialised), held only by the caller's
        locals: freed when the step returns or raises, never in ``state`` or a cached plan.

        One op for the list (:func:`sam_kernels.empty_like_list`; on the extension the loop over
        the tensors runs in C++), so a step's host work does not grow by a dispatch per tensor.
        """
        return sk.empty_like_list(params, backend=self.backend)

    @staticmethod
    def _take_grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The current gradients of ``params``, kept for the rest of the step without a copy.

        A step that needs a gradient after the next evaluation (CR-SAM's ``g0`` and ``g+``,
        the universal class's ``g0``) keeps the tensor itself: the next evaluation starts from
        ``p.grad = None`` (``zero_grad(set_to_none=True)``), so autograd writes a new tensor and
        the kept one is never written again; the step only reads it. A gradient that is a view
        (DDP's ``gradient_as_bucket_view``: the next backward writes the same bucket) is copied
        into a step-local buffer instead.
        """
        out = []
        for p in params:
            g = p.grad
            if g._base is not None:
                g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
            out.append(g)
        return out

    def _collect_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients of ``params`` after an extra evaluation, one per parameter.

        For the steps that combine several evaluations into one gradient (CR-SAM, the universal
        class): ``params`` are the parameters that had a gradient at ``w`` (this step's set); one
        that got none at the new point gets zeros there (the loss does not depend on it at that
        point; its other terms still step it). The checks are :meth:`_grads_at_perturbed`'s.
        """
        self._perturbed_backward_ran(params)
        out = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(p.grad)
        return out

    def _grads_at_perturbed(
        self, params: Sequence[torch.Tensor]
    ) -> tuple[list[int] | None, list[torch.Tensor]]:
        """The gradients at the perturbed point of a step that descends along them alone (the
        switching classes' SAM step, GSAM, FriendlySAM, R-SAM, ESAM): ``(None, grads)`` when
        every parameter of ``params`` (this step's set, those with a gradient at ``w``) got one,
        else ``(kept, grads)``, ``kept`` the positions in ``params`` of those that did.

        A parameter without a gradient there is not stepped, as ``SAM`` and the references'
        ``base.step()`` leave it (torch skips a parameter whose ``.grad`` is None): restored
        from its backup, its momentum, moments and weight decay untouched. (Filled with zeros,
        as before, it took a base step along its momentum and weight decay alone, and under
        GSAM along ``-alpha * g0``, where the references leave it as it was: a mixture of
        experts' expert that gets no token at ``w + e``.)
        """
        self._perturbed_backward_ran(params)
        grads = [p.grad for p in params]
        if all(g is not None for g in grads):
            return None, grads
        kept = [i for i, g in enumerate(grads) if g is not None]
        return kept, [grads[i] for i in kept]

    def _no_backward_error(self) -> RuntimeError:
        """The error of an evaluation at a perturbed point that left no gradient (the C++
        plans' ``collect_grads`` raises the same words)."""
        return RuntimeError(
            f"{type(self).__name__}: the closure's evaluation at a perturbed point left no "
            "gradient on any parameter; it must call loss.backward() (the weights are "
            "restored, the step not taken)"
        )

    def _perturbed_backward_ran(self, params: Sequence[torch.Tensor]) -> None:
        """After an evaluation at a perturbed point: at least one of ``params`` got a gradient
        (else the closure ran no backward: an error), and a parameter outside ``params`` that
        got one has it dropped (``p.grad = None``), so every later pass and the base step see
        this step's set."""
        if params and all(p.grad is None for p in params):
            # not one gradient where each of these parameters had one at w: the closure ran no
            # backward (zero gradients would have taken a base step along nothing but momentum
            # and weight decay, counted as taken)
            raise self._no_backward_error()
        keep = {id(p) for p in params}
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and id(p) not in keep:
                    p.grad = None

    def _evaluate_perturbed(
        self,
        closure: Callable[[], Any],
        ps: list[torch.Tensor],
        perturbed: list[torch.Tensor],
        ok: torch.Tensor,
        what: str,
        need_loss: bool,
        at: str | None = None,
        flag: bool = True,
        zeros: bool = True,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The closure at a perturbed point and its flag: ``(loss, grads, ok, norm)``.

        ``p.grad`` is cleared first, so the evaluation writes new gradient tensors (one kept
        with :meth:`_take_grads` is never written again); ``grads`` are those of ``ps`` (the
        step's parameter set, :meth:`_collect_grads`); ``ok`` is the given flag times their
        finite flag and the loss's, checked for ``on_nonfinite="raise"`` (``perturbed``
        restored first; the message names ``at``, by default ``what``); ``norm`` is the plain
        norm of ``grads`` the finite flag is read from (clipping may reuse it). ``flag=False``
        (only where :attr:`_raises_on_nonfinite` is False): ``ok`` is returned as given, and
        the caller folds ``norm`` and ``loss`` into a later flag. ``zeros=False`` (a step that
        descends along these gradients alone): a parameter without one is left out of ``grads``
        and of the base step (:meth:`_grads_at_perturbed`), not given zeros.
        """
        self._drop_grads()
        loss = self._call_closure(
            closure, perturbed=True, need_loss=need_loss, what=what, restore=perturbed
        )
        grads = self._collect_grads(ps) if zeros else self._grads_at_perturbed(ps)[1]
        norm = self._checked_norm(grads)
        if flag:
            ok = self._and_finite(ok, norm, loss)  # one fused op: ok * [norm, loss finite]
            self._check_raise(ok, what if at is None else at, perturbed)
        return loss, grads, ok, norm

    def _backups(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The exact copies of ``w`` the ascent writes and the restore reads (``"backup"``)."""
        return self._buffers(params, "backup")

    def _rho_vector(self, groups: list[tuple[dict, list[torch.Tensor]]]) -> torch.Tensor:
        """Per-tensor rho as a device tensor, rebuilt only when a group's rho changes."""
        key = tuple((id(g), float(g["rho"]), len(ps)) for g, ps in groups)
        if self._rho_cache is None or self._rho_cache[0] != key:
            vals = [float(g["rho"]) for g, ps in groups for _ in ps]
            # fp64 scales for fp64 parameters, so fp64 runs are exact to fp64 rounding
            f64 = any(p.dtype == torch.float64 for _, ps in groups for p in ps)
            dtype = torch.float64 if f64 else torch.float32
            self._rho_cache = (key, torch.tensor(vals, dtype=dtype, device=self._device))
        return self._rho_cache[1]

    def _modes(self) -> _ModePlan:
        """Parameters with a gradient by (adaptive, eta), for the norm and the ascent (cached).

        Keyed on the groups, the gradients present and each group's rho/sam/adaptive/eta, so
        a rho schedule or a parameter losing its gradient rebuilds it; a step only gathers the
        gradients. One launch per (adaptive, eta) setting over all groups: normally one.
        """
        groups = self.param_groups
        key = (
            tuple(map(id, groups)),
            # the parameters themselves: a group's list replaced, or changed in place, rebuilds
            tuple(map(id, chain.from_iterable(g["params"] for g in groups))),
            tuple(p.grad is not None for g in groups for p in g["params"]),
            tuple(
                (g.get("rho", 0.0), g.get("sam", True), g.get("adaptive", False), g.get("eta", 0.0))
                for g in groups
            ),
        )
        plan = self._mode_plan
        if plan is not None and plan.key == key:
            return plan
        norm: dict[tuple[bool, float], list[torch.Tensor]] = {}
        for g in groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if ps:
                norm.setdefault((bool(g.get("adaptive", False)), float(g.get("eta", 0.0))), [])
                norm[(bool(g.get("adaptive", False)), float(g.get("eta", 0.0)))].extend(ps)
        pert_groups = self._perturbed_groups()
        # per-tensor rho, and for each (adaptive, eta) setting the indices into it
        flat: list[torch.Tensor] = []
        by_mode: dict[tuple[bool, float], list[int]] = {}
        for g, ps in pert_groups:
            idx = by_mode.setdefault((bool(g.get("adaptive", False)), float(g.get("eta", 0.0))), [])
            idx.extend(range(len(flat), len(flat) + len(ps)))
            flat.extend(ps)
        rho = self._rho_vector(pert_groups) if pert_groups else None
        pert = []
        for (adaptive, eta), idx in by_mode.items():
            sel = None if len(idx) == len(flat) else torch.tensor(idx, device=self._device)
            pert.append((adaptive, eta, [flat[i] for i in idx], sel))
        # once per plan: every parameter with a gradient on one device, dense (the norm and
        # the ascent then run under sk.prevalidated())
        sk.check_lists(("params",), [p for ps in norm.values() for p in ps])
        plan = self._mode_plan = _ModePlan(key, list(norm.items()), pert, rho, self)
        return plan

    def _grad_norm(self, params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Global norm ``||T(p) * g||`` over every parameter with a gradient (all groups)."""
        if params is not None:
            keep = {id(p) for p in params}
            modes = [(m, [p for p in ps if id(p) in keep]) for m, ps in self._modes().norm]
        else:
            modes = self._modes().norm
        with sk.prevalidated():  # the plan checked the lists (_modes)
            norms = [
                sk.grad_norm(
                    _dense_grads(self, ps), ps if adaptive else None, eta=eta, backend=self.backend
                )
                for (adaptive, eta), ps in modes
                if ps
            ]
        if not norms:
            n = torch.zeros((), dtype=torch.float32, device=self._device)
        else:
            n = _combine_norms(norms, self._device)
        # sharded parameters (python_api.sharded): sqrt of the all-reduced squared local norms
        return self._reduce_norm(n)

    def _perturb_along_grad(
        self, norm: torch.Tensor, factor: float | torch.Tensor = 1.0
    ) -> list[torch.Tensor]:
        """SAM/ASAM ascent: ``p += factor * rho/(norm + 1e-12) * T(p)^2 * g``, exact backups.

        ``factor`` scales every group's rho (GSAM's schedule, ``rho_t / rho``). A non-finite
        norm gives a zero scale, so no non-finite value reaches the weights. Returns the
        perturbed parameters (the ones to restore).
        """
        plan = self._modes()
        if not plan.pert:
            return []
        # rho * nan_to_num(1/(norm + 1e-12)) * factor: one fused op
        (scale,) = sk.ascent_scale(norm, plan.rho, factor, backend=self.backend)
        perturbed: list[torch.Tensor] = []
        for (adaptive, eta, ps, sel), backups in zip(plan.pert, plan.backups(self)):
            with sk.prevalidated():  # checked with the plan's backups
                sk.perturb_(
                    ps,
                    [p.grad for p in ps],
                    backups,
                    scale if sel is None else scale[sel],
                    adaptive=adaptive,
                    eta=eta,
                    backend=self.backend,
                )
            self._live.extend(ps)
            perturbed.extend(ps)
        return perturbed

    def _restore(self, params: Sequence[torch.Tensor]) -> None:
        if params:
            with torch.no_grad():  # also called from error paths outside no_grad
                sk.restore_(
                    list(params),
                    [self.state[p]["backup"] for p in params],
                    backend=self.backend,
                )
