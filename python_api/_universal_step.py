"""The step of the universal class (:mod:`python_api.universal`): ``n_samples`` noisy
evaluations at ``w + rho * eps_i``, each folded in by the estimator's ``_accumulate``, then one
base step at ``w`` with the gradient each group's ``_final`` combines.

Separate from the class (construction, groups) and from the estimators
(:mod:`python_api._universal_estimators`, which implement the two hooks declared here): the loop,
the non-finite flag and the noise offset's rollback are the same for Frob-, Trace- and Det-SAM.
"""

from __future__ import annotations

from typing import Any

import torch

import sam_kernels as sk
from python_api._closures import Closure
from python_api._universal_noise import Noise


class UniversalStep:
    """Mixin of :class:`python_api.universal._UniversalSAM`: the step and the hooks it calls.

    ``_UniversalSAM`` names :meth:`step` in its own body, so that ``SAMFamily`` wraps it as every
    algorithm's step (``scaler=``, the guard, DCP's state initialisation).
    """

    # ----------------------------------------------------------------- hooks
    def _accumulate(
        self,
        i: int,
        grads: list[torch.Tensor],
        g0: list[torch.Tensor],
        loss: torch.Tensor,
        l0: torch.Tensor | None,
        ctx: dict[str, Any],
    ) -> None:
        """Fold sample ``i`` (gradients of the perturbed parameters, its loss) in."""
        raise NotImplementedError

    def _final(
        self,
        group: dict,
        cols: slice,
        g0_of: dict[int, torch.Tensor],
        ctx: dict[str, Any],
        ps: list[torch.Tensor],
    ) -> sk.LinComb:
        """The gradient of a perturbed group's parameters ``ps`` (columns ``cols``)."""
        raise NotImplementedError

    def _planned_step(
        self, closure: Closure, l0: torch.Tensor | None, noise: Noise | None
    ) -> tuple[torch.Tensor | None] | None:
        """The rest of the step run as a cached step plan, if one may run it: ``(returned,)``;
        None where the step runs unplanned (python_api._universal_plan)."""
        return None

    def _noise_rho(
        self, groups: list[tuple[dict, list[torch.Tensor]]]
    ) -> tuple[torch.Tensor, list[float], bool]:
        """The noise's scale (rho: 0-d when every perturbed group has the same, else one per
        perturbed tensor), the per-tensor rho values, and whether they are all the same."""
        rho = self._rho_vector(groups)
        rho_host = [float(g["rho"]) for g, gps in groups for _ in gps]
        uniform = len(set(rho_host)) == 1
        return (rho[0] if uniform else rho), rho_host, uniform

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Closure | None = None,
        loss: torch.Tensor | float | None = None,
        *,
        noise: Noise | None = None,
    ) -> torch.Tensor | None:
        """One step: ``n_samples`` noisy evaluations, then one base step at ``w``.

        Gradients already present are ``g0`` (the reference's ``step(loss, closure)`` after the
        user's backward); otherwise the closure is first run at ``w``. Det-SAM needs ``L0``:
        ``loss=`` or that evaluation (the closure runs at ``w`` once more if gradients are
        present and ``loss`` is not given). ``noise`` (a test hook) gives ``eps`` directly: one
        list per sample, one tensor per perturbed parameter in parameter order. Returns ``L0``
        when evaluated or given, else the first sample's loss.
        """
        closure = self._require_closure(closure)
        l0, _ = self._initial_eval(closure, loss, need_loss=self._needs_l0)
        planned = self._planned_step(closure, l0, noise)
        if planned is not None:
            return planned[0]
        ps = self._params_with_grad()
        n0 = self._checked_norm([p.grad for p in ps]) if ps else None
        ok = self._ok_from(l0, n0)  # one fused op
        self._check_raise(ok, "the evaluation at w (loss L0, gradient g0)")
        groups = self._perturbed_groups()
        pert = [p for _, gps in groups for p in gps]
        if noise is not None:
            self._check_noise(noise, pert)
        if not pert:
            # nothing is perturbed: every gradient is g0, no noisy evaluation is needed
            self._base_step(ok, norm=n0)  # clipping reuses ||g0||
            return l0

        g0 = self._take_grads(ps)  # the gradient tensors of w themselves, no copy
        g0_of = {id(p): b for p, b in zip(ps, g0)}
        g0_pert = [g0_of[id(p)] for p in pert]
        backups = self._backups(pert)
        scale, rho_host, uniform = self._noise_rho(groups)
        cdtype = scale.dtype
        l0r = None
        if l0 is not None and self._needs_l0:
            l0r = self._reduce_loss(l0).reshape(()).to(self._device)
        ctx: dict[str, Any] = {
            "pert": pert,
            "uniform": uniform,
            "dtype": cdtype,
            "rho_host": rho_host,
        }
        pert_ids = {id(p) for p in pert}
        counter = self._noise_seed is not None
        offset0 = self._noise_offset.clone() if counter else None
        drawn = sum(p.numel() for p in pert)
        first_loss = None
        # unless a non-finite value raises, the samples' finite flags are folded into one op
        # after the loop (the accumulation does not read the flag)
        raises = self._raises_on_nonfinite
        pending: list[torch.Tensor | None] = []
        try:
            for i in range(self.n_samples):
                sk.noise_perturb_(
                    pert,
                    backups,
                    scale,
                    kind=self._kind,
                    half_cube_len=self.half_cube_len,
                    save_backup=i == 0,
                    seed=self._noise_seed,
                    offset=self._noise_offset,
                    noise=None if noise is None else noise[i],
                    backend=self.backend,
                )
                if i == 0:
                    self._live.extend(pert)
                if counter:
                    self._noise_offset.add_(drawn)
                what = f"noisy sample {i + 1} of {self.n_samples} (w + rho * eps_{i + 1})"
                li, gi, ok, ni = self._evaluate_perturbed(
                    closure, ps, pert, ok, what, self._needs_losses, flag=raises
                )
                if not raises:
                    pending += [ni, li]
                if first_loss is None:
                    first_loss = li
                li_r = None
                if self._needs_losses:
                    li_r = self._reduce_loss(li).reshape(()).to(self._device)
                gi_pert = [g for p, g in zip(ps, gi) if id(p) in pert_ids]
                self._accumulate(i, gi_pert, g0_pert, li_r, l0r, ctx)
        except BaseException:
            if counter:
                self._noise_offset.copy_(offset0)
            raise
        if pending:
            ok = self._and_finite(ok, *pending)
        self._finish(ok, groups, g0_of, ctx, offset0)
        return l0 if l0 is not None else first_loss

    def _finish(
        self,
        ok: torch.Tensor,
        groups: list[tuple[dict, list[torch.Tensor]]],
        g0_of: dict[int, torch.Tensor],
        ctx: dict[str, Any],
        offset0: torch.Tensor | None,
    ) -> None:
        """After the last sample: each group's gradient (``_final``, ``g0`` for an unperturbed
        group), the coefficients' check, the base step at ``w`` gated by ``ok`` (every
        evaluation's flag), and the noise offset rolled back to ``offset0`` if it was skipped."""
        finals: dict[int, Any] = {}
        start = 0
        pert_groups = {id(g): gps for g, gps in groups}
        for group in self.param_groups:
            gps = [p for p in group["params"] if p.grad is not None]
            if not gps:
                continue
            if id(group) in pert_groups:
                cols = slice(start, start + len(gps))
                start += len(gps)
                finals[id(gps[0])] = self._final(group, cols, g0_of, ctx, gps)
            else:
                # an unperturbed group (rho = 0 or sam=False): its perturbation is zero, its
                # sharpness term is 0 (lam / rho^2 has no finite value), so its gradient is g0
                finals[id(gps[0])] = [g0_of[id(p)] for p in gps]

        # a combination whose coefficients overflowed (Det-SAM: exp(-d/2) and -2/x^3 at large
        # |d|) would write inf/NaN into the weights: such a step is skipped like a non-finite
        # evaluation (device ops on a few scalars, no host read)
        coefs = [f.coefs.reshape(-1) for f in finals.values() if isinstance(f, sk.LinComb)]
        if coefs:
            ok = ok * torch.isfinite(torch.cat(coefs)).all().to(torch.float32)
        if "coef_ok" in ctx:
            ok = ok * ctx["coef_ok"].to(torch.float32)
        ok = self._base_step(ok, ctx["pert"], lambda gps: finals[id(gps[0])])
        if offset0 is not None:
            # a skipped step draws nothing: the next step uses the same counters (the flag as
            # the base step used it, so a GradScaler or DDP skip counts too)
            self._noise_offset.copy_(torch.where(ok > 0, self._noise_offset, offset0))
