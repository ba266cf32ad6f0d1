"""The closure contract of the family: evaluations, stale gradients, the non-finite flag.

:class:`ClosureContract` is a part of :class:`python_api._base.SAMFamily`: how a step calls the
user's closure (grad enabled, BN statistics kept at perturbed points, each evaluation inside
the hooks' context and followed by their ``after_eval``), which gradients count as ``g0``, and
how a non-finite loss or gradient becomes the step's device flag (or an error with
``on_nonfinite="raise"``).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

import sam_kernels as sk
from python_api._checks import NonFiniteError, _check_dense, where_grad
from python_api.batchnorm import preserve_bn_stats

Closure = Callable[[], Any]


class ClosureContract:
    """Closures, stale-gradient marks and the non-finite flag (a part of ``SAMFamily``)."""

    # ----------------------------------------------------------------- closures
    def _require_closure(self, closure: Closure | None) -> Closure:
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step requires a closure that runs forward and backward "
                "at the current weights and returns the loss"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        return closure

    def _call_closure(
        self,
        closure: Closure,
        *,
        perturbed: bool,
        need_loss: bool,
        what: str,
        restore: Sequence[torch.Tensor] | None = None,
    ):
        """Run ``closure`` with grad enabled (BN stats preserved at perturbed points).

        ``restore``: the perturbed parameters; if the closure raises, or returns no loss where
        one is needed, they are restored from their backups before the error propagates (a
        refused step leaves the weights exactly as they were).
        """
        if restore:
            try:
                return self._call_closure(
                    closure, perturbed=perturbed, need_loss=need_loss, what=what
                )
            except BaseException:
                self._restore(restore)
                raise
        keeper = self._bn if perturbed else None
        if keeper is None and self._amp is None and self._dist is None:
            with torch.enable_grad():  # nothing to keep or to hook (the contexts below: ~4 us)
                loss = closure()
        else:
            with torch.enable_grad(), preserve_bn_stats(keeper), self._eval_context(what):
                loss = closure()
            self._after_eval()  # GradScaler: this evaluation's gradients, unscaled in place
        if loss is None:
            if need_loss:
                raise TypeError(
                    f"{type(self).__name__} needs the loss value at {what}, but the closure "
                    "returned None; return the loss tensor from the closure"
                )
            return None
        if not isinstance(loss, torch.Tensor):
            if isinstance(loss, (int, float)):
                loss = torch.tensor(float(loss), device=self._device)
            else:
                raise TypeError(f"the closure returned {type(loss).__name__}, expected a tensor")
        elif loss.numel() != 1:
            if need_loss:
                raise ValueError(
                    f"the closure returned a loss of shape {tuple(loss.shape)} at {what}; "
                    "expected a scalar"
                )
        return loss.detach()

    def _drop_grads(self) -> None:
        """``p.grad = None`` for every parameter: what ``zero_grad(set_to_none=True)`` does,
        inside a step, without torch's ``record_function`` around it (two profiler ops per call,
        about 10 us of host time; a step zeroes the gradients before each of its own
        evaluations)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

    def _params_with_grad(self) -> list[torch.Tensor]:
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValueError(
                            f"{type(self).__name__} does not support sparse gradients: the "
                            f"gradient of {where_grad(self, p.grad)} is sparse"
                        )
                    out.append(p)
        return out

    def _initial_eval(self, closure: Closure, loss: torch.Tensor | None, need_loss: bool):
        """The closure contract: fresh gradients present are g0; else evaluate at w.

        Stale gradients (left by the previous step, or zeroed in place since) are dropped first
        (:meth:`_fresh_grads`), so they never become g0.

        Returns ``(L0 or None, evaluated)``. With ``need_loss`` and gradients present but no
        ``loss=`` given, the closure is evaluated once more at ``w``.
        """
        if not self._params_as_planned():
            self._follow_device()
        given = self._as_loss(loss) if loss is not None else None  # checked in every case
        have_grads = self._fresh_grads()
        if have_grads and (given is not None or not need_loss):
            self._after_eval()  # the user's own (scaled) first backward
            return given, False
        if have_grads:
            self._drop_grads()
        # a repeated evaluation at w (the user's forward already updated the BN statistics)
        # leaves BN buffers as they are, like the evaluations at perturbed points
        l0 = self._call_closure(closure, perturbed=have_grads, need_loss=need_loss, what="w")
        return l0, True

    # Stale gradients (the spec's closure contract): the gradients present count as g0 only if a
    # backward pass produced them after the previous step ended. At the end of every step the
    # gradient tensors it leaves are remembered with their version counters; a gradient that is
    # still the same tensor at most one in-place write later (``zero_grad(set_to_none=False)``'s
    # ``zero_()``) was produced by no backward since: dropped. A backward writes either a new
    # tensor (after ``set_to_none``) or accumulates in place after such a zeroing (two writes).
    # No host read; one attribute read per parameter per step. Kept out of dynamo's graphs
    # (a traced ``_version`` would be a constant of the trace).
    def _plan_marks(self) -> Any:
        """The marks of a step that a step plan ran, recorded by it (None: marked here)."""
        return None

    def _params_as_planned(self) -> bool:
        """True when a step plan vouches that no parameter was re-typed or moved since it was
        built (then :meth:`_follow_device` has nothing to do)."""
        return False

    def _abort_step(self) -> None:
        """Undo a step that raised: restore the weights it perturbed (idempotent)."""
        live, self._live = self._live, []
        if live:
            self._restore(live)

    def _mark_grads(self) -> None:
        """Remember the gradients this step leaves behind (they are stale for the next step)."""
        if torch.compiler.is_compiling():
            return _mark_grads_untraced(self)
        self._followed = False  # the step ended: the next one looks at the parameters again
        planned = self._plan_marks()
        if planned is not None:  # recorded in C++ by the step plan (python_api._step_plan)
            self._grad_marks = planned
            return
        # by place in the parameter order (a dict keyed by parameter would hash each one, and
        # Tensor.__hash__ is Python); the order is kept with them, so a changed order is seen
        params = tuple(p for g in self.param_groups for p in g["params"])
        marks = [None if (gr := p.grad) is None else (weakref.ref(gr), gr._version) for p in params]
        self._grad_marks = (params, marks)

    def _fresh_grads(self) -> bool:
        """Drop stale gradients (``p.grad = None``); True if any fresh gradient remains."""
        if torch.compiler.is_compiling():
            return _fresh_grads_untraced(self)
        marks = self._grad_marks
        if not isinstance(marks, (tuple, dict)):  # a step plan's (_step_plan.PlanMarks)
            return marks.drop_stale(self)
        params = [p for g in self.param_groups for p in g["params"]]
        if isinstance(marks, tuple):  # _mark_grads': (the parameters in order, their marks)
            held, by_place = marks
            if len(held) != len(params) or not all(map(operator.is_, held, params)):
                # the order changed since (a group added, a list edited): by identity (``held``
                # keeps the marked parameters alive, so their ids are unique)
                by_id = {id(p): m for p, m in zip(held, by_place)}
                by_place = [by_id.get(id(p)) for p in params]
        else:  # none yet ({}: a new or reloaded optimizer): every gradient is fresh
            by_place = [None] * len(params)
        fresh = False
        for p, m in zip(params, by_place):
            gr = p.grad
            if gr is None:
                continue
            if m is not None and m[0]() is gr and gr._version - m[1] <= 1:
                p.grad = None
            else:
                fresh = True
        return fresh

    def _as_loss(self, loss: Any) -> torch.Tensor:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
            return loss.detach().reshape(())
        if isinstance(loss, (int, float)):
            return torch.tensor(float(loss), device=self._device)
        raise TypeError(f"loss must be a tensor or a number, got {type(loss).__name__}")

    def _reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Average a loss that weights gradients over the ranks (one scalar all-reduce)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            loss = loss.detach().float().clone()
            dist.all_reduce(loss, group=self.process_group)
            loss /= dist.get_world_size(self.process_group)
        return loss

    # ----------------------------------------------------------------- non-finite values
    def _ok_from(self, *values: torch.Tensor | None) -> torch.Tensor:
        """1.0 where every given 0-d value is finite, else 0.0 (device tensor)."""
        if all(v is None for v in values):
            return torch.ones((), dtype=torch.float32, device=self._device)
        return self._and_finite(None, *values)

    def _and_finite(self, ok: torch.Tensor | None, *values: torch.Tensor | None) -> torch.Tensor:
        """``ok`` (None: 1) times 1.0 where every given one-element value (losses, norms) is
        finite, else 0.0: one fused op (:func:`sam_kernels.finite_and`), no host read."""
        vals = [
            v if v.device == self._device else v.to(self._device) for v in values if v is not None
        ]
        return sk.finite_and(ok, vals, backend=self.backend)

    @property
    def _raises_on_nonfinite(self) -> bool:
        """Whether :meth:`_check_raise` reads the flag (``on_nonfinite="raise"``, and no
        GradScaler making an overflow routine); otherwise a flag may be completed later."""
        return self.on_nonfinite == "raise" and not self._nonfinite_is_routine

    def _check_raise(self, ok: torch.Tensor, what: str, backups_of: Sequence | None = None):
        """``on_nonfinite="raise"``: one host read; restore weights, then raise."""
        if not self._raises_on_nonfinite:
            # under a GradScaler an overflow is routine: skip and let the scaler back off
            return
        if not bool(ok.item()):
            if backups_of:
                self._restore(backups_of)
            raise NonFiniteError(
                f"{type(self).__name__}: non-finite loss or gradient at {what}; weights and "
                "optimizer state are unchanged"
            )

    def _finite_flag(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """1.0 if every gradient of ``grads`` (this step's, of planned parameters) is finite,
        else 0.0: one fused norm, its lists trusted as the plan's (sparse ones refused)."""
        return self._finite_and_norm(grads)[0]

    def _finite_and_norm(self, grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_finite_flag` and the plain norm it is read from (for clipping to reuse)."""
        n = self._checked_norm(grads)
        return self._and_finite(None, n), n

    def _checked_norm(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The plain norm of ``grads`` (one fused norm, its lists trusted as the plan's; sparse
        ones refused): finite iff every element is, so its flag is the gradients'."""
        grads = _check_dense(self, list(grads))
        with sk.prevalidated():
            return sk.grad_norm(grads, backend=self.backend)


# Run outside dynamo's graphs while it traces (see "Stale gradients" above). Eagerly the methods
# run directly: torch._dynamo.disable's wrapper costs about 3 us per call, two calls per step.
_mark_grads_untraced = torch._dynamo.disable(ClosureContract._mark_grads)
_fresh_grads_untraced = torch._dynamo.disable(ClosureContract._fresh_grads)
