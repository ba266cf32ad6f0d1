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
    check_range,
    finite01,
)

__all__ = ["MSAM", "AdamWMSAM"]

_ON_NONFINITE = ("skip", "raise")
#: per-parameter key of the move-down coefficient ``s`` (``w = w~ + s * direction``)
SCALE_KEY = "ascent_scale"
#: the algorithm's scalars in ``state_dict()["param_groups"][0]`` (as the SAM family's)
FORMAT_KEY = "sam_state"
FORMAT_VERSION = 1


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(p, DTensor)


def _scale_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class _MomentumSAM(Optimizer):
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

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        try:
            self._check_hparams(group)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: param_groups[{index}]: {e}") from None
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

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was not finite (host read)."""
        return int(self._counters[1].item())

    @property
    def steps_taken(self) -> int:
        """Steps applied (host read)."""
        return int(self._counters[0].item())

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
        active = self._active()
        ps = [p for _, group_ps in active for p in group_ps]
        if not ps:
            return loss
        for p in ps:
            if p not in self.state or SCALE_KEY not in self.state[p]:
                self._init_state(p)
        device = ps[0].device
        if self._counters.device != device:  # the model moved after construction
            self._counters = self._counters.to(device)
        cdt = self._coef_dtype(ps)
        consts = self._constants(active, cdt, device)
        grads = [p.grad for p in ps]
        dirs = [self.state[p][self._dir_key] for p in ps]
        scales = [self.state[p][SCALE_KEY] for p in ps]

        g_norm = sk.grad_norm(grads, backend=self.backend)
        ok = finite01(g_norm)
        if self.on_nonfinite == "raise" and not bool(ok.item()):
            raise NonFiniteError(
                f"{type(self).__name__}: non-finite gradient; weights and optimizer state are "
                "unchanged"
            )
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
        self._counters.add_(torch.stack([ok, 1.0 - ok]))
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

    # ------------------------------------------------------------------ copies, checkpoints
    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults/state/param_groups: a copy would lose the counters
        if self._saved is not None:
            raise RuntimeError(f"cannot copy or pickle {type(self).__name__} inside unperturbed()")
        st = super().__getstate__()
        st.update(
            on_nonfinite=self.on_nonfinite,
            backend=self.backend,
            max_grad_norm=self.max_grad_norm,
            _counters=self._counters,
        )
        return st

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("on_nonfinite", "skip")
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("max_grad_norm", None)
        if "_counters" not in self.__dict__:
            self._counters = torch.zeros(2, dtype=torch.float32)
        self._saved = None
        self._const_cache = None
        self._ready = True

    def state_dict(self) -> dict[str, Any]:
        """torch's format: ``state[i]`` holds parameter ``i``'s direction buffer(s), ``step``
        and ``ascent_scale`` (the move-down coefficient ``s``); ``param_groups[0]["sam_state"]``
        the class name and the step counters. Inside :meth:`unperturbed` ``ascent_scale`` is
        reported as 0 (the weights are ``w`` there)."""
        sd = super().state_dict()
        if self._saved is not None:
            sd["state"] = {
                k: ({**v, SCALE_KEY: torch.zeros_like(v[SCALE_KEY])} if SCALE_KEY in v else v)
                for k, v in sd["state"].items()
            }
        if sd["param_groups"]:
            sd["param_groups"][0][FORMAT_KEY] = {
                "class": type(self).__name__,
                "version": FORMAT_VERSION,
                "counters": self._counters.clone(),
            }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this class (or a plain torch dict with the same buffers).

        Checked first (a refused dict changes nothing): group and parameter counts, the class,
        buffer shapes, hyper-parameters. ``step`` and ``ascent_scale`` keep float32
        (float64 for float64 parameters) and move to the parameter's device.
        """
        if self._saved is not None:
            raise RuntimeError(f"{type(self).__name__}.load_state_dict() inside unperturbed()")
        me = type(self).__name__
        groups = [dict(g) for g in state_dict["param_groups"]]
        meta = groups[0].pop(FORMAT_KEY, None) if groups else None
        for g in groups[1:]:
            g.pop(FORMAT_KEY, None)
        if meta is not None and meta.get("class") != me:
            raise ValueError(f"a {meta.get('class')} state_dict cannot be loaded into {me}")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{me}: the state_dict has {len(groups)} parameter groups, the optimizer "
                f"{len(self.param_groups)}"
            )
        pairs: list[tuple[Any, torch.Tensor]] = []
        for i, (sg, g) in enumerate(zip(groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"{me}: param_groups[{i}] has {len(sg['params'])} parameters in the "
                    f"state_dict, {len(g['params'])} in the optimizer"
                )
            probe = {**g, **{k: v for k, v in sg.items() if k != "params"}}
            self._validate_group(probe, i)
            pairs.extend(zip(sg["params"], g["params"]))
        saved_state = state_dict["state"]
        for idx, p in pairs:
            st = saved_state.get(idx)
            if not st:
                continue
            for k in self._buffer_keys:
                if k in st and tuple(st[k].shape) != tuple(p.shape):
                    raise ValueError(
                        f"{me}: state of parameter {idx} has {k} of shape "
                        f"{tuple(st[k].shape)}, the parameter {tuple(p.shape)}"
                    )
        scalars = {
            idx: {k: saved_state[idx][k] for k in ("step", SCALE_KEY) if k in saved_state[idx]}
            for idx, _ in pairs
            if saved_state.get(idx)
        }
        super().load_state_dict({"state": saved_state, "param_groups": groups})
        for idx, p in pairs:
            st = self.state.get(p)
            if not st:
                continue
            saved = scalars.get(idx, {})
            dtypes = {"step": _scale_dtype(p), SCALE_KEY: _scale_dtype(p)}
            for k, dt in dtypes.items():
                v = saved.get(k)
                st[k] = (
                    torch.as_tensor(v).to(device=p.device, dtype=dt).clone()
                    if v is not None
                    else torch.zeros((), dtype=dt, device=p.device)
                )
            self._init_state(p)  # buffers a plain torch dict lacks start at zero
        counters = (meta or {}).get("counters")
        if counters is not None:
            self._counters = torch.as_tensor(counters).to(self._counters).clone()
        self._const_cache = None


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
