"""The universal class's planned step (Frob-, Trace- and Det-SAM): the step of
:mod:`python_api._universal_step` as ops of SAM's cached step plan (:mod:`python_api._step_plan`,
``csrc/universal_plan.cpp``).

.. code-block:: text

    universal_ascent    ||g0||, its flag [and L0's], g0 kept, b = w, w = b + rho eps_1
    closure (sample i)  ... for i = 1..n:
    universal_sample    g_i (and L_i) folded into the estimator's sums; w = b + rho eps_{i+1}
    universal_descent   every flag; per group the combination's coefficients; the fused step
                        from the backups; the counters; the noise offset rolled back if skipped

Each op runs the unplanned step's ops in its order (the same bits:
tests/optim/test_universal_plan.py), so a step is ``n_samples + 2`` dispatched ops of its own
and none per tensor. What each estimator passes (its per-sample coefficient, its per-group
constants) comes from its mixin in :mod:`python_api._universal_estimators`.

Where: over a fused SGD/AdamW base on the compiled extension (the CPU default), with either
noise: the counter-based contract where the extension draws it (``backend="ext"``), or the
reference's global stream (the CPU default: one draw per tensor from the global generator,
which the plan runs as the eager implementation's own ATen ops, in its order); with
``on_nonfinite="skip"``, no clipping, one process, every parameter with a gradient perturbed
(``rho > 0`` in every group), and no ``noise=`` given.
"""

from __future__ import annotations

from typing import Any

import torch

import sam_kernels as sk
from python_api import _step_plan
from python_api._closures import Closure
from python_api._universal_noise import Noise

_KINDS = {"normal": 0, "uniform": 1}


