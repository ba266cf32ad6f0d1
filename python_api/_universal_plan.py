"""Frob-SAM's planned step: the step of :mod:`python_api._universal_step` as ops of SAM's cached
step plan (:mod:`python_api._step_plan`, ``csrc/universal_plan.cpp``).

.. code-block:: text

    frob_ascent              ||g0||, its flag [and L0's], g0 kept, b = w, w = b + rho eps_1
    closure (sample i)       ... for i = 1..n:
    frob_sample              g_i and L_i - L_1 folded into cross, gsum, Lsum; w = b + rho eps_{i+1}
    frob_descent             every flag; per group c = a + b Lsum on (g0, cross, gsum); the fused
                             step from the backups; the counters; the offset rolled back if skipped

Each op runs the unplanned step's ops in its order (the same bits: tests/optim/test_frob_plan.py),
so a step is ``n_samples + 2`` dispatched ops of its own and none per tensor.

Where: a :class:`python_api.FrobSAM` over a fused SGD/AdamW base on the compiled extension, with
the counter-based noise (``backend="ext"``, or any device where the extension draws the noise;
the CPU default draws the reference's global stream in eager ops, which stays unplanned),
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


class FrobPlan(_step_plan.PlannedSteps):
    """Mixin of :class:`python_api.FrobSAM` (first in its bases): :meth:`_planned_step`, the
    hook of :class:`python_api._universal_step.UniversalStep`."""

    #: the plan whose noise (scale, kind) was set (once per plan)
    _noise_set_on: _step_plan.PlannedStep | None = None

    def _frob_plan(self, noise: Noise | None) -> _step_plan.PlannedStep | None:
        """The plan of this step, where one may run it (see the module docstring)."""
        if (
            noise is not None
            or not self.plan_steps
            or self._noise_seed is None
            or self.max_grad_norm is not None
            or torch.compiler.is_compiling()
            or not sk.step_plan.frob_available(self._device)
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
        if plan is not self._noise_set_on:
            pert = plan.perturbed
            groups = self._perturbed_groups()
            if (
                plan.adaptive
                or not pert
                or len(pert) != len(plan.norm_params)
                or any(
                    sk.runs_on(op, pert, self.backend) != "ext"
                    for op in ("noise_perturb", "frob_accumulate")
                )
            ):
                # rho = 0 or sam=False groups (their gradient is g0: not in the plan), or the
                # noise drawn elsewhere: unplanned under these settings
                self._step_plan = _step_plan.Unplanned(plan.key)
                return None
            rho = self._rho_vector(groups)
            uniform = len({float(g["rho"]) for g, _ in groups}) == 1
            plan.plan.set_noise(rho[0] if uniform else rho, _KINDS[self._kind], self.half_cube_len)
            self._noise_set_on = plan
        return plan

    def _planned_step(
        self, closure: Closure, l0: torch.Tensor | None, noise: Noise | None
    ) -> tuple[torch.Tensor | None] | None:
        plan = self._frob_plan(noise)
        if plan is None:
            return None
        ok = plan.plan.frob_ascent(l0, self._noise_seed, self._noise_offset)
        if ok is None:
            self._step_plan = None  # the gradients changed: unplanned, plans rebuilt
            return None
        return (self._planned_samples(plan, closure, ok, l0),)

    def _planned_samples(
        self, plan: _step_plan.PlannedStep, closure: Closure, ok: torch.Tensor, l0
    ) -> torch.Tensor | None:
        """The noisy evaluations after a planned ascent, each followed by its ``frob_sample``,
        then the plan's descent (or, where the groups or a learning rate changed during the
        closures, the unplanned end of the step from what the plan kept)."""
        pert = plan.perturbed
        seed, offset = self._noise_seed, self._noise_offset
        self._live = list(pert)
        n = self.n_samples
        first = None
        try:
            for i in range(n):
                what = f"noisy sample {i + 1} of {n} (w + rho * eps_{i + 1})"
                li = self._call_closure(
                    closure, perturbed=True, need_loss=True, what=what, restore=pert
                )
                if first is None:
                    first = li
                plan.plan.frob_sample(li, seed, offset, i + 1 < n)
            hyper = plan.hyper()
            if hyper is not None and plan.valid(self, entries=False):
                consts = [c for g, _ in plan.groups for c in self._frob_consts(g, torch.float32)]
                plan.plan.frob_descent(ok, offset, consts, hyper)
                self._live = []
                self._marks_by = plan
            else:
                self._step_plan = None
                self._finish_unplanned(plan, ok, n)
        except BaseException:
            kept = plan.plan.frob_kept()
            if kept:  # the offset at the step's start (the unplanned step's rollback)
                offset.copy_(kept[0])
            raise
        finally:
            plan.plan.release()
        return l0 if l0 is not None else first

    def _finish_unplanned(self, plan: _step_plan.PlannedStep, ok: torch.Tensor, n: int) -> None:
        """The end of the unplanned step (:meth:`UniversalStep._finish`) from what the plan
        kept: ``g0``, the sums, ``Lsum``, the samples' flags, the offset at the step's start."""
        kept = plan.plan.frob_kept()
        offset0, lsum = kept[0], kept[1]
        pending, rest = kept[2 : 2 + 2 * n], kept[2 + 2 * n :]
        ps, pert = plan.norm_params, plan.perturbed
        g0, cross, gsum = rest[: len(ps)], rest[len(ps) : len(ps) + len(pert)], rest[-len(pert) :]
        ok = self._and_finite(ok, *pending)
        ctx: dict[str, Any] = {
            "pert": pert,
            "dtype": torch.float32,
            "cross": cross,
            "gsum": gsum,
            "lsum": lsum,
        }
        g0_of = {id(p): g for p, g in zip(ps, g0)}
        self._finish(ok, self._perturbed_groups(), g0_of, ctx, offset0)
