"""Mixed precision: ``torch.amp.GradScaler`` with the two-pass SAM family, and bf16.

The scaler-aware step
---------------------
Every optimizer of the family accepts ``scaler=`` in ``step``:

.. code-block:: python

    scaler = torch.amp.GradScaler("cuda")          # "cpu" works too (torch >= 2.3)

    def closure():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()              # every pass scales its backward
        return loss                                # the unscaled loss

    opt.zero_grad()
    loss = opt.step(closure, scaler=scaler)        # unscale, check, perturb, ..., base step
    scaler.update()                                # sees every pass's found-inf

Semantics (``S`` the scaler's current scale, a device tensor read with no host sync):

- after **every** evaluation (the closure at ``w`` and at each perturbed point, and the
  gradients the user's own first backward left before ``step``), the new gradients are unscaled
  in place, ``g <- g * (1/S)`` (``1/S`` formed in fp64 as torch's scaler does), and checked for
  inf/NaN by ``torch._amp_foreach_non_finite_check_and_unscale_`` (one pass, the op the scaler
  itself uses). The algorithm therefore sees exactly the unscaled gradients: the norm
  ``||g||`` is the unscaled one. Decision: unscale rather than rely on SAM's scale invariance.
  ``e = rho g/(||g|| + 1e-12)`` is invariant to ``S`` only up to the ``1e-12`` guard, and the
  other algorithms (CR-SAM's ``g0`` term, Frob-SAM's loss-weighted sums, LookSAM's stored
  ``gv``, AE-SAM's statistics of ``||g0||^2``) are not invariant at all. With the default
  power-of-two scales the unscale is exact, so an fp32 model with ``S`` finite gives the same
  bits as training without the scaler.
- a non-finite gradient in **any** pass makes the step change nothing (the family's device-side
  skip: weights restored exactly from the backup, base-optimizer state and step counts
  unchanged, ``opt.skipped_steps`` + 1), and the scaler is told: :meth:`GradScaler.update`
  then multiplies the scale by ``backoff_factor``. ``on_nonfinite="raise"`` does not raise under
  a scaler (an overflow is the scaler's routine, as in torch).
- no host read is added: the found-inf flag stays on the device, reaches the step as a gate on
  the fused step's ``ok`` flag, and reaches the scaler as a found-inf tensor.
- cost: one extra elementwise pass over the gradients per evaluation (what a non-fused torch
  optimizer pays once per step for ``scaler.unscale_``).

The closure must scale each backward (``scaler.scale(loss).backward()``) and run on cleared
gradients, which every optimizer of the family guarantees between its passes; a gradient that
was unscaled and not written since is never unscaled twice.

``scaler.step(opt, closure)`` is refused with an error that shows the form above: the
scaler's own protocol can report only the gradients present before the step, not those of the
second pass, and applying a scaled second-pass gradient would silently multiply the learning
rate by ``S``. A disabled scaler (``GradScaler(enabled=False)``) gives a plain step, so one
training loop serves both precisions.

Do not call ``scaler.unscale_(opt)`` before the step (the step unscales every pass itself;
that order is refused). Gradient clipping: pass ``max_grad_norm=`` to the optimizer; it clips
the base step's gradient after the step has unscaled it, so the norm is the unscaled one
(tests/optim/test_clipping.py). Clipping inside the closure is not supported under a scaler (the
closure sees scaled gradients).

bf16
----
``torch.autocast(device, dtype=torch.bfloat16)`` inside the closure needs no scaler (bf16 has
fp32's exponent range). bf16 parameters (``model.to(torch.bfloat16)``) work with every fused op
(accumulations in fp32; backups in the parameters' dtype, so restores stay exact).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch

from python_api._hooks import StepHooks, installed

__all__ = ["AmpStep", "with_scaler_kwarg"]


class _FoundInfReport:
    """A stand-in optimizer through which the step reports its found-inf flag to a scaler.

    ``GradScaler.unscale_`` (public) records, per optimizer, whether its gradients held an
    inf/NaN, and ``update`` backs off if any recorded flag is set. This object has one
    parameter whose gradient is ``inf`` when the step found a non-finite value, else ``0``,
    so ``scaler.unscale_(report)`` records exactly the step's flag with no host read.
    """

    def __init__(self) -> None:
        self._flag = torch.zeros(1, requires_grad=True)
        self.param_groups = [{"params": [self._flag]}]

    def report(self, scaler: Any, found_inf: torch.Tensor) -> None:
        grad = torch.where(
            found_inf > 0,
            torch.full((), float("inf"), device=found_inf.device),
            torch.zeros((), device=found_inf.device),
        ).reshape(1)
        if self._flag.device != grad.device:
            self._flag = torch.zeros(1, device=grad.device, requires_grad=True)
            self.param_groups = [{"params": [self._flag]}]
        self._flag.grad = grad
        try:
            scaler.unscale_(self)
        except RuntimeError as err:
            if "already been called" in str(err):
                raise RuntimeError(
                    "opt.step(closure, scaler=scaler) was called twice without "
                    "scaler.update() in between; call scaler.update() after every step"
                ) from err
            raise


class AmpStep(StepHooks):
    """The GradScaler state of one step, installed on the optimizer as ``opt._amp``.

    Its :class:`python_api._hooks.StepHooks`: :meth:`after_eval` unscales the gradients of
    each evaluation, :meth:`scale_loss` scales a backward the step runs itself, :meth:`gate`
    folds found-inf into the base step's finite flag, and an overflow is routine (skip, never
    raise). :meth:`report` hands the flag to the scaler at the end.
    """

    nonfinite_is_routine = True

    def __init__(self, scaler: Any, device: torch.device) -> None:
        self.scaler = scaler
        # the current scale as a device tensor (scaler.scale multiplies by it: no host read)
        self.scale = scaler.scale(torch.ones((), dtype=torch.float32, device=device))
        self.inv_scale = self.scale.double().reciprocal().float()
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        # id(p) -> (weak reference to the gradient unscaled last, its version after that);
        # weak, so a gradient dropped between passes is freed (and never matched again)
        self._done: dict[int, tuple[weakref.ref, int]] = {}

    def unscale_grads(self, opt: Any) -> None:
        """Unscale every gradient written since the last call; accumulate found-inf."""
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                done = self._done.get(id(p))
                if done is not None and done[0]() is g and done[1] == g._version:
                    continue  # unscaled already and not written since
                if g.is_sparse:
                    raise ValueError("sparse gradients are not supported")
                by_key.setdefault((g.device, g.dtype), []).append(g)
        dev0 = self.found_inf.device
        with torch.no_grad():
            for (dev, _), grads in by_key.items():
                found = self.found_inf if dev == dev0 else torch.zeros((), device=dev)
                torch._amp_foreach_non_finite_check_and_unscale_(
                    grads, found, self.inv_scale.to(dev)
                )
                if found is not self.found_inf:
                    self.found_inf.copy_(torch.maximum(self.found_inf, found.to(dev0)))
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._done[id(p)] = (weakref.ref(p.grad), p.grad._version)

    def after_eval(self, opt: Any) -> None:
        self.unscale_grads(opt)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def gate(self, ok: torch.Tensor) -> torch.Tensor:
        """``ok`` and no non-finite gradient found by any unscale of this step."""
        return ok * (1.0 - self.found_inf.to(ok.device).clamp(max=1.0))

    def report(self, opt: Any) -> None:
        """Hand the step's found-inf flag to the scaler (for its ``update``).

        Under a distributed helper (``opt._dist``) the flag is first made the same on every
        rank (max over the group: ``opt._vote`` is a min of ``1 - found``), so every rank's
        scaler backs off together and the scales, which the second pass's all-reduce mixes,
        stay equal: a per-replica first pass or a gradient shard can overflow on one rank only.
        """
        found = self.found_inf
        if opt._ranks_agree:
            found = 1.0 - opt._vote(1.0 - found.clamp(max=1.0))
        rep = opt.__dict__.get("_amp_report")
        if rep is None:
            rep = opt._amp_report = _FoundInfReport()
        rep.report(self.scaler, found)


def _is_enabled(scaler: Any) -> bool:
    is_enabled = getattr(scaler, "is_enabled", None)
    if is_enabled is None:
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return bool(is_enabled())


def _unscaled_by_scaler(scaler: Any, opt: Any) -> bool:
    """Whether ``scaler.unscale_(opt)`` ran this iteration (reads the scaler's private state;
    False wherever that state is not there)."""
    try:
        from torch.amp.grad_scaler import OptState

        st = scaler._per_optimizer_states.get(id(opt))
        return st is not None and st["stage"] is OptState.UNSCALED
    except Exception:  # pragma: no cover - another torch version
        return False


def with_scaler_kwarg(step):
    """Wrap an algorithm's ``step`` so that it accepts ``scaler=`` (see the module doc).

    Applied by ``SAMFamily.__init_subclass__`` to every subclass that defines ``step``.
    """
    if getattr(step, "_sam_scaler_wrapped", False):
        return step

    @functools.wraps(step)
    def wrapped(self, *args: Any, scaler: Any = None, **kwargs: Any):
        if "found_inf" in self.__dict__ or "grad_scale" in self.__dict__:
            # called through GradScaler.step(opt, ...) (the _step_supports_amp_scaling protocol)
            self.__dict__.pop("found_inf", None)
            self.__dict__.pop("grad_scale", None)
            raise RuntimeError(
                f"{type(self).__name__} cannot be stepped through scaler.step(opt, ...): the "
                "scaler would not see the gradients of the perturbed passes. Scale each backward "
                "in the closure (scaler.scale(loss).backward()), then call "
                "opt.step(closure, scaler=scaler) and scaler.update()"
            )
        if scaler is None or self._amp is not None or not _is_enabled(scaler):
            return step(self, *args, **kwargs)
        if _unscaled_by_scaler(scaler, self):
            raise RuntimeError(
                "scaler.unscale_(opt) was called before opt.step(closure, scaler=scaler); the "
                "step unscales every pass itself (the gradients would be unscaled twice)"
            )
        amp = AmpStep(scaler, self._device)
        with installed(self, "_amp", amp):
            out = step(self, *args, **kwargs)
        amp.report(self)
        return out

    wrapped._sam_scaler_wrapped = True  # type: ignore[attr-defined]
    # inspect.signature(opt.step) shows ``scaler`` (the wrappers above this one, torch's hook
    # wrapper included, copy ``__signature__`` with functools.wraps)
    wrapped.__signature__ = _with_scaler_param(inspect.signature(step))  # type: ignore[attr-defined]
    return wrapped


_SCALER = inspect.Parameter(
    "scaler", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="torch.amp.GradScaler | None"
)


def _with_scaler_param(sig: inspect.Signature) -> inspect.Signature:
    """``sig`` with a keyword-only ``scaler=None`` (before ``**kwargs`` if any)."""
    if "scaler" in sig.parameters:
        return sig
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, _SCALER)
    return sig.replace(parameters=params)
