"""R-SAM: Random Sharpness-Aware Minimization (Liu, Mai, Cheng, Chen, Hsieh, You, NeurIPS 2022).

Reference code: RSAM-Optimizer/R-SAM ``vit_jax/train.py`` (``random_vector`` and
``sam_gradient``), JAX, not runnable today: the class follows the update as the package's spec
writes it (``ALGORITHMS.md``, "R-SAM"), which is that code's in PyTorch's weight layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api._base import (
    Closure,
    SAMFamily,
    _dense_grads,
    ascent_inv,
    check_nonneg,
)
from python_api._checks import check_sigma
from python_api._noise_state import NoiseStreamState

#: the 1-d (and 0-d) tensors' noise scale is ``||p|| + 1e-16`` (the reference's guard)
NOISE_EPS_1D = 1e-16


def _noise_scale(w: torch.Tensor) -> torch.Tensor:
    """``s_p``: the norm of each output unit (all dims but dim 0, broadcast back) for
    ``ndim > 1``; ``||p|| + 1e-16`` for 1-d and 0-d tensors. Device ops, no host read.
    (The step forms it inside ``sam_kernels.filter_noise_perturb_``; kept for the per-tensor
    draw of a backend that has ``noise_perturb`` but not that op.)"""
    if w.dim() > 1:
        s = torch.linalg.vector_norm(w.flatten(1), dim=1)
        return s.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.linalg.vector_norm(w) + NOISE_EPS_1D


class RSAM(NoiseStreamState, SAMFamily):
    r"""R-SAM: SAM whose ascent direction is taken at a randomly perturbed point.

    .. code-block:: text

        delta(p) = sigma * z(p) * s(p),  z ~ N(0, 1) per element,
                   s(p) = per-output-unit norm of p (norm over all dims but dim 0, broadcast)
                          for ndim > 1;  ||p|| + 1e-16 for 1-d tensors
        g_d  = grad L(w + delta)                     (no gradient at w at all)
        u    = 2 g_d + delta
        e(p) = rho / (||u|| + 1e-12) * u(p)          (global norm; from w, not from w + delta)
        g1   = grad L(w + e)
        base.step() at w (restored bit for bit) with g1

    Liu, Mai, Cheng, Chen, Hsieh, You, "Random Sharpness-Aware Minimization", NeurIPS 2022.
    Reference: RSAM-Optimizer/R-SAM ``vit_jax/train.py`` (JAX; ``random_vector`` draws the
    filter-wise noise over the output axis, the last one of flax's kernels, here dim 0 of
    PyTorch's ``[out, in, ...]`` weights). It is not runnable today; the class is checked
    against the spec's formula.

    Defaults. ``rho=0.05`` (SAM's; the reference ties rho to the learning rate on ViT-B/16
    ImageNet at batch 4096, from 2.5 down to 1.5, which :class:`python_api.ProportionalRho`
    reproduces) and ``sigma=5e-4`` (the reference's noise scale at the start of training; it
    rises by a cosine to 2.5e-3, 5x, over training). ``sigma`` is a param-group key like
    ``rho``, so a scheduler-like object can drive it (``group["sigma"] = ...``).

    Noise stream. ``z`` is drawn for every parameter that requires grad in a perturbed group
    (``rho != 0`` and ``sam`` not False), in parameter order (groups in order, parameters in
    order), whether or not it gets a gradient (that is only known after the evaluation at
    ``w + delta``; one that gets none is then restored and skipped everywhere). On the eager
    backend (every CPU run unless a backend is forced) ``z`` is ``torch.randn(p.shape)`` per
    such parameter, on its device, from that device's global generator (the user's: seeding
    torch before a step replays it; nothing of it is in ``state_dict``). Where a fused backend
    runs the noise op (Triton on CUDA), ``z`` comes from the package's counter-based stream, the
    same ``(seed, offset)`` pair as the universal class (``sam_kernels.noise_perturb_``): int64
    device tensors kept in ``state_dict``; ``seed`` (default ``torch.initial_seed()``) seeds it;
    the offset advances by the number of elements drawn and not on a skipped step. Every rank
    then draws the same numbers (under DDP, seed every rank alike for the global generator).

    Batch norm: R-SAM has no evaluation at ``w``; with ``model=`` given, the evaluation at
    ``w + delta`` (the reference's "clean" pass) updates the running statistics and the one at
    ``w + e`` leaves them as they were. If the user ran a forward/backward at ``w`` before
    ``step`` (davda54/sam's loop: fresh gradients present), that forward has updated them, the
    gradients are dropped (unused: a wasted pass) and both evaluations leave BN as it is.
    Under the DDP helper's per-replica mode the evaluation at ``w + delta`` is the local one
    (``no_sync``), as the reference's, whose first-pass gradient is not averaged over devices.

    Two forward/backward passes per step (``w + delta``, ``w + e``); gradients already present
    when ``step`` is called are dropped (R-SAM takes none at ``w``), so a closure is required.
    ``z``/``delta`` is held in step-local scratch until ``u`` is formed (in the gradients of the
    first evaluation, in place); the ascent from ``w`` is one fused linear combination of the
    backup and ``u``. No host read in a step over SGD or AdamW.

    Memory (bytes per fp32 parameter, besides the base optimizer's state and the gradients):
    the backup of ``w`` 4 (kept between steps like SAM's, not saved); inside a step ``delta`` 4
    until the ascent. No persistent state of its own (the counter pair on fused backends).

    Args:
        params: parameters or parameter groups (a group may set its own ``rho`` and ``sigma``;
            ``rho=0`` or ``sam=False`` keeps a group unperturbed: no noise, no ascent, its
            ``u = 2 g_d`` still in the norm).
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius of the ascent (>= 0).
        sigma: scale of the filter-wise noise (>= 0; 0 gives SAM with the gradient at ``w``).
        seed: seed of the counter-based noise of fused backends (an int; default
            ``torch.initial_seed()``); unused by the eager draw.
        model: if given, BN running statistics are updated by the evaluation at ``w + delta``
            only.
        on_nonfinite: ``"skip"`` (default; the step changes nothing, decided on the device) or
            ``"raise"`` (a host read per evaluation, then :class:`NonFiniteError`).
        backend: force ``"eager"``, ``"triton"`` or ``"ext"`` for the fused ops.
        max_grad_norm: clip ``g1`` (the base step's gradient) by its global norm, as
            ``torch.nn.utils.clip_grad_norm_``, on the device (None: no clipping).
        **base_kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).

    ``step(closure, loss=None)`` returns ``loss`` when given, else the loss at ``w + delta``
    (the reference's ``l_clean``). After a step ``p.grad`` holds ``g1``.
    """

    _transient_state = ("backup",)
    # the counter-based noise exists only where a fused backend draws it
    _optional_extra_state = ("noise_seed", "noise_offset")
    _config_extra_state = ("noise_seed",)
    #: the base step uses only ``g1``; the first pass (at ``w + delta``) is the local one
    per_replica_safe = True
    _sharded_refusal = (
        "its noise would be drawn per element of each rank's shard (the same stream on every "
        "rank), not as one draw over the whole parameter, and the noise scale of a 1-d "
        "parameter is the norm of the whole tensor"
    )

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        sigma: float = 5e-4,
        *,
        seed: int | None = None,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        check_sigma(sigma)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho, sigma=sigma),
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        all_params = [p for g in self.param_groups for p in g["params"]]
        self._noise_seed: torch.Tensor | None = None
        self._noise_offset: torch.Tensor | None = None
        if all_params and sk.runs_on("noise_perturb", all_params, backend) != "eager":
            s = torch.initial_seed() if seed is None else seed
            self._noise_seed = torch.tensor(
                s & 0x7FFF_FFFF_FFFF_FFFF, dtype=torch.int64, device=self._device
            )
            self._noise_offset = torch.zeros((), dtype=torch.int64, device=self._device)
        self._one = torch.ones((), dtype=torch.float32, device=self._device)
        self._consts: dict[torch.dtype, torch.Tensor] = {}

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_sigma(group.get("sigma", 5e-4))

    # ----------------------------------------------------------------- hooks
    def _eval_context(self, what: str):
        # the evaluation at w + delta is this algorithm's first (local in per-replica mode)
        return super()._eval_context("w" if what == "w + delta" else what)

    def _noisy(self) -> list[tuple[dict, list[torch.Tensor]]]:
        """The groups that are perturbed, with their parameters that require grad."""
        out = []
        for g in self.param_groups:
            if g.get("rho", 0.0) == 0.0 or g.get("sam", True) is False:
                continue
            ps = [p for p in g["params"] if p.requires_grad]
            if ps:
                out.append((g, ps))
        return out

    def _draw(self, groups, noisy, backups) -> list[torch.Tensor]:
        """``delta`` of ``noisy`` (step-local), ``backups = w``, and ``p = w + delta``.

        One fused op (``sam_kernels.filter_noise_perturb_``): on Triton two launches per dtype
        group whatever the number of tensors; eager: ``z`` from the global generator, one draw
        per tensor in order."""
        delta = self._scratch(noisy)
        sigmas = [float(g["sigma"]) for g, ps in groups for _ in ps]
        if self._noise_seed is not None and (
            sk.runs_on("filter_noise_perturb", noisy, self.backend) == "eager"
        ):
            # counter noise from a backend without the fused op (the extension on CPU tensors)
            return self._draw_per_tensor(noisy, backups, delta, sigmas)
        sk.filter_noise_perturb_(
            noisy,
            backups,
            delta,
            sigmas,
            seed=self._noise_seed,
            offset=self._noise_offset,
            eps_1d=NOISE_EPS_1D,
            backend=self.backend,
        )
        self._live.extend(noisy)
        return delta

    def _draw_per_tensor(self, noisy, backups, z, sigmas) -> list[torch.Tensor]:
        """The draw through ``noise_perturb_`` (counter-based ``z``), scaled tensor by tensor."""
        # z ~ N(0, 1) through the package's noise op: "params" z, "backups" zeros, scale 1
        # (z = 0 + 1 * eps exactly)
        torch._foreach_zero_(backups)
        sk.noise_perturb_(
            z,
            backups,
            self._one,
            kind="normal",
            save_backup=False,
            seed=self._noise_seed,
            offset=self._noise_offset,
            backend=self.backend,
        )
        torch._foreach_copy_(backups, noisy)
        self._live.extend(noisy)
        for zi, p, sigma in zip(z, noisy, sigmas):
            if zi.numel():
                zi.mul_(_noise_scale(p).to(zi.dtype) * sigma)
        torch._foreach_add_(noisy, z)
        return z

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Closure | None = None, loss: torch.Tensor | float | None = None
    ) -> torch.Tensor | None:
        """One R-SAM step: gradients at ``w + delta`` and ``w + e``, one base step at ``w``."""
        closure = self._require_closure(closure)
        self._follow_device()
        given = self._as_loss(loss) if loss is not None else None
        ok = self._ok_from(given)
        # no gradient at w: present ones are not used; fresh ones mean the user's forward at w
        # has already updated the BN statistics for this batch (then the evaluation at
        # w + delta leaves them, so a step updates them once either way)
        user_forward = self._fresh_grads()
        self._drop_grads()

        counter = self._noise_seed is not None
        offset0 = self._noise_offset.clone() if counter else None
        try:
            out = self._step(closure, ok, offset0, user_forward)
        except BaseException:
            if counter:
                self._noise_offset.copy_(offset0)
            raise
        return given if given is not None else out

    def _step(
        self,
        closure: Closure,
        ok: torch.Tensor,
        offset0: torch.Tensor | None,
        user_forward: bool,
    ) -> torch.Tensor | None:
        """The step after the checks; returns the loss at ``w + delta``."""
        groups = self._noisy()
        noisy = [p for _, ps in groups for p in ps]
        delta: list[torch.Tensor] = []
        if noisy:
            backups = self._backups(noisy)
            delta = self._draw(groups, noisy, backups)
            if offset0 is not None:
                self._noise_offset.add_(sum(p.numel() for p in noisy))
        # w + delta: g_d (BN statistics updated here unless the user's forward at w did)
        l_d = self._call_closure(
            closure, perturbed=user_forward, need_loss=False, what="w + delta", restore=noisy
        )
        ok = ok * self._ok_from(l_d)
        ps = self._params_with_grad()
        with_grad = {id(p) for p in ps}
        lost = [p for p in noisy if id(p) not in with_grad]
        if lost:  # drawn, but no gradient: back to w, skipped everywhere
            self._restore(lost)
        if not ps or not noisy:
            # nothing perturbed (delta = 0, so e = 0 and g1 = g_d): one evaluation suffices
            if ps:
                fin, n = self._finite_and_norm(_dense_grads(self, ps))
                ok = ok * fin
            else:
                n = None
            self._check_raise(ok, "the evaluation at w + delta (gradient g_delta)", noisy)
            ok = self._base_step(ok, noisy, norm=n)
            self._rewind_unless(ok, offset0)
            return l_d

        # u = 2 g_d + delta in the gradients themselves (2 g_d where unperturbed)
        g_d = _dense_grads(self, ps)
        pos = {id(p): i for i, p in enumerate(noisy)}
        pert_ps = [p for p in ps if id(p) in pos]
        plain = [p.grad for p in ps if id(p) not in pos]
        cdtype = torch.float64 if any(p.dtype == torch.float64 for p in ps) else torch.float32
        two_one = self._consts.get(cdtype)
        if two_one is None or two_one.device != self._device:
            two_one = torch.tensor([2.0, 1.0], dtype=cdtype, device=self._device)
            self._consts[cdtype] = two_one
        sk.lincomb_(
            [p.grad for p in pert_ps],
            ([p.grad for p in pert_ps], [delta[pos[id(p)]] for p in pert_ps]),
            two_one,
            backend=self.backend,
        )
        if plain:
            torch._foreach_mul_(plain, 2.0)
        del delta, g_d
        norm = self._grad_norm()
        ok = self._and_finite(ok, norm)
        self._check_raise(ok, "the evaluation at w + delta (gradient g_delta)", noisy)

        # e = rho u / (||u|| + 1e-12) from w: p = backup + scale * u (one fused pass)
        pert_groups = self._perturbed_groups()
        rho = self._rho_vector(pert_groups)
        scale = (rho * ascent_inv(norm).to(rho.dtype)).to(cdtype)
        coefs = torch.stack([torch.ones_like(scale), scale])
        targets = [p for _, gps in pert_groups for p in gps]
        sk.lincomb_(
            targets,
            ([self.state[p]["backup"] for p in targets], [p.grad for p in targets]),
            coefs,
            backend=self.backend,
        )

        # w + e: g1 (the same parameter set as g_d)
        self._drop_grads()
        l1 = self._call_closure(
            closure, perturbed=True, need_loss=False, what="w + e", restore=noisy
        )
        _, g1 = self._grads_at_perturbed(ps)  # one without a gradient there: not stepped
        fin, n1 = self._finite_and_norm(g1)
        ok = ok * fin * self._ok_from(l1)
        self._check_raise(ok, "the evaluation at w + e (gradient g1)", noisy)
        ok = self._base_step(ok, noisy, norm=n1)  # clipping reuses ||g1||
        self._rewind_unless(ok, offset0)
        return l_d

    def _rewind_unless(self, ok: torch.Tensor, offset0: torch.Tensor | None) -> None:
        """A skipped step draws nothing: the counter-based offset goes back (device op)."""
        if offset0 is not None:
            self._noise_offset.copy_(torch.where(ok > 0, self._noise_offset, offset0))
