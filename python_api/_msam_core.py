"""The machinery shared by Momentum-SAM's two forms (``python_api.msam``): parameter groups and
their checks, the per-step plan of active parameters, the step (finite flag, move up, the form's
update, move down), ``unperturbed()`` and ``finalize()``. Copies and checkpoints are in
``python_api._msam_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim import Optimizer

import sam_kernels as sk
from python_api._base import (
    NonFiniteError,
    ascent_inv,
    check_max_grad_norm,
    check_nonneg,
)
from python_api._base_step import StepCounters
from python_api._msam_checkpoint import SCALE_KEY, MomentumSAMCheckpoint, _scale_dtype

_ON_NONFINITE = ("skip", "raise")


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(p, DTensor)


class MomentumSAMCore(StepCounters, MomentumSAMCheckpoint, Optimizer):
    """Shared machinery of the two forms: validation, state, the step frame, ``unperturbed``."""

    #: the per-parameter direction the perturbation follows (the momentum / first moment)
    _dir_key: str = ""
    #: every per-parameter state tensor shaped like its parameter
    _buffer_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        on_nonfinite: str,
        backend: str | None,
        max_grad_norm: float | None = None,
    ) -> None:
        check_max_grad_norm(max_grad_norm)
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        sk.requested_backend(backend)  # validates the name early
        self._ready = False
        super().__init__(params, defaults)
        self._ready = True
        for i, group in enumerate(self.param_groups):
            self._validate_group(group, i)
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        device = next(
            (p.device for g in self.param_groups for p in g["params"]), torch.device("cpu")
        )
        # device counters: steps applied, steps skipped (no host read to update them)
        self._counters = torch.zeros(2, dtype=torch.float32, device=device)
        # inside ``unperturbed()``: the saved moved-down weights (restored bit for bit on exit)
        self._saved: list[torch.Tensor] | None = None
        self._const_cache: tuple[tuple, torch.Tensor] | None = None

    # ------------------------------------------------------------------ configuration
    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_nonneg("rho", group["rho"])

    def _check_group_hparams(self, group: dict[str, Any], index: int) -> None:
        """:meth:`_check_hparams`, its error naming the class and the group."""
        try:
            self._check_hparams(group)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{type(self).__name__}: param_groups[{index}]: {e}") from None

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        self._check_group_hparams(group, index)
        for j, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise TypeError(
                    f"{type(self).__name__}: param_groups[{index}]['params'][{j}] has dtype "
                    f"{p.dtype}; parameters must be floating point"
                )
            if _is_dtensor(p):
                raise TypeError(
                    f"{type(self).__name__}: param_groups[{index}]['params'][{j}] is a DTensor "
                    "(FSDP2 shard): the momentum norm ||v|| is a sum over every element, of which "
                    "a shard holds only a part (it would need its own all-reduce); not supported"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self._ready:
            try:
                self._validate_group(self.param_groups[-1], len(self.param_groups) - 1)
            except (ValueError, TypeError):
                self.param_groups.pop()
                raise
            self._const_cache = None

    # ------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor) -> None:
        st = self.state[p]
        for k in self._buffer_keys:
            if k not in st:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "step" not in st:
            # fp32 as torch's capturable AdamW; fp64 for fp64 parameters (the bias corrections
            # 1 - beta^t lose digits to cancellation in fp32)
            st["step"] = torch.zeros((), dtype=_scale_dtype(p), device=p.device)
        if SCALE_KEY not in st:
            st[SCALE_KEY] = torch.zeros((), dtype=_scale_dtype(p), device=p.device)

    def _active(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        """Per group, its parameters with a gradient (sparse ones refused, one device)."""
        out = []
        device = None
        for i, group in enumerate(self.param_groups):
            ps = []
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)})"
                if p.grad.is_sparse:
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse gradients: {where}"
                    )
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise ValueError(
                        f"{type(self).__name__}: {where} is on {p.device}, other parameters on "
                        f"{device}; one optimizer takes parameters of one device"
                    )
                ps.append(p)
            out.append((group, ps))
        return out

    def _coef_dtype(self, ps: Sequence[torch.Tensor]) -> torch.dtype:
        # fp64 coefficients for fp64 parameters, so fp64 runs are exact to fp64 rounding
        return torch.float64 if any(p.dtype == torch.float64 for p in ps) else torch.float32

    def _constants(
        self, active: list[tuple[dict[str, Any], list[torch.Tensor]]], dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:  # fmt: skip
        """Per-tensor rows ``[1, rho, weight_decay, lr * weight_decay]`` as one device tensor,
        rebuilt (one host-to-device copy, no read) only when a group's values change."""
        key = (dtype, device) + tuple(
            (id(g), len(ps), float(g["rho"]), float(g["weight_decay"]), float(g["lr"]))
            for g, ps in active
        )
        if self._const_cache is None or self._const_cache[0] != key:
            rows: list[list[float]] = [[], [], [], []]
            for g, ps in active:
                rho, wd, lr = float(g["rho"]), float(g["weight_decay"]), float(g["lr"])
                for _ in ps:
                    rows[0].append(1.0)
                    rows[1].append(rho)
                    rows[2].append(wd)
                    rows[3].append(lr * wd)
            self._const_cache = (key, torch.tensor(rows, dtype=dtype, device=device))
        return self._const_cache[1]

    # ------------------------------------------------------------------ the step
    def _update(
        self,
        active: list[tuple[dict[str, Any], list[torch.Tensor]]],
        grads: list[torch.Tensor],
        c_up: torch.Tensor,
        consts: torch.Tensor,
        ok: torch.Tensor,
        clip: torch.Tensor | None,
    ) -> None:
        """The SGD/AdamW update of every group; ``clip``: the 0-d clip coefficient (dtype of
        ``consts``) the gradient is multiplied by, or None (no clipping)."""
        raise NotImplementedError

    def _down_decay(self, consts: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Factor on ``w`` in the move-down (1, or AdamW's decoupled decay)."""
        return consts[0]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: move up to ``w``, the SGD/AdamW update, move down along the new direction.

        ``closure`` (optional, as torch's optimizers): runs forward and backward at the current
        (moved-down) weights; its return value is returned. Parameters whose ``.grad`` is None
        are left alone. No host read (with ``on_nonfinite="raise"``: one, the finite flag).
        """
        if self._saved is not None:
            raise RuntimeError(
                f"{type(self).__name__}.step() inside unperturbed(): the weights are w there, "
                "not the moved-down point the step starts from; step after the with-block"
            )
        loss = None
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be callable, got {type(closure).__name__}")
            with torch.enable_grad():
                loss = closure()
        # hyper-parameters written into a group since (by hand, a scheduler, the closure):
        # checked before anything changes (a NaN rho wrote NaN weights, a None momentum failed
        # after the move up)
        for i, group in enumerate(self.param_groups):
            self._check_group_hparams(group, i)
        active = self._active()
        ps = [p for _, group_ps in active for p in group_ps]
        if not ps:
            return loss
        grads = [p.grad for p in ps]
        g_norm = sk.grad_norm(grads, backend=self.backend)
        # the loss the closure returned is part of the check (the spec's shared rule: a
        # non-finite loss skips the step as a non-finite gradient does)
        checked = [g_norm]
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
            checked.append(loss.detach().to(g_norm.device))
        ok = sk.finite_and(None, checked, backend=self.backend)
        if self.on_nonfinite == "raise" and not bool(ok.item()):
            raise NonFiniteError(
                f"{type(self).__name__}: non-finite gradient or loss; weights and optimizer "
                "state are unchanged"
            )
        for p in ps:  # (after the raise: a refused first step creates no state)
            if p not in self.state or SCALE_KEY not in self.state[p]:
                self._init_state(p)
        device = ps[0].device
        if self._counters.device != device:  # the model moved after construction
            self._counters = self._counters.to(device)
        cdt = self._coef_dtype(ps)
        consts = self._constants(active, cdt, device)
        dirs = [self.state[p][self._dir_key] for p in ps]
        scales = [self.state[p][SCALE_KEY] for p in ps]
        ones = consts[0]
        c_old = torch.stack(scales).to(cdt)
        c_up = c_old * ok.to(cdt)
        # move up to w (a skipped step adds 0 * v: the weights keep their bits)
        sk.lincomb_(ps, (ps, dirs), torch.stack([ones, c_up]), backend=self.backend)
        clip = None
        if self.max_grad_norm is not None:
            # torch's clip_grad_norm_ on g: min(1, max / (||g|| + 1e-6)), from the norm above;
            # a non-finite norm skips the step (ok = 0), its coefficient is made harmless
            clip = (self.max_grad_norm / (g_norm + 1e-6)).clamp(max=1.0)
            clip = torch.nan_to_num(clip, nan=0.0, posinf=0.0, neginf=0.0).to(cdt)
        self._update(active, grads, c_up, consts, ok, clip)
        # s = rho / (||v|| + 1e-12) over every parameter with a gradient, all groups together
        c_raw = consts[1] * ascent_inv(sk.grad_norm(dirs, backend=self.backend)).to(cdt)
        c_new = c_raw * ok.to(cdt)
        sk.lincomb_(
            ps, (ps, dirs), torch.stack([self._down_decay(consts, ok), -c_new]),
            backend=self.backend,
        )  # fmt: skip
        torch._foreach_copy_(scales, list(torch.where(ok > 0, c_raw, c_old).unbind(0)))
        self._add_step(ok)
        return loss

    # ------------------------------------------------------------------ w, between steps
    def _perturbed(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Parameters with a direction (stepped at least once), their directions and scales."""
        ps, dirs, scales = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and SCALE_KEY in st and self._dir_key in st:
                    ps.append(p)
                    dirs.append(st[self._dir_key])
                    scales.append(st[SCALE_KEY])
        return ps, dirs, scales

    def _move_up(self, ps: list[torch.Tensor], dirs: list[torch.Tensor], scales) -> None:
        if not ps:
            return
        c = torch.stack(scales).to(self._coef_dtype(ps))
        sk.lincomb_(ps, (ps, dirs), torch.stack([torch.ones_like(c), c]), backend=self.backend)

    @contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Within the block the parameters hold ``w = w~ + s * v`` (the reference's
        ``move_back_from_momentumAscent``); on exit they hold the moved-down point again,
        restored bit for bit from a copy taken on entry (one parameter-sized transient buffer;
        whatever the block wrote to the parameters is overwritten). For evaluation and for
        exporting the model: ``state_dict()`` called inside reports ``ascent_scale = 0``, so a
        checkpoint of the model and the optimizer taken inside resumes consistently from ``w``.
        ``step()`` and ``finalize()`` are refused inside.
        """
        if self._saved is not None:
            raise RuntimeError(f"{type(self).__name__}.unperturbed() is already active")
        with torch.no_grad():
            ps, dirs, scales = self._perturbed()
            saved = [torch.empty_like(p, memory_format=torch.preserve_format) for p in ps]
            sk.restore_(saved, ps, backend=self.backend)  # saved <- w~ (a copy)
            self._move_up(ps, dirs, scales)
        self._saved = saved
        try:
            yield
        finally:
            with torch.no_grad():
                sk.restore_(ps, saved, backend=self.backend)
            self._saved = None

    @torch.no_grad()
    def finalize(self) -> None:
        """Leave the parameters at ``w = w~ + s * v`` for good (end of training, export).

        Sets every stored scale ``s`` to 0, so the optimizer stays consistent: a later ``step()``
        starts from these weights with no move back (training may continue; its next gradient is
        taken at ``w``). No host read.
        """
        if self._saved is not None:
            raise RuntimeError(f"{type(self).__name__}.finalize() inside unperturbed()")
        ps, dirs, scales = self._perturbed()
        if not ps:
            return
        self._move_up(ps, dirs, scales)
        torch._foreach_zero_(scales)
