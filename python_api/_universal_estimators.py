"""The estimators of the universal class (:mod:`python_api.universal`): how Frob-SAM, Trace-SAM
and Det-SAM fold a noisy sample in (``_accumulate``) and combine the base-step gradient of a
perturbed group (``_final``), and the cached device constants they use.

Separate from the public classes, which keep their docstrings (the algorithms' formulas),
defaults and constructors: each mixin here comes before ``_UniversalSAM`` in its class's bases and
implements the hooks of the step (:mod:`python_api._universal_step`).
"""

from __future__ import annotations

import torch

import sam_kernels as sk


class Estimator:
    """What the estimators share: cached device constants (``_consts``, made by the
    constructor of :class:`python_api.universal._UniversalSAM`)."""

    def _const(self, vals: list[float], dtype: torch.dtype) -> torch.Tensor:
        """A cached device tensor of host constants (built once per value)."""
        key = (tuple(vals), dtype)
        t = self._consts.get(key)
        if t is None:
            t = torch.tensor(vals, dtype=dtype, device=self._device)
            self._consts[key] = t
        return t

    def _plan_noise_set(self, rho_host: list[float], uniform: bool) -> None:
        """The planned step's noise was set for these per-tensor rho values (Det-SAM keeps its
        ``1/rho^2``)."""


