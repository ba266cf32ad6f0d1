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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api._base import Closure, SAMFamily, check_nonneg

Noise = Sequence[Sequence[torch.Tensor]]


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


class _UniversalSAM(SAMFamily):
    """Shared machinery: ``n`` noisy evaluations at ``w + rho * eps_i``, one base step at ``w``.

    Subclasses set the noise kind, whether ``L0`` is needed, and implement the accumulation
    (:meth:`_accumulate`) and the final combination (:meth:`_final`).
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

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        if self._noise_seed is not None:
            extra["noise_seed"] = self._noise_seed.clone()
            extra["noise_offset"] = self._noise_offset.clone()
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        if self._noise_seed is not None and "noise_seed" in extra:
            self._noise_seed.copy_(torch.as_tensor(extra["noise_seed"]).to(self._device))
        if self._noise_offset is not None and "noise_offset" in extra:
            self._noise_offset.copy_(torch.as_tensor(extra["noise_offset"]).to(self._device))

    # ----------------------------------------------------------------- helpers
    def _const(self, vals: list[float], dtype: torch.dtype) -> torch.Tensor:
        """A cached device tensor of host constants (built once per value)."""
        key = (tuple(vals), dtype)
        t = self._consts.get(key)
        if t is None:
            t = torch.tensor(vals, dtype=dtype, device=self._device)
            self._consts[key] = t
        return t

    def _check_noise(self, noise: Noise, pert: list[torch.Tensor]) -> None:
        if len(noise) != self.n_samples:
            raise ValueError(f"noise has {len(noise)} samples, expected n_samples={self.n_samples}")
        for i, sample in enumerate(noise):
            if len(sample) != len(pert) or any(e.shape != p.shape for e, p in zip(sample, pert)):
                raise ValueError(
                    f"noise[{i}] must hold one tensor per perturbed parameter ({len(pert)}), "
                    "shaped like it, in parameter order"
                )

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
        ps = self._params_with_grad()
        ok = self._ok_from(l0)
        n0 = None
        if ps:
            fin, n0 = self._finite_and_norm([p.grad for p in ps])
            ok = ok * fin
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
        rho = self._rho_vector(groups)
        uniform = len({float(g["rho"]) for g, _ in groups}) == 1
        cdtype = rho.dtype
        l0r = None
        if l0 is not None and self._needs_l0:
            l0r = self._reduce_loss(l0).reshape(()).to(self._device)
        ctx: dict[str, Any] = {
            "pert": pert,
            "uniform": uniform,
            "dtype": cdtype,
            "rho_host": [float(g["rho"]) for g, gps in groups for _ in gps],
        }
        pert_ids = {id(p) for p in pert}
        counter = self._noise_seed is not None
        offset0 = self._noise_offset.clone() if counter else None
        drawn = sum(p.numel() for p in pert)
        first_loss = None
        try:
            for i in range(self.n_samples):
                sk.noise_perturb_(
                    pert,
                    backups,
                    rho[0] if uniform else rho,
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
                self.zero_grad(set_to_none=True)
                what = f"noisy sample {i + 1} of {self.n_samples} (w + rho * eps_{i + 1})"
                li = self._call_closure(
                    closure, perturbed=True, need_loss=self._needs_losses, what=what, restore=pert
                )
                gi = self._collect_grads(ps)
                ok = ok * self._finite_flag(gi) * self._ok_from(li)
                self._check_raise(ok, what, pert)
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
        ok = self._base_step(ok, pert, lambda gps: finals[id(gps[0])])
        if counter:
            # a skipped step draws nothing: the next step uses the same counters (the flag as
            # the base step used it, so a GradScaler or DDP skip counts too)
            self._noise_offset.copy_(torch.where(ok > 0, self._noise_offset, offset0))
        return l0 if l0 is not None else first_loss


class FrobSAM(_UniversalSAM):
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

    def _accumulate(self, i, grads, g0, loss, l0, ctx) -> None:
        if i == 0:
            # allocated after the first noisy backward (not during it), dropped with ctx
            ctx["cross"] = self._scratch(ctx["pert"])
            ctx["gsum"] = self._scratch(ctx["pert"])
        cross, gsum = ctx["cross"], ctx["gsum"]
        if i == 0:
            torch._foreach_zero_(cross)
            torch._foreach_zero_(gsum)
            ctx["lref"] = loss
            ctx["lsum"] = torch.zeros_like(loss)
        shifted = loss - ctx["lref"]
        sk.frob_accumulate_(cross, gsum, grads, shifted, backend=self.backend)
        ctx["lsum"] = ctx["lsum"] + shifted

    def _final(self, group, cols, g0_of, ctx, ps) -> sk.LinComb:
        n = self.n_samples
        k = float(group["lam"]) / float(group["rho"]) ** 2
        dtype = ctx["dtype"]
        # coefficients on (g0, cross, gsum): (1, k/(n-1), -k (Lsum/n)/(n-1))
        a = self._const([1.0, k / (n - 1), 0.0], dtype)
        b = self._const([0.0, 0.0, -k / (n * (n - 1))], dtype)
        lsum = ctx["lsum"].to(torch.promote_types(ctx["lsum"].dtype, dtype))
        coefs = (a + b * lsum).to(dtype)
        # a perturbed group's parameters are columns ``cols`` of ctx["pert"]
        terms = ([g0_of[id(p)] for p in ps], ctx["cross"][cols], ctx["gsum"][cols])
        return sk.LinComb(terms, coefs)


class _ISAM(_UniversalSAM):
    """Trace-SAM and Det-SAM (the reference's ``ISAM``): ``acc += psi'(d_i)/n (g_i - g0)``."""

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


class TraceSAM(_ISAM):
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

    def _accumulate(self, i, grads, g0, loss, l0, ctx) -> None:
        c = self._const([1.0 / self.n_samples], ctx["dtype"])[0]
        self._add_to_acc(i, grads, g0, c, ctx)

    def _final(self, group, cols, g0_of, ctx, ps) -> sk.LinComb:
        scale = self._const([float(group["lam"])], ctx["dtype"])[0]
        return self._final_from(cols, ps, g0_of, scale, ctx)


class DetSAM(_ISAM):
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

    def _accumulate(self, i, grads, g0, loss, l0, ctx) -> None:
        dtype = ctx["dtype"]
        dt = torch.promote_types(torch.promote_types(loss.dtype, l0.dtype), dtype)
        rho_host = ctx["rho_host"]
        if ctx["uniform"]:
            inv_rho2 = self._const([1.0 / rho_host[0] ** 2], dt)[0]
        else:
            inv_rho2 = self._const([1.0 / r**2 for r in rho_host], dt)
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
