"""GSAM: surrogate-gap guided SAM (Zhuang et al., ICLR 2022).

Reference code: juntang-zhuang/GSAM ``gsam/gsam.py`` (class ``GSAM``) with
``gsam/scheduler.py::ProportionScheduler`` (rho proportional to the learning rate), as its
``example/train.py`` drives them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api._base import (
    _EPS,
    Closure,
    SAMFamily,
    _dense_grads,
    check_nonneg,
    check_range,
)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class GSAM(SAMFamily):
    r"""GSAM: SAM whose base step also descends the surrogate gap.

    .. code-block:: text

        T(p) = |p| if adaptive else 1
        n0   = || T(p) * g0 ||                      (global, over every parameter with a grad)
        e(p) = rho_t(group) / (n0 + 1e-12) * T(p)^2 * g0(p)
        g1   = grad L(w + e)
        cos  = <g0, g1> / (||g1|| ||g0|| + 1e-12)   (global; plain norms, not T-weighted)
        vertical = g0 - cos * ||g0|| * g1 / (||g1|| + 1e-12)
        base.step() at w (restored bit for bit) with  g1 - alpha * vertical

        rho_t = rho                                       if rho_min is None
              = max(0, rho_min + (rho - rho_min) * (lr_t - lr_min) / (lr_max - lr_min))
                                                          otherwise
        lr_t: the first group's lr when the step runs; lr_max: its initial lr by default

    Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu, "Surrogate Gap Guided
    Sharpness-Aware Minimization", ICLR 2022. The equations are the reference code's
    (juntang-zhuang/GSAM ``gsam/gsam.py``), which are the paper's Algorithm 1 with the code's
    1e-12 guards; the learning-rate-proportional rho is the reference's
    ``ProportionScheduler`` as its ``example/train.py`` uses it (the scheduler steps, then
    ``update_rho_t()``: the rho of a step follows the lr that step runs with). Differences, by the
    package's shared rules: ``w`` is restored from an exact copy (the reference subtracts ``e``),
    a non-finite step is skipped on the device, and ``rho_t`` is clamped at 0 (a warm-up lr below
    ``lr_min`` would make the reference's value negative).

    Two forward/backward passes per step. ``g0`` is kept in a per-parameter buffer until the
    base step; the inner product and both plain norms are device scalars, and the base-step
    gradient ``(1 + alpha * cos * ||g0|| / (||g1|| + 1e-12)) * g1 - alpha * g0`` is handed to
    the fused base step as a :class:`sam_kernels.LinComb`: no host read in a step.

    Args:
        params: parameters or parameter groups. A group may set its own ``rho``; ``rho=0`` (or
            ``sam=False``) keeps a group unperturbed (its base-step gradient is still the
            combination, as the reference applies it to every parameter). With ``rho_min``,
            each group's rho is scaled by ``rho_t / rho`` (the schedule as a factor), so a group
            with its own rho follows the same proportional schedule.
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius (>= 0); the schedule's maximum (at ``lr = lr_max``).
        alpha: weight of the vertical component (in [0, 1]; the reference's ``gsam_alpha``).
            An attribute of the optimizer, not a param-group key (RMSprop's groups have an
            ``alpha`` of their own).
        rho_min: None (constant rho) or the schedule's value at ``lr = lr_min``
            (0 <= rho_min <= rho, as the reference's scheduler asserts).
        lr_max: the lr at which ``rho_t = rho`` (default: the first group's initial lr:
            ``initial_lr`` when an LR scheduler has set it, else ``lr``, at construction).
        lr_min: the lr at which ``rho_t = rho_min`` (default 0; ``lr_max > lr_min``).
        adaptive: ASAM's scale-invariant neighbourhood (``T(p) = |p|``, as the reference).
        model: if given, the evaluation at ``w + e`` leaves BN running statistics as they were.
        on_nonfinite: ``"skip"`` (default; the step changes nothing, decided on the device) or
            ``"raise"`` (a host read per evaluation, then :class:`NonFiniteError`).
        backend: force ``"eager"``, ``"triton"`` or ``"ext"`` (the compiled extension;
            ``"cuda"``, its former name, still works) for the fused ops.
        **base_kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).

    ``step(closure, loss=None)`` returns ``L0`` when it evaluated it or was given it, else the
    loss at ``w + e``. After a step ``p.grad`` holds ``g1`` (call ``zero_grad`` as usual).
    ``alpha``, ``rho_min``, ``lr_max`` and ``lr_min`` are configuration (attributes, checked at
    every step), not saved in ``state_dict``: build the resumed optimizer with the same values.
    """

    _transient_state = ("backup",)
    _sharded_refusal = (
        "its inner product <g0, g1> is a sum over every element, of which a shard holds only a "
        "part (it would need its own all-reduce)"
    )

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float = 0.4,
        *,
        rho_min: float | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        adaptive: bool = False,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        _check_config(rho, alpha, rho_min, lr_max, lr_min)
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho, adaptive=adaptive),
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        self.alpha = float(alpha)
        self.rho_max = float(rho)
        self.rho_min = None if rho_min is None else float(rho_min)
        self.lr_min = float(lr_min)
        if lr_max is None and rho_min is not None:
            g0 = self.param_groups[0]
            lr0 = g0.get("initial_lr", g0.get("lr"))
            if isinstance(lr0, torch.Tensor):
                lr0 = float(lr0)  # once, at construction
            if not _is_number(lr0) or not lr0 > self.lr_min:
                raise ValueError(
                    f"lr_max (default: the first group's initial lr, {lr0!r}) must be > lr_min "
                    f"({self.lr_min!r}); give lr_max"
                )
            lr_max = lr0
        self.lr_max = None if lr_max is None else float(lr_max)
        self._coef_dtype: dict[bool, torch.dtype] = {}

    # ----------------------------------------------------------------- rho schedule
    def rho_t(self) -> float | torch.Tensor:
        """The scheduled rho for the current first-group lr (``rho`` without ``rho_min``)."""
        return self.rho_max * self._rho_factor()

    def _rho_factor(self) -> float | torch.Tensor:
        """``rho_t / rho`` (1.0 without a schedule): host arithmetic on the lr, a float.

        An lr held as a tensor (torch's capturable optimizers) gives a device scalar.
        """
        _check_config(self.rho_max, self.alpha, self.rho_min, self.lr_max, self.lr_min)
        if self.rho_min is None or self.rho_max == 0.0:
            return 1.0
        if self.lr_max is None:
            raise ValueError("rho_min is set but lr_max is None: give lr_max (> lr_min)")
        lr = self.param_groups[0]["lr"]
        frac = (lr - self.lr_min) / (self.lr_max - self.lr_min)
        rho_t = self.rho_min + (self.rho_max - self.rho_min) * frac
        if isinstance(rho_t, torch.Tensor):
            return rho_t.clamp_min(0.0).to(self._device) / self.rho_max
        return max(0.0, rho_t) / self.rho_max

    # ----------------------------------------------------------------- pieces
    def _plain_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``||g||`` over ``grads`` (fused; squares summed in fp64), on the optimizer's device."""
        with sk.prevalidated():  # the parameters' gradients: the plan checked the lists
            n = sk.grad_norm(grads, backend=self.backend)
        return n.to(self._device)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Closure | None = None, loss: torch.Tensor | float | None = None
    ) -> torch.Tensor | None:
        """One GSAM step: gradients at ``w`` and ``w + e``, one base step at ``w``.

        Gradients already present are ``g0`` (davda54/sam's loop); otherwise the closure is
        first run at ``w``.
        """
        closure = self._require_closure(closure)
        factor = self._rho_factor()  # checks the configuration first
        alpha = self.alpha
        l0, ps = self._evaluate_w(closure, loss, need_loss=False)
        if not ps:  # nothing to perturb: the base step has been taken
            return l0

        # g0: the gradient tensors themselves, kept (not copied) until the base step; the next
        # evaluation starts from p.grad = None, so autograd never writes them again
        _dense_grads(self, ps)
        g0 = self._take_grads(ps)
        g0_of = dict(zip(ps, g0))
        n0 = self._grad_norm()
        ok = self._and_finite(None, n0, l0)
        self._check_raise(ok, "the evaluation at w (loss L0, gradient g0)")
        pert = self._perturb_along_grad(n0, factor)

        # w + e: g1 in p.grad (the parameters of g0 that got one; the others are restored and
        # not stepped, as the reference's base.step() leaves them)
        self._drop_grads()
        l1 = self._call_closure(
            closure, perturbed=True, need_loss=False, what="w + e", restore=pert
        )
        kept, _ = self._grads_at_perturbed(ps)
        ps1 = ps if kept is None else [ps[i] for i in kept]
        g1 = _dense_grads(self, ps1)
        n1 = self._plain_norm(g1)  # finite iff every element of g1 is (fp64 squares)
        ok = self._and_finite(ok, n1, l1)
        self._check_raise(ok, "the evaluation at w + e (gradient g1)", pert)

        # cos, and the base-step gradient c * g1 - alpha * g0 (device scalars)
        adaptive = any(g.get("adaptive", False) for g in self.param_groups)
        # the norm of g0 over the parameters of g1, as the reference's (its norms skip a
        # parameter whose .grad is None at w + e)
        g0_1 = g0 if kept is None else [g0[i] for i in kept]
        n0p = self._plain_norm(g0_1) if adaptive or kept is not None else n0
        n0p, n1d = n0p.to(torch.float64), n1.to(torch.float64)
        with sk.prevalidated():  # the parameters' gradients: the plan checked the lists
            dot = sk.dot(g0_1, g1, backend=self.backend).to(self._device)
        cos = dot / (n1d * n0p + _EPS)
        c = 1.0 + alpha * cos * n0p / (n1d + _EPS)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in ps) else torch.float32
        coefs = torch.stack([c, torch.full_like(c, -alpha)]).to(dtype)
        ok = ok * torch.isfinite(coefs).all().to(torch.float32)
        coefs = torch.nan_to_num(coefs, nan=0.0, posinf=0.0, neginf=0.0)

        def grad_of(gps: list[torch.Tensor]) -> sk.LinComb:
            return sk.LinComb(([p.grad for p in gps], [g0_of[p] for p in gps]), coefs)

        self._base_step(ok, pert, grad_of)
        return l0 if l0 is not None else l1


def _check_config(
    rho: float, alpha: float, rho_min: float | None, lr_max: float | None, lr_min: float
) -> None:
    check_range("alpha", alpha, 0.0, 1.0, False, False)
    if not _is_number(lr_min) or lr_min < 0.0:
        raise ValueError(f"lr_min must be a finite number >= 0, got {lr_min!r}")
    if rho_min is None:
        if lr_max is not None:
            raise ValueError(
                f"lr_max={lr_max!r} is given but rho_min is None (constant rho): lr_max only "
                "sets the rho schedule; give rho_min too, or drop lr_max"
            )
        return
    if not _is_number(rho_min) or not 0.0 <= rho_min <= rho:
        raise ValueError(f"rho_min must be a number in [0, rho={rho!r}], got {rho_min!r}")
    if lr_max is not None and (not _is_number(lr_max) or not lr_max > lr_min):
        raise ValueError(f"lr_max must be a finite number > lr_min ({lr_min!r}), got {lr_max!r}")