class FrobEstimator(Estimator):
    """Frob-SAM's: the sample cross-covariance of ``L_i`` and ``g_i`` (``cross``, ``gsum``)."""

    #: the estimator of the planned step (csrc/universal_plan.cpp) and what its calls take
    _plan_estimator = 0

    def _plan_sample_coef(self, loss, l0, n: int) -> torch.Tensor | None:
        return None

    def _plan_descent_args(self, groups: list[dict]) -> tuple[list[torch.Tensor], list[float]]:
        return [c for g in groups for c in self._frob_consts(g, torch.float32)], []

    def _accumulate(self, i, grads, g0, loss, l0, ctx) -> None:
        if i == 0:
            # allocated after the first noisy backward (not during it), dropped with ctx
            ctx["cross"] = self._scratch(ctx["pert"])
            ctx["gsum"] = self._scratch(ctx["pert"])
        cross, gsum = ctx["cross"], ctx["gsum"]
        if i == 0:
            ctx["lref"] = loss
            ctx["lsum"] = torch.zeros_like(loss)
        shifted = loss - ctx["lref"]
        # the first sample starts the sums from zero (written, not read: no zeroing pass)
        sk.frob_accumulate_(cross, gsum, grads, shifted, init=i == 0, backend=self.backend)
        ctx["lsum"] = ctx["lsum"] + shifted

    def _frob_consts(self, group: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``: a group's coefficients on ``(g0, cross, gsum)`` are ``a + b * Lsum``,
        ``(1, k/(n-1), -k (Lsum/n)/(n-1))`` with ``k = lam / rho^2`` (cached device constants;
        the planned step, python_api._universal_plan, passes the same ones)."""
        n = self.n_samples
        k = float(group["lam"]) / float(group["rho"]) ** 2
        a = self._const([1.0, k / (n - 1), 0.0], dtype)
        b = self._const([0.0, 0.0, -k / (n * (n - 1))], dtype)
        return a, b

    def _final(self, group, cols, g0_of, ctx, ps) -> sk.LinComb:
        dtype = ctx["dtype"]
        a, b = self._frob_consts(group, dtype)
        lsum = ctx["lsum"].to(torch.promote_types(ctx["lsum"].dtype, dtype))
        coefs = (a + b * lsum).to(dtype)
        # a perturbed group's parameters are columns ``cols`` of ctx["pert"]
        terms = ([g0_of[id(p)] for p in ps], ctx["cross"][cols], ctx["gsum"][cols])
        return sk.LinComb(terms, coefs)


class ISAMEstimator(Estimator):
    """Trace-SAM's and Det-SAM's (the reference's ``ISAM``): ``acc += psi'(d_i)/n (g_i - g0)``."""

    def _add_to_acc(self, i, grads, g0, c: torch.Tensor, ctx) -> None:
        """``acc (=|+=) c (g_i - g0)``; ``c`` 0-d or per tensor (per-group rho)."""
        if i == 0:  # allocated after the first noisy backward, dropped with ctx
            ctx["acc"] = self._scratch(ctx["pert"])
        acc = ctx["acc"]
        # an overflowed coefficient (Det-SAM: exp(-d/2)) would poison acc: the step is skipped
        fin = torch.isfinite(c).all()
        ctx["coef_ok"] = fin if i == 0 else ctx["coef_ok"] & fin
        if i == 0:
            sk.lincomb_(acc, (grads, g0), torch.stack([c, -c]), backend=self.backend)
        else:
            one = torch.ones_like(c)
            sk.lincomb_(acc, (acc, grads, g0), torch.stack([one, c, -c]), backend=self.backend)

    def _final_from(self, cols, ps, g0_of, scale: torch.Tensor, ctx) -> sk.LinComb:
        """``g = g0 + scale * acc`` with ``scale = lam * phi'(x)`` (a device scalar)."""
        coefs = torch.stack([torch.ones_like(scale), scale]).to(ctx["dtype"])
        terms = ([g0_of[id(p)] for p in ps], ctx["acc"][cols])
        return sk.LinComb(terms, coefs)


class TraceEstimator(ISAMEstimator):
    """Trace-SAM's: ``psi' = phi' = 1``, so ``g = g0 + lam * mean_i (g_i - g0)``."""

    _plan_estimator = 1

    def _plan_sample_coef(self, loss, l0, n: int) -> torch.Tensor | None:
        return self._const([1.0 / n], torch.float32)  # (_accumulate's c, as a one-entry tensor)

    def _plan_descent_args(self, groups: list[dict]) -> tuple[list[torch.Tensor], list[float]]:
        return [self._const([float(g["lam"])], torch.float32) for g in groups], []

    def _accumulate(self, i, grads, g0, loss, l0, ctx) -> None:
        c = self._const([1.0 / self.n_samples], ctx["dtype"])[0]
        self._add_to_acc(i, grads, g0, c, ctx)

    def _final(self, group, cols, g0_of, ctx, ps) -> sk.LinComb:
        scale = self._const([float(group["lam"])], ctx["dtype"])[0]
        return self._final_from(cols, ps, g0_of, scale, ctx)


class DetEstimator(ISAMEstimator):
    """Det-SAM's: ``psi(x) = exp(-x/2)``, ``phi'(x) = -2/x^3`` (per group with per-group rho)."""

    _plan_estimator = 2
    #: ``1/rho^2`` as _accumulate takes it (one value, or one per perturbed tensor), set with the
    #: planned step's noise
    _plan_inv_rho2: list[float] = []

    @staticmethod
    def _inv_rho2(rho_host: list[float], uniform: bool) -> list[float]:
        """``1/rho^2``: one value when every perturbed group has the same rho, else one per
        perturbed tensor."""
        return [1.0 / rho_host[0] ** 2] if uniform else [1.0 / r**2 for r in rho_host]

    def _plan_noise_set(self, rho_host: list[float], uniform: bool) -> None:
        self._plan_inv_rho2 = self._inv_rho2(rho_host, uniform)

    def _plan_sample_coef(self, loss, l0, n: int) -> torch.Tensor | None:
        dt = torch.promote_types(torch.promote_types(loss.dtype, l0.dtype), torch.float32)
        return self._const(self._plan_inv_rho2, dt)

    def _plan_descent_args(self, groups: list[dict]) -> tuple[list[torch.Tensor], list[float]]:
        return [], [float(g["lam"]) for g in groups]

    def _accumulate(self, i, grads, g0, loss, l0, ctx) -> None:
        dtype = ctx["dtype"]
        dt = torch.promote_types(torch.promote_types(loss.dtype, l0.dtype), dtype)
        inv_rho2 = self._const(self._inv_rho2(ctx["rho_host"], ctx["uniform"]), dt)
        if ctx["uniform"]:
            inv_rho2 = inv_rho2[0]
        d = (loss.to(dt) - l0.to(dt)) * inv_rho2
        psi = torch.exp(-0.5 * d)
        n = self.n_samples
        ctx["x"] = psi / n if i == 0 else ctx["x"] + psi / n
        self._add_to_acc(i, grads, g0, (-0.5 / n * psi).to(dtype), ctx)

    def _final(self, group, cols, g0_of, ctx, ps) -> sk.LinComb:
        x = ctx["x"] if ctx["uniform"] else ctx["x"][cols.start]
        phi_p = -2.0 / (x * x * x)
        scale = float(group["lam"]) * phi_p
        return self._final_from(cols, ps, g0_of, scale, ctx)