class UniversalPlan(_step_plan.PlannedSteps):
    """Mixin of :class:`python_api.universal._UniversalSAM` (first in its bases):
    :meth:`_planned_step`, the hook of :class:`python_api._universal_step.UniversalStep`."""

    #: the plan whose noise was set, and the half-cube length it was set with (an attribute a
    #: user may change between steps: set again then)
    _noise_set_on: tuple[_step_plan.PlannedStep, float] | None = None
    #: whether that noise's rho is one value (every perturbed group's the same)
    _noise_uniform = True

    def _universal_plan(self, noise: Noise | None) -> _step_plan.PlannedStep | None:
        """The plan of this step, where one may run it (see the module docstring)."""
        if (
            noise is not None
            or not self.plan_steps
            or self.max_grad_norm is not None
            or torch.compiler.is_compiling()
            or not sk.step_plan.universal_available(self._device)
            or _step_plan.distributed()
        ):
            return None
        if self._mode_plan is None and self._plan is not None:
            # the unplanned universal step builds no norm/ascent plan (SAM's), which the step
            # plan is built from: build it now (cached on its key); a list it refuses (sparse
            # gradients, mixed devices) is the unplanned step's to report
            try:
                self._modes()
            except (TypeError, ValueError, RuntimeError):
                return None
        plan = self._current_plan()
        if plan is None:
            return None
        if self._noise_set_on != (plan, self.half_cube_len) and not self._set_noise(plan):
            # rho = 0 or sam=False groups (their gradient is g0: not in the plan), or the
            # noise or the estimator's ops run elsewhere: unplanned under these settings
            self._step_plan = _step_plan.Unplanned(plan.key)
            return None
        return plan

    def _set_noise(self, plan: _step_plan.PlannedStep) -> bool:
        """Give a new plan the step's noise; False where the plan may not run this step."""
        pert = plan.perturbed
        acc_op = "frob_accumulate" if self._plan_estimator == 0 else "lincomb"
        # the counter noise drawn by the extension, or (no seed) the reference's global stream,
        # drawn by eager's implementation, which the plan runs as its own ATen ops
        reference = self._noise_seed is None
        noise_on = sk.runs_on("noise_perturb", pert, self.backend) if pert else None
        if (
            plan.adaptive
            or not pert
            or len(pert) != len(plan.norm_params)
            or noise_on != ("eager" if reference else "ext")
            or sk.runs_on(acc_op, pert, self.backend) != "ext"
        ):
            return False
        scale, rho_host, uniform = self._noise_rho(self._perturbed_groups())
        self._plan_noise_set(rho_host, uniform)
        plan.plan.set_universal(
            self._plan_estimator, scale, _KINDS[self._kind], self.half_cube_len, reference
        )
        self._noise_set_on = (plan, self.half_cube_len)
        self._noise_uniform = uniform
        return True

    def _planned_step(
        self, closure: Closure, l0: torch.Tensor | None, noise: Noise | None
    ) -> tuple[torch.Tensor | None] | None:
        plan = self._universal_plan(noise)
        if plan is None:
            return None
        ok = plan.plan.universal_ascent(l0, self._noise_seed, self._noise_offset)
        if ok is None:
            self._step_plan = None  # the gradients changed: unplanned, plans rebuilt
            return None
        return (self._planned_samples(plan, closure, ok, l0),)

    def _planned_samples(
        self, plan: _step_plan.PlannedStep, closure: Closure, ok: torch.Tensor, l0
    ) -> torch.Tensor | None:
        """The noisy evaluations after a planned ascent, each followed by its
        ``universal_sample``, then the plan's descent (or, where the groups or a learning rate
        changed during the closures, the unplanned end of the step from what the plan kept)."""
        pert = plan.perturbed
        seed, offset = self._noise_seed, self._noise_offset
        self._live = list(pert)
        n = self.n_samples
        first = None
        losses = 0  # the samples that returned a loss (their flags are kept with the norms')
        try:
            for i in range(n):
                what = f"noisy sample {i + 1} of {n} (w + rho * eps_{i + 1})"
                li = self._call_closure(
                    closure, perturbed=True, need_loss=self._needs_losses, what=what, restore=pert
                )
                if li is not None and li.numel() != 1:
                    raise ValueError(
                        f"the closure returned a loss of shape {tuple(li.shape)} at {what}; "
                        "expected a scalar"
                    )
                if first is None:
                    first = li
                losses += li is not None
                coef = self._plan_sample_coef(li, l0, n)
                plan.plan.universal_sample(li, coef, seed, offset, n, i + 1 < n)
            hyper = plan.hyper()
            if hyper is not None and plan.valid(self, half="descent"):
                consts, lams = self._plan_descent_args([g for g, _ in plan.groups])
                plan.plan.universal_descent(ok, offset, consts, lams, hyper)
                self._live = []
                self._marks_by = plan
            else:
                self._step_plan = None
                self._finish_unplanned(plan, ok, n + losses)
        except BaseException:
            kept = plan.plan.universal_kept()
            if kept and offset is not None:  # the offset at the step's start (its rollback)
                offset.copy_(kept[0])
            raise
        finally:
            plan.plan.release()
        return l0 if l0 is not None else first

    def _finish_unplanned(
        self, plan: _step_plan.PlannedStep, ok: torch.Tensor, n_pending: int
    ) -> None:
        """The end of the unplanned step (:meth:`UniversalStep._finish`) from what the plan
        kept: ``g0``, the estimator's sums, the samples' flags, the offset at the step's start."""
        kept = plan.plan.universal_kept()
        ps, pert = plan.norm_params, plan.perturbed
        offset0 = None
        if self._noise_offset is not None:  # (the counter noise: kept first)
            offset0, kept = kept[0], kept[1:]
        pending, rest = kept[:n_pending], kept[n_pending:]
        g0, rest = rest[: len(ps)], rest[len(ps) :]
        ctx: dict[str, Any] = {"pert": pert, "dtype": torch.float32}
        if self._plan_estimator == 0:
            ctx.update(lsum=rest[0], cross=rest[1 : 1 + len(pert)], gsum=rest[1 + len(pert) :])
        else:
            ctx["coef_ok"], rest = rest[0], rest[1:]
            if self._plan_estimator == 2:
                ctx["x"], rest = rest[0], rest[1:]
                ctx["uniform"] = self._noise_uniform
            ctx["acc"] = rest
        ok = self._and_finite(ok, *pending)
        g0_of = {id(p): g for p, g in zip(ps, g0)}
        self._finish(ok, self._perturbed_groups(), g0_of, ctx, offset0)
