"""The universal class of sharpness measures: Frob-SAM, Trace-SAM, Det-SAM.

Tahmasebi, Soleymani, Bahri, Jegelka, Jaillet, "A Universal Class of Sharpness-Aware
Minimization Algorithms", ICML 2024. Reference code: dbahri/universal_sam ``solver/sam.py``,
classes ``FROSAM`` (Frob-SAM) and ``ISAM`` (Trace-SAM: ``isam_setting="trace"``, Det-SAM:
``"det"``).

Noise. On the eager backend ``eps`` is drawn per parameter with a gradient, in parameter order,
sample after sample, from the global generator (``torch.normal(0, 1, size=p.shape)``, or
``2*a*torch.rand(p.shape) - a`` for Det-SAM): the reference code's random stream on the CPU,
which is the user's (no generator of the optimizer's own, none in ``state_dict``). Where a fused
backend runs the noise op, the noise comes from the optimizer's own counter-based
``(seed, offset)`` pair (int64 device tensors, kept in ``state_dict``; the offset advances on the
device by the number of elements drawn per sample and does not advance on a skipped step).

Memory (bytes per fp32 parameter, 4 = one copy; the base optimizer's state and the gradients not
counted). Between steps: 4, the backup of ``w`` (kept like SAM's, so the cached step plans keep
it). Inside a step: the backup, live from the first noisy perturbation to the base step (which
restores from it), plus the accumulators, allocated after the first noisy backward (so they are
not alive while it runs) and dropped when the step returns or raises: Frob-SAM ``cross`` and
``gsum`` (peak 12), Trace/Det-SAM ``acc`` (peak 8). ``g0`` is not copied: the step keeps the
gradient tensors of the evaluation at ``w`` (``p.grad`` is then set to ``None``, so the noisy
evaluations write new tensors), read-only, until the base step (a gradient that is a view, as
DDP's ``gradient_as_bucket_view`` gives, is copied into a step-local buffer: +4 for such
parameters). With ``g0`` and the gradient being computed, the peak of gradient-sized tensors is
20 (Frob) or 16 (Trace/Det) bytes per parameter, as before this layout, which held ``g0`` and the
accumulators as copies between steps as well (16 and 12 of its own); the first noisy backward
now runs without the accumulators (12 instead of 20 or 16).

Planned steps: over a fused SGD/AdamW base on the compiled extension (the CPU default), with
the counter-based noise (``backend="ext"``) or the reference's global stream (the CPU default),
``on_nonfinite="skip"``, no clipping, one process and every group perturbed, a step runs as
``n_samples + 2`` ops of SAM's cached step plan, bit-identical to the unplanned step
(:mod:`python_api._universal_plan`).

Layout: this module holds the three classes (their formulas, defaults and constructors) and
``_UniversalSAM``'s construction; the parts are :mod:`python_api._universal_step` (the step),
:mod:`python_api._universal_estimators` (each class's accumulation and final combination) and
:mod:`python_api._universal_noise` (the noise counters in ``state_dict``, the ``noise=`` check).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api._base import SAMFamily, check_nonneg
from python_api._universal_estimators import (
    DetEstimator,
    FrobEstimator,
    ISAMEstimator,
    TraceEstimator,
)
from python_api._universal_noise import Noise, UniversalNoise
from python_api._universal_plan import UniversalPlan
from python_api._universal_step import UniversalStep

#: ``Noise`` (the ``noise=`` argument's type) is importable from here as before the split
__all__ = ["DetSAM", "FrobSAM", "Noise", "TraceSAM"]


def _uses_counter_noise(params: Sequence[torch.Tensor], backend: str | None) -> bool:
    """Whether ``noise_perturb_`` runs a fused backend (``(seed, offset)`` noise) for ``params``.

    The eager implementation (also the fallback for dtypes the fused backends do not implement
    and for backends that lack the op) draws from the global generator instead.
    """
    if not params:
        return False
    return sk.runs_on("noise_perturb", params, backend) != "eager"


def _check_n_samples(value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"n_samples must be an integer >= {least}, got {value!r}")


class _UniversalSAM(UniversalPlan, UniversalNoise, UniversalStep, SAMFamily):
    """Shared machinery: ``n`` noisy evaluations at ``w + rho * eps_i``, one base step at ``w``.

    Subclasses set the noise kind, whether ``L0`` is needed, and implement the accumulation
    (:meth:`_accumulate`) and the final combination (:meth:`_final`), with a mixin of
    :mod:`python_api._universal_estimators`. The step is :class:`UniversalStep`'s, the noise
    counters' state :class:`UniversalNoise`'s.
    """

    _kind = "normal"
    _needs_l0 = False  # L0 enters the gradient (Det-SAM)
    _needs_losses = True  # the noisy losses L_i enter the gradient (Frob-SAM, Det-SAM)
    _sharded_refusal = (
        "its noise would be drawn per element of each rank's shard (the same stream on every "
        "rank), not as one draw over the whole parameter"
    )
    _min_samples = 1
    #: only the backup (kept between steps, as SAM's); ``g0`` is the gradient tensor of the
    #: evaluation at ``w`` and the accumulators are step-local (see the module docstring)
    _transient_state = ("backup",)
    # the counter-based noise exists only where a fused backend draws it
    _optional_extra_state = ("noise_seed", "noise_offset")
    _config_extra_state = ("noise_seed",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float,
        n_samples: int,
        lam: float,
        half_cube_len: float = 1.0,
        *,
        seed: int | None = None,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        process_group: Any = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        _check_n_samples(n_samples, self._min_samples)
        check_nonneg("lam", lam)
        if (
            not isinstance(half_cube_len, (int, float))
            or isinstance(half_cube_len, bool)
            or not (half_cube_len > 0.0 and math.isfinite(half_cube_len))
        ):
            raise ValueError(f"half_cube_len must be a finite number > 0, got {half_cube_len!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho, lam=lam),
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            process_group=process_group,
            **base_kwargs,
        )
        self.n_samples = n_samples
        self.half_cube_len = float(half_cube_len)
        all_params = [p for g in self.param_groups for p in g["params"]]
        self._noise_seed: torch.Tensor | None = None
        self._noise_offset: torch.Tensor | None = None
        if _uses_counter_noise(all_params, backend):
            s = torch.initial_seed() if seed is None else seed
            self._noise_seed = torch.tensor(
                s & 0x7FFF_FFFF_FFFF_FFFF, dtype=torch.int64, device=self._device
            )
            self._noise_offset = torch.zeros((), dtype=torch.int64, device=self._device)
        self._consts: dict[tuple, torch.Tensor] = {}

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_nonneg("lam", group["lam"])

    # ----------------------------------------------------------------- step
    # UniversalStep's (python_api._universal_step), named in this class's body so that
    # SAMFamily.__init_subclass__ wraps it as every algorithm's step
    step = UniversalStep.step


class FrobSAM(FrobEstimator, _UniversalSAM):
    r"""Frob-SAM: penalises the Frobenius norm of the Hessian (Tahmasebi et al., ICML 2024).

    .. code-block:: text

        for i in 1..n:  eps_i ~ N(0, I);  w_i = w + rho * eps_i;  L_i, g_i at w_i
                        cross += L_i g_i;   gsum += g_i;   Lsum += L_i
        g = g0 + lam / rho^2 * ( cross/(n-1) - (Lsum/n) gsum/(n-1) )
        base.step() at w with g

    The bracket is the sample cross-covariance of ``L_i`` and ``g_i`` (hence ``n >= 2``). It
    is accumulated with the losses shifted by the first sample's, ``L_i - L_1`` (the covariance
    is unchanged; the shift removes the cancellation between ``cross`` and ``Lsum * gsum`` in
    low precision). Reference: dbahri/universal_sam ``FROSAM``; defaults are its README's
    command for Frob-SAM (CIFAR-10, ResNet-18): ``rho=0.005, n_samples=2, lam=0.005``.

    A group may set its own ``rho`` and ``lam``; a ``rho=0`` (or ``sam=False``) group is not
    perturbed, draws no noise, and its gradient is ``g0``. ``seed`` seeds the counter-based
    noise of fused backends only (default: ``torch.initial_seed()``); see the module docstring.
    ``L0`` is not needed. Other arguments as :class:`python_api.sam.SAM`; ``process_group``:
    the group over which the losses ``L_i`` are averaged under torch.distributed.

    Memory: 4 bytes per parameter between steps (the backup), 12 at the peak of a step (the
    backup, ``cross``, ``gsum``); ``g0`` is the gradient tensor of ``w``, kept (see the module
    docstring).
    """

    _kind = "normal"
    _needs_l0 = False
    _min_samples = 2

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.005,
        n_samples: int = 2,
        lam: float = 0.005,
        *,
        seed: int | None = None,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        process_group: Any = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            rho,
            n_samples,
            lam,
            seed=seed,
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            process_group=process_group,
            **base_kwargs,
        )


class _ISAM(ISAMEstimator, _UniversalSAM):
    """Trace-SAM and Det-SAM (the reference's ``ISAM``): ``acc += psi'(d_i)/n (g_i - g0)``."""


class TraceSAM(TraceEstimator, _ISAM):
    r"""Trace-SAM: penalises the trace of the Hessian (Tahmasebi et al., ICML 2024).

    .. code-block:: text

        for i in 1..n:  eps_i ~ N(0, I);  w_i = w + rho * eps_i;  g_i at w_i
                        acc += psi'(d_i)/n (g_i - g0)          (psi(x) = x: psi' = 1)
        g = g0 + lam * phi'(x) * acc                            (phi' = 1)
        i.e. g = g0 + lam * mean_i (g_i - g0)
        base.step() at w with g

    ``d_i = (L_i - L0)/rho^2`` and ``x = sum psi(d_i)/n`` do not enter the gradient (psi' and
    phi' are constants), so Trace-SAM needs no loss value (``L0`` or ``L_i``; a closure may
    return None; a loss it returns still counts for the non-finite check). The reference's
    "hypersphere" sampler never normalises: its samples are plain Gaussian, as here.
    Reference: dbahri/universal_sam ``ISAM`` with ``isam_setting="trace"``; defaults are its
    README's command for Trace-SAM: ``rho=0.01, n_samples=1, lam=1.0``. Groups, ``seed`` and
    the other arguments as :class:`FrobSAM` (a ``rho=0`` group's gradient is ``g0``).

    Memory: 4 bytes per parameter between steps (the backup), 8 at the peak of a step (the
    backup, ``acc``); ``g0`` is the gradient tensor of ``w``, kept (see the module docstring).
    """

    _kind = "normal"
    _needs_l0 = False
    _needs_losses = False
    _min_samples = 1

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.01,
        n_samples: int = 1,
        lam: float = 1.0,
        *,
        seed: int | None = None,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        process_group: Any = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            rho,
            n_samples,
            lam,
            seed=seed,
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            process_group=process_group,
            **base_kwargs,
        )


class DetSAM(DetEstimator, _ISAM):
    r"""Det-SAM: penalises the determinant of the Hessian (Tahmasebi et al., ICML 2024).

    .. code-block:: text

        d_i = (L_i - L0) / rho^2
        for i in 1..n:  eps_i ~ Uniform[-a, a] per element;  w_i = w + rho * eps_i;  L_i, g_i
                        x   += psi(d_i)/n;   acc += psi'(d_i)/n (g_i - g0)
        psi(x) = exp(-x/2),  psi'(x) = -psi(x)/2,  phi'(x) = -2/x^3
        g = g0 + lam * phi'(x) * acc
        base.step() at w with g

    (The reference notes that a ``(2 pi)^d`` factor is left out, compensated by ``lam``.)
    The sharpness term grows like ``lam * exp(d)`` (``phi'(x) psi'(d) ~ 1/psi^2``): ``d`` must
    stay small, which the reference's setting (``rho = 1``, ``a = 0.01``) ensures. A step whose
    coefficients overflow is skipped like a non-finite evaluation (``skipped_steps`` + 1). With
    groups of different ``rho``, ``d`` of a group is ``(L_i - L0)/rho_group^2`` while ``L_i``
    moves with every group's noise: a group with a much smaller ``rho`` than the others gets a
    huge ``d``; give the perturbed groups of Det-SAM one ``rho`` (``rho=0`` groups are fine).
    Reference: dbahri/universal_sam ``ISAM`` with ``isam_setting="det"``; defaults are its
    README's command for Det-SAM: ``rho=1.0, n_samples=1, lam=1.0, half_cube_len=0.01``
    (``a``). ``L0`` is needed: ``step(closure, loss=L0)`` when the gradients at ``w`` are
    present, else the closure is evaluated at ``w``. With per-group ``rho``, ``d_i``, ``x``
    and the coefficients are per group (per tensor in the fused calls); a ``rho=0`` group is
    not perturbed and its gradient is ``g0``. ``seed`` and the other arguments as
    :class:`FrobSAM`.

    Memory: 4 bytes per parameter between steps (the backup), 8 at the peak of a step (the
    backup, ``acc``); ``g0`` is the gradient tensor of ``w``, kept (see the module docstring).
    """

    _kind = "uniform"
    _needs_l0 = True
    _min_samples = 1

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 1.0,
        n_samples: int = 1,
        lam: float = 1.0,
        half_cube_len: float = 0.01,
        *,
        seed: int | None = None,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        process_group: Any = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            rho,
            n_samples,
            lam,
            half_cube_len,
            seed=seed,
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            process_group=process_group,
            **base_kwargs,
        )
