"""Small checks shared by the family: validators, the finite flag, the ascent scale, and the
gradient helpers every algorithm uses (dense gradients, norms combined in fp64)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

_EPS = 1e-12


class NonFiniteError(FloatingPointError):
    """Raised with ``on_nonfinite="raise"`` when a loss or gradient is not finite."""


def finite01(x: torch.Tensor) -> torch.Tensor:
    """1.0 where ``x`` is finite, else 0.0, as float32 (``x - x`` is 0 exactly for every finite
    value and NaN for inf/NaN): two dispatched ops where ``isfinite`` decomposes into four."""
    return ((x - x) == 0).to(torch.float32)


def ascent_inv(norm: torch.Tensor) -> torch.Tensor:
    """``1 / (norm + 1e-12)``, or 0 where ``norm`` is not finite (then no non-finite value
    reaches the weights): the same values as a ``where`` on ``isfinite``, in three ops."""
    return torch.nan_to_num(torch.reciprocal(norm + _EPS), nan=0.0, posinf=0.0, neginf=0.0)


def check_nonneg(name: str, value: float) -> None:
    """A finite number >= 0 (an infinite radius or weight skipped every step, or gave
    non-finite weights, without an error)."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not value >= 0.0
        or not math.isfinite(value)
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


#: the base optimizer's settings a fused step reads, per base kind (python_api._plans)
BASE_KEYS = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
}


def check_base_group(kind: str, group: dict, index: int) -> None:
    """The settings of ``param_groups[index]`` that the package's own SGD or AdamW step applies:
    numbers, finite, in torch's ranges (lr, momentum, weight_decay, eps >= 0; betas in
    [0, 1)). torch checks these in its constructors only; here a value written into the group
    later (by hand, a scheduler) is checked before the step changes anything, so a NaN or a
    string never reaches the weights. A tensor ``lr`` is checked for its shape only (its value
    would need a host read)."""
    where = f"param_groups[{index}]"
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}['lr'] must be a number or a one-element tensor")
    else:
        check_nonneg(f"{where}['lr']", lr)
    check_nonneg(f"{where}['weight_decay']", group["weight_decay"])
    for flag in ("maximize", "nesterov", "amsgrad"):
        if flag in group and not isinstance(group[flag], bool):
            raise ValueError(f"{where}['{flag}'] must be True or False, got {group[flag]!r}")
    if kind == "sgd":
        check_nonneg(f"{where}['momentum']", group["momentum"])
        d = group["dampening"]  # any sign, as torch's
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
            raise ValueError(f"{where}['dampening'] must be a finite number, got {d!r}")
    else:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}['betas'] must be a pair of numbers, got {betas!r}")
        for i, b in enumerate(betas):
            check_range(f"{where}['betas'][{i}]", b, 0.0, 1.0, False, True)
        check_nonneg(f"{where}['eps']", group["eps"])


def check_sigma(value: Any) -> None:
    """A noise scale ``sigma``: a finite number >= 0 (FriendlySAM, R-SAM)."""
    check_nonneg("sigma", value)
    if not math.isfinite(value):
        raise ValueError(f"sigma must be a finite number >= 0, got {value!r}")


def check_max_grad_norm(value: float | None) -> None:
    """``max_grad_norm``: None (no clipping) or a finite number > 0."""
    if value is None:
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not (value > 0.0 and math.isfinite(value))
    ):
        raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {value!r}")


def check_range(name: str, value: float, lo: float, hi: float, lo_open: bool, hi_open: bool):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


def check_real_params(opt: Any) -> None:
    """Refuse complex parameters, naming the first one (before anything is written).

    The fused ops read a tensor's elements as real numbers: a complex gradient's norm would
    drop its imaginary parts and the base step would fail half way. torch's own optimizers
    step complex parameters through ``torch.view_as_real``; the SAM family's quantities (the
    norm, ASAM's ``|w|``, the curvature terms) have no agreed complex form, so a clear error
    asks for real parameters instead of a silent choice.
    """
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            if p.is_complex():
                raise TypeError(
                    f"{type(opt).__name__}: param_groups[{i}]['params'][{j}] has dtype "
                    f"{p.dtype}; complex parameters are not supported (optimize a real "
                    "parameter and view it as complex in the model: torch.view_as_complex)"
                )


def _dense_grads(opt: Any, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[p.grad for p in params]``, refusing sparse gradients (the one per-step check the ops
    skip under ``sk.prevalidated()``: torch keeps a gradient's device, shape and dtype, not its
    layout)."""
    return _check_dense(opt, [p.grad for p in params])


def _check_dense(opt: Any, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads``, after refusing a sparse one (a clear error naming the class)."""
    for g in grads:
        if g.layout is not torch.strided:
            raise ValueError(
                f"{type(opt).__name__} does not support sparse gradients: the gradient of "
                f"{where_grad(opt, g)} has layout {g.layout}"
            )
    return grads


def where_grad(opt: Any, grad: torch.Tensor) -> str:
    """``param_groups[i]['params'][j] (shape ...)``: the parameter whose ``.grad`` is ``grad``
    (for error messages; a linear search)."""
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            if p.grad is grad:
                return f"param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)})"
    return "a parameter"


def _combine_norms(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sqrt(sum n_i^2)`` of partial norms, on ``device``, in the first one's dtype: combined in
    fp64, so partial norms near the fp32 limit do not overflow here."""
    if len(norms) == 1:
        return norms[0]
    n64 = torch.stack([n.to(device, torch.float64) for n in norms])
    return torch.linalg.vector_norm(n64).to(norms[0].dtype)
