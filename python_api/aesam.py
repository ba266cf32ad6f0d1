"""AE-SAM and AE-LookSAM (Jiang, Yang, Zhang, Kwok, "An Adaptive Policy to Employ Sharpness-Aware
Minimization", ICLR 2023)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api._base import check_nonneg, check_range
from python_api._switching import SwitchingSAM
from python_api.looksam import LookSAM, check_alpha


def _check_ae_args(delta: float, lambda1: float, lambda2: float, total_steps: int | None) -> None:
    check_range("delta", delta, 0.0, 1.0, lo_open=False, hi_open=True)
    for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if total_steps is not None and (
        not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0
    ):
        raise ValueError(f"total_steps must be None or an integer > 0, got {total_steps!r}")


class _AEDecision:
    """AE-SAM's decision (a mixin for :class:`SwitchingSAM` subclasses).

    .. code-block:: text

        s_t   = ||g0||^2
        mu_t  = delta * mu_{t-1} + (1 - delta) * s_t          (mu, var start at 0)
        var_t = delta * var_{t-1} + (1 - delta) * (s_t - mu_t)^2
        SAM step  iff  s_t >= mu_t + c_t * sqrt(var_t)
        c_t   = (t/T) * lambda1 + (1 - t/T) * lambda2  (t < T),  lambda1 after T,
                (lambda1 + lambda2) / 2 when T (total_steps) is None
    """

    _t: torch.Tensor
    _device: torch.device
    backend: str | None

    def _init_ae(
        self, delta: float, lambda1: float, lambda2: float, total_steps: int | None
    ) -> None:
        self.delta = float(delta)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.total_steps = total_steps
        # [mu, var] (the op's layout) and the copy a skipped step goes back to
        self._stats = torch.zeros(2, dtype=torch.float32, device=self._device)
        self._stats_prev = torch.zeros_like(self._stats)

    @property
    def ae_stats(self) -> tuple[float, float]:
        """``(mu, var)`` after the last applied step (host read)."""
        mu, var = self._stats.tolist()
        return mu, var

    def c_t(self) -> torch.Tensor | float:
        """This step's ``c_t`` (a device tensor when it depends on ``t``: no host read)."""
        if self.total_steps is None:
            return 0.5 * (self.lambda1 + self.lambda2)
        frac = torch.clamp(self._t.to(torch.float32) / float(self.total_steps), max=1.0)
        return frac * self.lambda1 + (1.0 - frac) * self.lambda2

    def _decide(self, params: list[torch.Tensor]) -> torch.Tensor:
        self._stats_prev.copy_(self._stats)
        c = self.c_t()
        # A scheduled c is a device value (t advances only on applied steps, which the host
        # does not know without a read). The eager op takes it as a tensor; the Triton op
        # passes c to its kernel as a float (a host read), so that case runs on eager.
        backend = "eager" if isinstance(c, torch.Tensor) else self.backend
        grads = [p.grad for p in params]
        if self._on_shards:
            # local shards (python_api.sharded): s = ||g||^2 of the whole gradient, from the
            # norm all-reduced over the ranks (the norm of a one-element tensor is its value)
            grads = [self._grad_norm(params).reshape(1)]
        return sk.aesam_stats_(
            grads,
            self._stats,
            delta=self.delta,
            c=c,  # type: ignore[arg-type]
            backend=backend,
        )

    def _undo(self) -> None:
        super()._undo()  # type: ignore[misc]
        self._stats.copy_(self._stats_prev)

    def _commit(self, ok: torch.Tensor) -> None:
        super()._commit(ok)  # type: ignore[misc]
        self._stats.copy_(torch.where(ok > 0, self._stats, self._stats_prev))

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()  # type: ignore[misc]
        extra["ae_stats"] = self._stats.clone()
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)  # type: ignore[misc]
        self._stats.copy_(extra["ae_stats"].to(self._stats.device))


class AESAM(_AEDecision, SwitchingSAM):
    r"""AE-SAM: SAM only on steps whose squared gradient norm is large relative to its running
    statistics, ERM (one forward/backward) on the others.

    .. code-block:: text

        s_t = ||g0||^2;  mu_t, var_t: exponential moving mean and variance of s (from 0)
        SAM step iff s_t >= mu_t + c_t sqrt(var_t),  c_t from lambda2 (t = 0) to lambda1 (t = T)
        SAM step: as SAM (e = rho g0 / (||g0|| + 1e-12), gs at w + e, base step at w with gs)
        ERM step: base step with p.grad = g0 (no second evaluation)

    Jiang, Yang, Zhang, Kwok, "An Adaptive Policy to Employ Sharpness-Aware Minimization",
    ICLR 2023. The defaults (lambda1 = -1, lambda2 = 1, delta = 0.9) give about 50% SAM steps,
    few early and many late. The statistics, the norm and the decision come from one fused op
    (:func:`sam_kernels.aesam_stats_`); the decision is the one value the host reads per step.
    ``sam_fraction`` is the paper's %SAM (as a fraction), ``sam_steps`` / ``erm_steps`` the
    counts, ``ae_stats`` the current ``(mu, var)``.

    Args:
        params: parameters or parameter groups (per-group ``rho``).
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius of the SAM steps (>= 0).
        delta: decay of the moving statistics, in [0, 1).
        lambda1, lambda2: ``c_t`` goes linearly from ``lambda2`` (t = 0) to ``lambda1``
            (t = total_steps) and stays there.
        total_steps: ``T``, the planned number of steps (> 0); ``None`` keeps ``c`` constant at
            ``(lambda1 + lambda2) / 2``.
        model, on_nonfinite, backend: as :class:`python_api.SAM`.
    """

    #: the statistic comes from the norm all-reduced over the shards; then SAM's step
    sharded_safe = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        total_steps: int | None = None,
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        _check_ae_args(delta, lambda1, lambda2, total_steps)
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho),
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        self._init_ae(delta, lambda1, lambda2, total_steps)

    @property
    def erm_steps(self) -> int:
        """Applied ERM steps (host read)."""
        return self.cheap_steps


class AELookSAM(_AEDecision, LookSAM):
    r"""AE-LookSAM: LookSAM with its "every k steps" rule replaced by AE-SAM's decision.

    .. code-block:: text

        decision: as AESAM (s_t = ||g0||^2 against mu_t + c_t sqrt(var_t))
        SAM step:   gs = grad L(w + e);  gv_i = gs_i - (<g0_i, gs_i>/||g0_i||^2) g0_i (stored);
                    p.grad = gs
        other step: p.grad = g0 + alpha ||g0_i|| / (||gv_i|| + 1e-8) gv_i  (one pass only);
                    before any SAM step has stored gv this is plain ERM (p.grad = g0)

    Jiang, Yang, Zhang, Kwok, ICLR 2023 (AE-LookSAM), on LookSAM (Liu et al., CVPR 2022).

    Args:
        params, base_optimizer, rho, alpha: as :class:`LookSAM`.
        delta, lambda1, lambda2, total_steps: as :class:`AESAM`.
        model, on_nonfinite, backend: as :class:`python_api.SAM`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.1,
        alpha: float = 0.7,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        total_steps: int | None = None,
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        check_alpha(alpha)
        _check_ae_args(delta, lambda1, lambda2, total_steps)
        self._init_switching(
            params,
            base_optimizer,
            rho,
            model,
            on_nonfinite,
            backend,
            base_kwargs,
            alpha,
            max_grad_norm,
        )
        self.k = None  # the AE decision replaces LookSAM's k
        self._init_ae(delta, lambda1, lambda2, total_steps)
