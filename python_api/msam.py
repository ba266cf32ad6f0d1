"""Momentum-SAM: ``MSAM`` (SGD form) and ``AdamWMSAM`` (AdamW form).

Becker, Altrock, Ferrari, "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead", 2024. Reference code: MarlonBecker/MSAM ``optimizer/msam.py`` (class ``MSAM``) and
``optimizer/adamW_msam.py`` (class ``AdamW_MSAM``).

Standalone optimizers (``torch.optim.Optimizer`` subclasses, not wrappers of a base optimizer):
one forward/backward per step, as plain SGD/AdamW. The perturbation is taken along the negative
normalised momentum, so no extra gradient evaluation is needed: the weights the model holds
*between* steps are the moved-down point ``w~ = w - s * v`` (the gradient of the next step is taken
there) and the step first moves back up to ``w``, updates, and moves down again.

Implementation: composed from the package's fused multi-tensor ops (:mod:`sam_kernels`), with
no host read in a step; per step, over the parameters that have a gradient:

1. ``sk.grad_norm(g)``: the finite flag ``ok`` (a non-finite gradient skips the step on the
   device) and, with ``max_grad_norm``, the clip coefficient
   ``c = min(1, max_grad_norm / (||g|| + 1e-6))`` (a device scalar, from the same norm);
2. ``sk.lincomb_``: move up, ``w = w~ + ok * s_old * v``;
3. the fused SGD step (``sk.sgd_step_``, the weight decay on ``w~`` folded in as a
   :class:`sam_kernels.LinComb`) or AdamW step (``sk.adamw_step_``, weight decay 0), gated by
   ``ok``; the clip coefficient ``c`` is a coefficient of the gradient's term there (no pass of
   its own);
4. ``sk.grad_norm(v)``: ``s_new = rho / (||v|| + 1e-12)``;
5. ``sk.lincomb_``: move down, ``w~ = decay * w - ok * s_new * v`` (AdamW's decoupled decay here,
   where the reference applies it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

import sam_kernels as sk
from python_api._base import check_nonneg, check_range
from python_api._msam_core import MomentumSAMCore as _MomentumSAM

__all__ = ["MSAM", "AdamWMSAM"]


class MSAM(_MomentumSAM):
    r"""Momentum-SAM, SGD form: SAM's perturbation along the negative normalised momentum.

    .. code-block:: text

        between steps the parameters hold w~ = w - s * v (the gradient g is taken there)
        d     = g + weight_decay * w~                (on w~, as the reference computes it)
        w     = w~ + s * v                           (move back up; s = 0 before the first step)
        v     = momentum * v + d                     (v starts at zeros, so the first v is d)
        w     = w - lr * v
        s     = rho / (||v|| + 1e-12)                (global norm over every parameter with a
                                                      gradient, all groups together)
        w~    = w - s * v                            (move down along the new momentum)

    Becker, Altrock, Ferrari, "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead", 2024; the equations of the reference code
    (MarlonBecker/MSAM ``optimizer/msam.py``). One forward/backward per step, no host read.

    Differences from the reference, all outside its tested domain (one group, constant rho, no
    non-finite values) except the last: several parameter groups with their own ``lr``,
    ``momentum``, ``weight_decay`` and ``rho`` (the norm stays global); each parameter moves
    back by the scale it was moved down with (the reference moves back with the *current*
    group rho, which leaves ``w`` off by ``(rho_new - rho_old) * v / ||v||`` whenever a rho
    schedule changes rho); a parameter without a gradient in a step is left alone (and keeps
    its own scale); a non-finite gradient skips the step on the device; ``p.grad`` is not
    modified (the reference adds the weight decay into it in place); and ``nesterov=True`` is
    refused (the reference accepts it and ignores it).

    Args:
        params: parameters or parameter groups (a group may set its own ``lr``, ``momentum``,
            ``weight_decay``, ``rho``; ``rho=0`` leaves the group unperturbed: plain SGD).
        lr: learning rate (>= 0).
        momentum: momentum factor, in [0, 1) (no dampening, as the reference).
        weight_decay: L2 penalty added to the gradient (>= 0; default 1e-2 as the reference).
        nesterov: must be False.
        rho: perturbation radius (>= 0).
        on_nonfinite: ``"skip"`` (default: the step changes nothing, decided on the device) or
            ``"raise"`` (one host read per step, then :class:`NonFiniteError`).
        backend: force ``"eager"``, ``"triton"`` or ``"cuda"`` for the fused ops.
        max_grad_norm: None (default, no clipping) or a finite number > 0: the gradient ``g``
            the step uses (``p.grad`` at ``w~``, before the weight decay is added) is
            multiplied by ``min(1, max_grad_norm / (||g|| + 1e-6))``, ``||g||`` the global norm
            over every parameter with a gradient (all groups), as
            ``torch.nn.utils.clip_grad_norm_`` applied to ``p.grad`` before the step would;
            computed on the device from the finite check's norm and folded into the fused
            step (no extra pass, no host read; ``p.grad`` is not modified).

    State per parameter: ``momentum_buffer`` (parameter-sized), ``step`` and ``ascent_scale``
    (0-d). Use :meth:`unperturbed` to evaluate at ``w`` and :meth:`finalize` at the end of
    training.
    """

    _dir_key = "momentum_buffer"
    _buffer_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-2,
        nesterov: bool = False,
        rho: float = 0.3,
        *,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, rho=rho
        )
        super().__init__(
            params, defaults, on_nonfinite=on_nonfinite, backend=backend,
            max_grad_norm=max_grad_norm,
        )  # fmt: skip

    def _check_hparams(self, group: dict[str, Any]) -> None:
        super()._check_hparams(group)
        check_range("momentum", group["momentum"], 0.0, 1.0, False, True)
        if group.get("nesterov", False) is not False:
            raise ValueError(
                f"nesterov={group['nesterov']!r} is not supported: the reference "
                "(MarlonBecker/MSAM optimizer/msam.py) accepts the flag and ignores it, so "
                "MSAM refuses it rather than silently running without Nesterov momentum"
            )

    def _update(self, active, grads, c_up, consts, ok, clip) -> None:
        wd_row = consts[2]
        g_row = consts[0] if clip is None else consts[0] * clip  # the clipped gradient's factor
        # d = c * g + wd * w~ with w~ = w - c_up * v (the parameters hold w after the move up)
        comb_coefs = torch.stack([g_row, wd_row, -wd_row * c_up])
        start = 0
        for group, ps in active:
            n = len(ps)
            if n == 0:
                continue
            end = start + n
            gs = grads[start:end]
            st = [self.state[p] for p in ps]
            bufs = [s["momentum_buffer"] for s in st]
            steps = [s["step"] for s in st]
            wd, mu, lr = group["weight_decay"], group["momentum"], group["lr"]
            d: list[torch.Tensor] | sk.LinComb = gs
            if wd != 0.0:
                d = sk.LinComb((gs, ps, bufs), comb_coefs[:, start:end])
            elif clip is not None:
                d = sk.LinComb((gs,), g_row[start:end].unsqueeze(0))
            if mu != 0.0:
                sk.sgd_step_(
                    ps, d, bufs, steps, lr=lr, momentum=mu, weight_decay=0.0, ok=ok,
                    backend=self.backend,
                )  # fmt: skip
            else:
                # momentum 0: v = d (the fused step keeps no buffer then); gated by hand
                new = [torch.empty_like(p, memory_format=torch.preserve_format) for p in ps]
                if isinstance(d, sk.LinComb):
                    sk.lincomb_(new, d.terms, d.coefs, backend=self.backend)
                else:
                    torch._foreach_copy_(new, gs)
                sk.select_(bufs, sk.sanitize(new, ok), ok)
                sk.sgd_step_(
                    ps, bufs, [], steps, lr=lr, momentum=0.0, weight_decay=0.0, ok=ok,
                    backend=self.backend,
                )  # fmt: skip
            start = end


class AdamWMSAM(_MomentumSAM):
    r"""Momentum-SAM, AdamW form: the perturbation along the normalised first moment.

    .. code-block:: text

        between steps the parameters hold w~ = w - s * m (the gradient g is taken there)
        w     = w~ + s * m                           (move back up; s = 0 before the first step)
        t     = t + 1
        m     = beta1 * m + (1 - beta1) * g
        u     = beta2 * u + (1 - beta2) * g^2
        w     = w - lr / (1 - beta1^t) * m / (sqrt(u) / sqrt(1 - beta2^t) + eps)
        w     = w * (1 - lr * weight_decay)          (decoupled decay, after the Adam update)
        s     = rho / (||m|| + 1e-12)                (global norm over every parameter with a
                                                      gradient, all groups together)
        w~    = w - s * m

    Becker, Altrock, Ferrari, "Momentum-SAM", 2024; the equations of the reference code
    (MarlonBecker/MSAM ``optimizer/adamW_msam.py``), including where its weight decay enters
    (after the Adam update, so it also scales that update, unlike ``torch.optim.AdamW``) and
    its bias correction (torch's). The norm is of the raw first moment (not bias-corrected),
    as the reference. Differences as :class:`MSAM` (several groups, exact per-parameter
    move-back, parameters without a gradient left alone, device-side non-finite skip).

    Args:
        params: parameters or parameter groups (a group may set ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``rho``).
        lr: learning rate (>= 0).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to the denominator (>= 0).
        weight_decay: decoupled weight decay (>= 0; default 1e-2 as the reference).
        rho: perturbation radius (>= 0; default 1.0 as the reference).
        on_nonfinite, backend, max_grad_norm: as :class:`MSAM` (the clipped ``g`` enters both
            moments).

    State per parameter: ``exp_avg``, ``exp_avg_sq`` (parameter-sized), ``step`` and
    ``ascent_scale`` (0-d).
    """

    _dir_key = "exp_avg"
    _buffer_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rho: float = 1.0,
        *,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho)
        super().__init__(
            params, defaults, on_nonfinite=on_nonfinite, backend=backend,
            max_grad_norm=max_grad_norm,
        )  # fmt: skip

    def _check_hparams(self, group: dict[str, Any]) -> None:
        super()._check_hparams(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_range("betas[0]", betas[0], 0.0, 1.0, False, True)
        check_range("betas[1]", betas[1], 0.0, 1.0, False, True)
        check_nonneg("eps", group["eps"])
        if not math.isfinite(group["eps"]):
            raise ValueError(f"eps must be finite, got {group['eps']!r}")

    def _update(self, active, grads, c_up, consts, ok, clip) -> None:
        start = 0
        for group, ps in active:
            n = len(ps)
            if n == 0:
                continue
            end = start + n
            st = [self.state[p] for p in ps]
            beta1, beta2 = group["betas"]
            g: list[torch.Tensor] | sk.LinComb = grads[start:end]
            if clip is not None:
                g = sk.LinComb((g,), clip.reshape(1))
            sk.adamw_step_(
                ps, g, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                [], [s["step"] for s in st], lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=0.0, ok=ok, backend=self.backend,
            )  # fmt: skip
            start = end

    def _down_decay(self, consts: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        # (1 - lr * wd), or exactly 1 on a skipped step
        return consts[0] - consts[3] * ok.to(consts.dtype)
