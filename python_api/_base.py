"""Machinery shared by every optimizer of the SAM family.

A SAM-family optimizer wraps a base optimizer (a class, as in davda54/sam, or an instance) and
shares its ``param_groups``, so LR schedulers attach to the wrapper. Every algorithm ends with
exactly one base step at the *unperturbed* weights, which are restored from an exact backup.

Base step. When the base optimizer is ``torch.optim.SGD`` or ``torch.optim.AdamW`` the wrapper
performs the base step itself with the fused ops of :mod:`sam_kernels` (restore fused into the
step, the combined gradient formed inside the pass, the step gated on the device by a finite
flag: no host read). Its state lives in the base optimizer's ``state`` under torch's own keys
(``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``step``), so checkpoints
move between the wrapper and torch. Any other base optimizer gets the restored weights and the
gradient in ``p.grad`` and its own ``step()``, called after one host read of the finite flag.

Non-finite values (the spec's shared rules): a non-finite loss or gradient at any evaluation
makes the step change nothing and increments :attr:`skipped_steps`; ``on_nonfinite="raise"``
reads the flag after each evaluation and raises :class:`NonFiniteError` (weights restored first).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api import _conventions, _state
from python_api._hooks import HookCalls
from python_api._hooks import _all_reduce_min as _all_reduce_min  # re-exported
from python_api._hooks import _distributed as _distributed  # re-exported
from python_api.amp import with_scaler_kwarg
from python_api.batchnorm import BNStatsKeeper, preserve_bn_stats

Closure = Callable[[], Any]
# base optimizer -> the wrapper that owns its param_groups (one wrapper per base instance)
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ON_NONFINITE = ("skip", "raise")
_EPS = 1e-12
#: torch releases whose dynamo cannot trace the step's bookkeeping (see _guard_step)
_DYNAMO_REFUSES_STEP_STATE = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13)
#: elements combined at once when the norm of a LinComb gradient is taken for clipping
#: (step-local scratch of at most this size, or of one tensor when that is larger)
CLIP_CHUNK = 1 << 24


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
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


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


def _fused_kind(base: Optimizer) -> str | None:
    """'sgd' / 'adamw' when the wrapper can run the base step itself, else None.

    ``foreach=False`` or ``fused=False`` given for the base (torch's single-tensor or unfused
    implementation asked for explicitly) is honoured: torch's own ``step()`` runs (see
    :class:`SAMFamily`). ``None``/``True`` and any ``capturable`` keep the fused path.
    """
    if type(base) is torch.optim.SGD:
        kind = "sgd"
    elif type(base) is torch.optim.AdamW:
        kind = "adamw"
    else:
        return None
    for g in base.param_groups:
        if g.get("differentiable", False):
            return None
        if g.get("foreach") is False or g.get("fused") is False:
            return None
    return kind


class SAMFamily(HookCalls, Optimizer):
    """Base class: wrapping, closures, BN handling, the fused base step and non-finite skips.

    Subclasses implement :meth:`step` with the helpers below.

    torch's implementation flags given for a ``torch.optim.SGD``/``AdamW`` base (``foreach=``,
    ``fused=``, ``capturable=``, as keyword arguments or in its groups): ``None`` or ``True``
    keep the wrapper's own fused step (multi-tensor, restore fused in, no host read: it is what
    ``foreach``/``fused``/``capturable=True`` ask for); ``foreach=False`` or ``fused=False``
    is honoured by stepping the base with torch's own ``step()`` and those flags (the weights
    are restored first; one host read of the finite flag per step); ``capturable=False`` keeps
    the fused path (same values; its step counters stay on the parameters' device). Other base
    optimizers always run their own ``step()`` with their own flags.
    """

    #: whether a step may read values on the host (AE-SAM, LookSAM, SS-SAM: the decision)
    host_decisions = False
    #: per-parameter state entries valid only inside a step (left out of ``state_dict``)
    _transient_state: tuple[str, ...] = ("backup",)
    #: the algorithm's per-parameter state kept across steps (saved beside the base's state)
    _param_state_keys: tuple[str, ...] = ()
    #: keys of :meth:`_extra_state` a checkpoint may lack or hold extra (backend-dependent)
    _optional_extra_state: tuple[str, ...] = ()
    #: keys of :meth:`_extra_state` that are configuration (seeds): kept, not reset, when a
    #: checkpoint without the algorithm's state (a plain torch one) is loaded
    _config_extra_state: tuple[str, ...] = ()
    #: per-replica DDP mode (m-sharpness, :mod:`python_api.distributed`) is defined for this
    #: algorithm: its base-step gradient comes only from evaluations after the first one
    per_replica_safe = False
    #: defined on FSDP2 local shards (:mod:`python_api.sharded`): every cross-tensor reduction
    #: of the step goes through :meth:`_grad_norm` (all-reduced there) and nothing is drawn per
    #: element; otherwise ``_sharded_refusal`` says why the sharded helper refuses the class
    sharded_safe = False
    _sharded_refusal = "it is not defined on sharded parameters"
    #: torch's GradScaler protocol: ``scaler.step(opt)`` hands ``grad_scale`` / ``found_inf`` to
    #: the step instead of unscaling and skipping itself; the step refuses that call with the
    #: supported form (``opt.step(closure, scaler=scaler)``, :mod:`python_api.amp`), so a scaled
    #: second pass is never applied unscaled by mistake
    _step_supports_amp_scaling = True
    # per-step hooks (``_amp``, ``_dist``) set by :mod:`python_api.amp`,
    # :mod:`python_api.distributed` and :mod:`python_api.sharded`: see :mod:`python_api._hooks`
    # (the protocol, and the HookCalls methods through which the core calls them)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            # every algorithm's step accepts ``scaler=`` (GradScaler), see python_api.amp
            cls.step = with_scaler_kwarg(_guard_step(cls.__dict__["step"]))
            # torch.distributed.checkpoint's state initialisation (step(None), lr 0)
            cls.step = _state.recognise_init_step(cls.step)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        own_defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        process_group: Any = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_max_grad_norm(max_grad_norm)
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        sk.requested_backend(backend)  # validates the name early
        self._own_keys = tuple(own_defaults)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is an instance; keyword arguments {sorted(base_kwargs)} "
                    "would be ignored (give them to the base optimizer instead)"
                )
            base = base_optimizer
            other = _WRAPPERS.get(base)
            if other is not None and other() is not None:
                raise ValueError(
                    f"this {type(base).__name__} instance is already wrapped by a "
                    f"{type(other()).__name__}; two wrappers would share its param_groups (the "
                    "second one's rho and other settings would be silently ignored). Build a "
                    "separate base optimizer for each wrapper"
                )
            if params is not None:
                given = {id(p) for p in _flatten_params(params)}
                have = {id(p) for g in base.param_groups for p in g["params"]}
                if given != have:
                    raise ValueError(
                        "params differ from the parameters of the base_optimizer instance; "
                        "pass the same parameters (or params=None)"
                    )
            super().__init__(base.param_groups, own_defaults)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise TypeError("params is required when base_optimizer is a class")
            super().__init__(params, own_defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass or instance, got "
                f"{base_optimizer!r}"
            )
        self.base_optimizer = base
        _WRAPPERS[base] = weakref.ref(self)
        self.param_groups = base.param_groups
        self.defaults.update(base.defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.model = model
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        self.process_group = process_group
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._bn = BNStatsKeeper(model) if model is not None else None
        self._fused = _fused_kind(base)
        self._device = self._find_device()
        # device counters: steps taken (not skipped) and steps skipped; no host read to update
        self._counters = torch.zeros(2, dtype=torch.float32, device=self._device)
        self._rho_cache: tuple[tuple, torch.Tensor] | None = None
        # per-step caches (see _reset_caches): _grad_marks, the gradient tensors the last step
        # left behind with their version counters; _live, the parameters perturbed in the
        # current step (their backups hold w: restored if the step raises before its base step
        # is launched); _param_sig, the parameters' (dtype, device); _plan / _mode_plan, the
        # cached base-step and norm/ascent plans
        self._grad_marks: dict[torch.Tensor, tuple[weakref.ref, int]] = {}
        self._live: list[torch.Tensor] = []
        self._param_sig: list[tuple[torch.dtype, torch.device]] = []
        self._plan: _BasePlan | None = None
        self._mode_plan: _ModePlan | None = None

    # ----------------------------------------------------------------- configuration
    def _check_group(self, group: dict) -> None:
        check_nonneg("rho", group["rho"])

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # inside __init__
            super().add_param_group(param_group)
            return
        # the group list is shared: let the base add it (its defaults), with ours filled in
        for k in self._own_keys:
            param_group.setdefault(k, self.defaults[k])
        self.base_optimizer.add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        self._rho_cache = None

    def _find_device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

    def _follow_device(self) -> None:
        """Move the optimizer's own device tensors if the parameters moved since construction.

        Frameworks such as HF accelerate build the optimizer on CPU parameters and move the model
        afterwards. Counters, statistics, seeds and caches held as tensor attributes (or in
        tuples/lists of them) follow the parameters; one attribute compare per call otherwise.
        """
        self._follow_params()
        new = self._find_device()
        old = self._device
        if new == old:
            return

        def move(v):
            if isinstance(v, torch.Tensor) and v.device == old:
                return v.to(new)
            if isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v):
                return type(v)(move(x) for x in v)
            return v

        for k, v in list(vars(self).items()):
            if k not in ("state", "param_groups", "defaults", "base_optimizer", "model"):
                setattr(self, k, move(v))
        self._device = new

    def _follow_params(self) -> None:
        """Cast and move per-parameter state if parameters were re-typed or moved.

        ``model.to(torch.bfloat16)`` or ``.cuda()`` after construction changes the parameters in
        place; state follows them as torch's ``load_state_dict`` casts it: every floating-point
        tensor shaped like its parameter (momentum, Adam moments, LookSAM's ``gv``, ...) takes the
        parameter's dtype and device; step counters keep their dtype and move. One
        (dtype, device) compare per parameter per step otherwise.
        """
        sig = [(p.dtype, p.device) for g in self.param_groups for p in g["params"]]
        if sig == self._param_sig:
            return
        self._param_sig = sig
        self._rho_cache = None
        self._plan = None
        self._mode_plan = None
        for g in self.param_groups:
            for p in g["params"]:
                for states in (self.state, self.base_optimizer.state):
                    st = states.get(p)
                    if st:
                        for k, v in st.items():
                            if isinstance(v, torch.Tensor):
                                st[k] = _follow(v, p, k)

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because a loss or gradient was not finite (host read)."""
        return int(self._counters[1].item())

    @property
    def steps_taken(self) -> int:
        """Number of steps applied (host read)."""
        return int(self._counters[0].item())

    # ----------------------------------------------------------------- closures
    def _require_closure(self, closure: Closure | None) -> Closure:
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step requires a closure that runs forward and backward "
                "at the current weights and returns the loss"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        return closure

    def _call_closure(
        self,
        closure: Closure,
        *,
        perturbed: bool,
        need_loss: bool,
        what: str,
        restore: Sequence[torch.Tensor] | None = None,
    ):
        """Run ``closure`` with grad enabled (BN stats preserved at perturbed points).

        ``restore``: the perturbed parameters; if the closure raises, or returns no loss where
        one is needed, they are restored from their backups before the error propagates (a
        refused step leaves the weights exactly as they were).
        """
        if restore:
            try:
                return self._call_closure(
                    closure, perturbed=perturbed, need_loss=need_loss, what=what
                )
            except BaseException:
                self._restore(restore)
                raise
        with torch.enable_grad(), preserve_bn_stats(self._bn if perturbed else None):
            with self._eval_context(what):
                loss = closure()
        self._after_eval()  # GradScaler: this evaluation's gradients, unscaled in place
        if loss is None:
            if need_loss:
                raise TypeError(
                    f"{type(self).__name__} needs the loss value at {what}, but the closure "
                    "returned None; return the loss tensor from the closure"
                )
            return None
        if not isinstance(loss, torch.Tensor):
            if isinstance(loss, (int, float)):
                loss = torch.tensor(float(loss), device=self._device)
            else:
                raise TypeError(f"the closure returned {type(loss).__name__}, expected a tensor")
        elif loss.numel() != 1:
            if need_loss:
                raise ValueError(
                    f"the closure returned a loss of shape {tuple(loss.shape)} at {what}; "
                    "expected a scalar"
                )
        return loss.detach()

    def _params_with_grad(self) -> list[torch.Tensor]:
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                    out.append(p)
        return out

    def _initial_eval(self, closure: Closure, loss: torch.Tensor | None, need_loss: bool):
        """The closure contract: fresh gradients present are g0; else evaluate at w.

        Stale gradients (left by the previous step, or zeroed in place since) are dropped first
        (:meth:`_fresh_grads`), so they never become g0.

        Returns ``(L0 or None, evaluated)``. With ``need_loss`` and gradients present but no
        ``loss=`` given, the closure is evaluated once more at ``w``.
        """
        self._follow_device()
        given = self._as_loss(loss) if loss is not None else None  # checked in every case
        have_grads = self._fresh_grads()
        if have_grads and (given is not None or not need_loss):
            self._after_eval()  # the user's own (scaled) first backward
            return given, False
        if have_grads:
            self.zero_grad(set_to_none=True)
        # a repeated evaluation at w (the user's forward already updated the BN statistics)
        # leaves BN buffers as they are, like the evaluations at perturbed points
        l0 = self._call_closure(closure, perturbed=have_grads, need_loss=need_loss, what="w")
        return l0, True

    # Stale gradients (the spec's closure contract): the gradients present count as g0 only if a
    # backward pass produced them after the previous step ended. At the end of every step the
    # gradient tensors it leaves are remembered with their version counters; a gradient that is
    # still the same tensor at most one in-place write later (``zero_grad(set_to_none=False)``'s
    # ``zero_()``) was produced by no backward since: dropped. A backward writes either a new
    # tensor (after ``set_to_none``) or accumulates in place after such a zeroing (two writes).
    # No host read; one attribute read per parameter per step. Kept out of dynamo's graphs
    # (a traced ``_version`` would be a constant of the trace).
    def _abort_step(self) -> None:
        """Undo a step that raised: restore the weights it perturbed (idempotent)."""
        live, self._live = self._live, []
        if live:
            self._restore(live)

    @torch._dynamo.disable
    def _mark_grads(self) -> None:
        """Remember the gradients this step leaves behind (they are stale for the next step)."""
        marks: dict[torch.Tensor, tuple[weakref.ref, int]] = {}
        for g in self.param_groups:
            for p in g["params"]:
                gr = p.grad
                if gr is not None:
                    marks[p] = (weakref.ref(gr), gr._version)
        self._grad_marks = marks

    @torch._dynamo.disable
    def _fresh_grads(self) -> bool:
        """Drop stale gradients (``p.grad = None``); True if any fresh gradient remains."""
        marks = self._grad_marks
        fresh = False
        for g in self.param_groups:
            for p in g["params"]:
                gr = p.grad
                if gr is None:
                    continue
                m = marks.get(p)
                if m is not None and m[0]() is gr and gr._version - m[1] <= 1:
                    p.grad = None
                else:
                    fresh = True
        return fresh

    def _as_loss(self, loss: Any) -> torch.Tensor:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
            return loss.detach().reshape(())
        if isinstance(loss, (int, float)):
            return torch.tensor(float(loss), device=self._device)
        raise TypeError(f"loss must be a tensor or a number, got {type(loss).__name__}")

    def _reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Average a loss that weights gradients over the ranks (one scalar all-reduce)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            loss = loss.detach().float().clone()
            dist.all_reduce(loss, group=self.process_group)
            loss /= dist.get_world_size(self.process_group)
        return loss

    # ----------------------------------------------------------------- non-finite values
    def _ok_from(self, *values: torch.Tensor | None) -> torch.Tensor:
        """1.0 where every given 0-d value is finite, else 0.0 (device tensor)."""
        ok = None
        for v in values:
            if v is not None:
                f = finite01(v.reshape(()).to(self._device))
                ok = f if ok is None else ok * f
        return ok if ok is not None else torch.ones((), dtype=torch.float32, device=self._device)

    def _check_raise(self, ok: torch.Tensor, what: str, backups_of: Sequence | None = None):
        """``on_nonfinite="raise"``: one host read; restore weights, then raise."""
        if self.on_nonfinite != "raise" or self._nonfinite_is_routine:
            # under a GradScaler an overflow is routine: skip and let the scaler back off
            return
        if not bool(ok.item()):
            if backups_of:
                self._restore(backups_of)
            raise NonFiniteError(
                f"{type(self).__name__}: non-finite loss or gradient at {what}; weights and "
                "optimizer state are unchanged"
            )

    # ----------------------------------------------------------------- perturbation
    def _perturbed_groups(self) -> list[tuple[dict, list[torch.Tensor]]]:
        out = []
        for g in self.param_groups:
            if g.get("rho", 0.0) == 0.0 or g.get("sam", True) is False:
                continue
            ps = [p for p in g["params"] if p.grad is not None]
            if ps:
                out.append((g, ps))
        return out

    def _buffers(self, params: Sequence[torch.Tensor], key: str) -> list[torch.Tensor]:
        """Per-parameter scratch buffers ``state[p][key]`` shaped like ``p`` (allocated once).

        Add ``key`` to :attr:`_transient_state` when the buffer is valid only inside a step.
        A buffer needed only inside a step is better a step-local :meth:`_scratch` (not kept
        between steps), or a gradient kept with :meth:`_take_grads` (no buffer at all).
        """
        out = []
        for p in params:
            st = self.state[p]
            b = st.get(key)
            if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                b = torch.empty_like(p, memory_format=torch.preserve_format)
                st[key] = b
            out.append(b)
        return out

    @staticmethod
    def _scratch(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Step-local buffers shaped like ``params`` (uninitialised), held only by the caller's
        locals: freed when the step returns or raises, never in ``state`` or a cached plan."""
        return [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]

    @staticmethod
    def _take_grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The current gradients of ``params``, kept for the rest of the step without a copy.

        A step that needs a gradient after the next evaluation (CR-SAM's ``g0`` and ``g+``,
        the universal class's ``g0``) keeps the tensor itself: the next evaluation starts from
        ``p.grad = None`` (``zero_grad(set_to_none=True)``), so autograd writes a new tensor and
        the kept one is never written again; the step only reads it. A gradient that is a view
        (DDP's ``gradient_as_bucket_view``: the next backward writes the same bucket) is copied
        into a step-local buffer instead.
        """
        out = []
        for p in params:
            g = p.grad
            if g._base is not None:
                g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
            out.append(g)
        return out

    def _collect_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients of ``params`` after an extra evaluation of the closure.

        ``params`` are the parameters that had a gradient at ``w`` (this step's set). One that
        got none at the new point gets zeros (the loss does not depend on it there); a parameter
        outside the set that got one has it dropped (``p.grad = None``), so every later pass and
        the base step see exactly the set.
        """
        keep = {id(p) for p in params}
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and id(p) not in keep:
                    p.grad = None
        out = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(p.grad)
        return out

    def _backups(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in params:
            st = self.state[p]
            b = st.get("backup")
            if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                b = torch.empty_like(p, memory_format=torch.preserve_format)
                st["backup"] = b
            out.append(b)
        return out

    def _rho_vector(self, groups: list[tuple[dict, list[torch.Tensor]]]) -> torch.Tensor:
        """Per-tensor rho as a device tensor, rebuilt only when a group's rho changes."""
        key = tuple((id(g), float(g["rho"]), len(ps)) for g, ps in groups)
        if self._rho_cache is None or self._rho_cache[0] != key:
            vals = [float(g["rho"]) for g, ps in groups for _ in ps]
            # fp64 scales for fp64 parameters, so fp64 runs are exact to fp64 rounding
            f64 = any(p.dtype == torch.float64 for _, ps in groups for p in ps)
            dtype = torch.float64 if f64 else torch.float32
            self._rho_cache = (key, torch.tensor(vals, dtype=dtype, device=self._device))
        return self._rho_cache[1]

    def _modes(self) -> _ModePlan:
        """Parameters with a gradient by (adaptive, eta), for the norm and the ascent (cached).

        Keyed on the groups, the gradients present and each group's rho/sam/adaptive/eta, so
        a rho schedule or a parameter losing its gradient rebuilds it; a step only gathers the
        gradients. One launch per (adaptive, eta) setting over all groups: normally one.
        """
        groups = self.param_groups
        key = (
            tuple(map(id, groups)),
            tuple(p.grad is not None for g in groups for p in g["params"]),
            tuple(
                (g.get("rho", 0.0), g.get("sam", True), g.get("adaptive", False), g.get("eta", 0.0))
                for g in groups
            ),
        )
        plan = self._mode_plan
        if plan is not None and plan.key == key:
            return plan
        norm: dict[tuple[bool, float], list[torch.Tensor]] = {}
        for g in groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if ps:
                norm.setdefault((bool(g.get("adaptive", False)), float(g.get("eta", 0.0))), [])
                norm[(bool(g.get("adaptive", False)), float(g.get("eta", 0.0)))].extend(ps)
        pert_groups = self._perturbed_groups()
        # per-tensor rho, and for each (adaptive, eta) setting the indices into it
        flat: list[torch.Tensor] = []
        by_mode: dict[tuple[bool, float], list[int]] = {}
        for g, ps in pert_groups:
            idx = by_mode.setdefault((bool(g.get("adaptive", False)), float(g.get("eta", 0.0))), [])
            idx.extend(range(len(flat), len(flat) + len(ps)))
            flat.extend(ps)
        rho = self._rho_vector(pert_groups) if pert_groups else None
        pert = []
        for (adaptive, eta), idx in by_mode.items():
            sel = None if len(idx) == len(flat) else torch.tensor(idx, device=self._device)
            pert.append((adaptive, eta, [flat[i] for i in idx], sel))
        # once per plan: every parameter with a gradient on one device, dense (the norm and
        # the ascent then run under sk.prevalidated())
        sk.check_lists(("params",), [p for ps in norm.values() for p in ps])
        plan = self._mode_plan = _ModePlan(key, list(norm.items()), pert, rho, self)
        return plan

    def _grad_norm(self, params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Global norm ``||T(p) * g||`` over every parameter with a gradient (all groups)."""
        if params is not None:
            keep = {id(p) for p in params}
            modes = [(m, [p for p in ps if id(p) in keep]) for m, ps in self._modes().norm]
        else:
            modes = self._modes().norm
        with sk.prevalidated():  # the plan checked the lists (_modes)
            norms = [
                sk.grad_norm(
                    _dense_grads(self, ps), ps if adaptive else None, eta=eta, backend=self.backend
                )
                for (adaptive, eta), ps in modes
                if ps
            ]
        if not norms:
            n = torch.zeros((), dtype=torch.float32, device=self._device)
        else:
            n = _combine_norms(norms, self._device)
        # sharded parameters (python_api.sharded): sqrt of the all-reduced squared local norms
        return self._reduce_norm(n)

    def _finite_flag(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """1.0 if every gradient of ``grads`` (this step's, of planned parameters) is finite,
        else 0.0: one fused norm, its lists trusted as the plan's (sparse ones refused)."""
        return self._finite_and_norm(grads)[0]

    def _perturb_along_grad(
        self, norm: torch.Tensor, factor: float | torch.Tensor = 1.0
    ) -> list[torch.Tensor]:
        """SAM/ASAM ascent: ``p += factor * rho/(norm + 1e-12) * T(p)^2 * g``, exact backups.

        ``factor`` scales every group's rho (GSAM's schedule, ``rho_t / rho``). A non-finite
        norm gives a zero scale, so no non-finite value reaches the weights. Returns the
        perturbed parameters (the ones to restore).
        """
        plan = self._modes()
        if not plan.pert:
            return []
        inv = ascent_inv(norm)
        if isinstance(factor, torch.Tensor) or factor != 1.0:
            inv = inv * factor
        scale = plan.rho * inv
        perturbed: list[torch.Tensor] = []
        for (adaptive, eta, ps, sel), backups in zip(plan.pert, plan.backups(self)):
            with sk.prevalidated():  # checked with the plan's backups
                sk.perturb_(
                    ps,
                    [p.grad for p in ps],
                    backups,
                    scale if sel is None else scale[sel],
                    adaptive=adaptive,
                    eta=eta,
                    backend=self.backend,
                )
            self._live.extend(ps)
            perturbed.extend(ps)
        return perturbed

    def _restore(self, params: Sequence[torch.Tensor]) -> None:
        if params:
            with torch.no_grad():  # also called from error paths outside no_grad
                sk.restore_(
                    list(params),
                    [self.state[p]["backup"] for p in params],
                    backend=self.backend,
                )

    # ----------------------------------------------------------------- base step
    def _base_step(
        self,
        ok: torch.Tensor,
        perturbed: Sequence[torch.Tensor] = (),
        grad_of: Callable[[list[torch.Tensor]], Any] | None = None,
        *,
        ok_known: bool = False,
        norm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Restore ``perturbed`` and take one base step at the unperturbed weights, if ``ok``.

        ``grad_of(params)`` gives the gradient for a list of parameters (a list of tensors or a
        :class:`sam_kernels.LinComb`); by default ``p.grad``. Parameters without a gradient are
        not stepped (as in torch). Updates the device step/skip counters.
        ``ok_known``: the caller has already read on the host that ``ok`` is 1 (the
        host-decision classes fold the finite check into their decision), so a base optimizer
        other than SGD/AdamW is stepped without another host read.
        Returns the flag as gated by :meth:`_gate_ok` (what the step used), for callers that
        gate their own state on it.

        ``max_grad_norm`` (gradient clipping, as ``torch.nn.utils.clip_grad_norm_`` on the
        base-step gradient): the global norm of that gradient over every parameter stepped
        (all groups) gives ``min(1, max_grad_norm / (norm + 1e-6))``, a device scalar folded
        into the fused step as a coefficient (a list gradient becomes a one-term
        :class:`sam_kernels.LinComb`, a ``LinComb``'s coefficients are scaled): no pass of its
        own, no host read. ``norm``: the caller's plain norm of exactly that gradient (this
        rank's part; SAM's finite check of ``g1``), reused; otherwise it is computed here (one
        fused norm over a list gradient; a ``LinComb`` is combined into step-local scratch,
        :data:`CLIP_CHUNK` elements at a time, and its norm taken). A non-finite norm skips the
        step (the flag). A generic base gets ``p.grad`` scaled in place before its ``step()``.

        Atomic: every group's launch is prepared and checked (shapes, dtypes, devices of the
        gradients and of every state buffer) before the first one runs, and state entries
        created for this step are only added once every launch has run; if anything raises,
        the weights are restored from their backups and nothing else has changed.
        """
        self._follow_device()
        ok = self._gate_ok(ok)
        clip = self.max_grad_norm
        if self._fused is not None:
            plan = self._base_plan(perturbed)
            grads = [
                grad_of(gp.params) if grad_of is not None else _dense_grads(self, gp.params)
                for gp in plan.groups
            ]
            # a rank without a gradient still joins the sharded norm's all-reduce (no hang)
            if clip is not None and (plan.groups or self._ranks_agree):
                scale, ok = self._clip_scale(grads, ok, norm)
                grads = [_scaled(g, scale) for g in grads]
            launches = [gp.launch(g, ok, self.backend) for gp, g in zip(plan.groups, grads)]
            try:
                self._restore(plan.restore_first)
                with sk.prevalidated():  # every launch's lists checked when the plan was built
                    for fn, kwargs in launches:
                        fn(**kwargs)
            except BaseException:
                self._restore(list(perturbed))
                raise
            if plan.pending:  # state entries created for this step: stored, plan rebuilt next
                for states, p, key, value in plan.pending:
                    states[p][key] = value
                self._plan = None
            self._count(ok)
            return ok
        # generic base optimizer: restore, put the gradient in p.grad, one host read
        self._restore(list(perturbed))
        if grad_of is not None:
            for group in self.param_groups:
                ps = [p for p in group["params"] if p.grad is not None]
                if ps:
                    g = grad_of(ps)
                    if isinstance(g, sk.LinComb):
                        out = [torch.empty_like(p.grad) for p in ps]
                        sk.lincomb_(out, g.terms, g.coefs, backend=self.backend)
                        g = out
                    for p, gi in zip(ps, g):
                        if gi is not p.grad:
                            p.grad.copy_(gi)
        if clip is not None:
            gs = [p.grad for p in self._params_with_grad()]
            if gs:
                scale, ok = self._clip_scale([gs], ok, norm)
                torch._foreach_mul_(gs, scale.to(gs[0].dtype))
        self._count(ok)
        if ok_known or bool(ok.item()):
            self.base_optimizer.step()
        return ok

    def _clip_scale(
        self, grads: list, ok: torch.Tensor, norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``min(1, max_grad_norm / (||g|| + 1e-6))`` over every group's base-step gradient
        (lists or :class:`sam_kernels.LinComb`), and ``ok`` times the norm's finite flag.

        Device ops only. ``norm``: this rank's norm of exactly that gradient (reused).
        """
        if norm is None:
            plain = [t for g in grads if not isinstance(g, sk.LinComb) for t in g]
            norms = []
            if plain:
                with sk.prevalidated():  # the parameters' gradients: checked by the plan
                    norms.append(sk.grad_norm(plain, backend=self.backend))
            norms.extend(self._lincomb_norm(g) for g in grads if isinstance(g, sk.LinComb))
            if not norms:  # nothing stepped on this rank: its part of the norm is 0
                norm = torch.zeros((), dtype=torch.float32, device=self._device)
            elif len(norms) == 1:
                norm = norms[0]
            else:  # combined in fp64 (no overflow of the squares)
                n64 = torch.stack([n.to(self._device, torch.float64) for n in norms])
                norm = torch.linalg.vector_norm(n64).to(norms[0].dtype)
        norm = norm.to(self._device)
        norm = self._reduce_norm(norm)  # sharded parameters: the global norm over the shards
        ok = ok * finite01(norm)
        scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        # a non-finite norm skips the step (ok = 0); its scale is made harmless
        scale = torch.nan_to_num(scale, nan=0.0, posinf=0.0, neginf=0.0)
        return scale, ok

    def _lincomb_norm(self, comb: sk.LinComb) -> torch.Tensor:
        """``||sum_k c_k t_k||``: the combination formed by the fused ``lincomb_`` op into
        step-local scratch, at most :data:`CLIP_CHUNK` elements (one tensor if larger) at a
        time, and its fused norm; chunk norms combined in fp64."""
        terms = [list(t) for t in comb.terms]
        n = len(terms[0])
        norms: list[torch.Tensor] = []
        i = 0
        while i < n:
            j, size = i + 1, terms[0][i].numel()
            while j < n and size + terms[0][j].numel() <= CLIP_CHUNK:
                size += terms[0][j].numel()
                j += 1
            coefs = comb.coefs if comb.coefs.dim() == 1 else comb.coefs[:, i:j]
            out = self._scratch(terms[0][i:j])
            sk.lincomb_(out, [t[i:j] for t in terms], coefs, backend=self.backend)
            norms.append(sk.grad_norm(out, backend=self.backend))
            del out
            i = j
        return _combine_norms(norms, norms[0].device)

    def _finite_and_norm(self, grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_finite_flag` and the plain norm it is read from (for clipping to reuse)."""
        grads = _check_dense(self, list(grads))
        with sk.prevalidated():
            n = sk.grad_norm(grads, backend=self.backend)
        return finite01(n), n

    def _count(self, ok: torch.Tensor) -> None:
        """The step has been applied (or skipped on the device): counters, no live backups."""
        self._counters.add_(torch.stack([ok, 1.0 - ok]))
        self._live = []

    def _base_plan(self, perturbed: Sequence[torch.Tensor]) -> _BasePlan:
        """The fused base step's plan (see :class:`_BasePlan`), rebuilt only when it must be."""
        groups = self.param_groups
        mask = tuple(p.grad is not None for g in groups for p in g["params"])
        key = (
            tuple(map(id, groups)),
            tuple(id(g["params"]) for g in groups),
            mask,
            tuple(map(id, perturbed)),
            id(self.base_optimizer.state),
            id(self.state),
            tuple(g.get("momentum", 0.0) != 0.0 or g.get("amsgrad", False) for g in groups),
        )
        plan = self._plan
        if plan is not None and plan.key == key and plan.intact():
            return plan
        plan = self._plan = self._build_base_plan(key, perturbed)
        return plan

    def _build_base_plan(self, key: tuple, perturbed: Sequence[torch.Tensor]) -> _BasePlan:
        pert = {id(p) for p in perturbed}
        pending: list[tuple[dict, torch.Tensor, str, torch.Tensor]] = []
        plans: list[_GroupPlan] = []
        stepped: set[int] = set()
        restore_first: list[torch.Tensor] = []
        prepare = self._prepare_sgd if self._fused == "sgd" else self._prepare_adamw
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            stepped.update(id(p) for p in ps)
            from_backup = all(id(p) in pert for p in ps)
            if not from_backup:
                restore_first.extend(p for p in ps if id(p) in pert)
            backups = [self.state[p]["backup"] for p in ps] if from_backup else None
            if backups is not None:
                _check_like(ps, backups, "the backup")
            plans.append(prepare(group, ps, backups, pending))
        # perturbed parameters whose gradient vanished in a later pass
        restore_first.extend(p for p in perturbed if id(p) not in stepped)
        for gp in plans:  # once per plan: the launches then run under sk.prevalidated()
            lists = {k: v for k, v in gp.state.items() if v}
            sk.check_lists(
                ("params", *lists), gp.params, *lists.values(), outputs=("params", *lists)
            )
        return _BasePlan(key, plans, restore_first, pending, self)

    def _prepare_sgd(self, group, ps, backups, pending):
        """The fused SGD launch of one group, checked; nothing run or stored yet."""
        st = self.base_optimizer.state
        momentum = group["momentum"]
        bufs, steps = [], []
        for p in ps:
            s = st[p] if p in st else {}
            if momentum != 0.0:
                b = s.get("momentum_buffer")
                if b is None:
                    b = torch.zeros_like(p, memory_format=torch.preserve_format)
                    pending.append((st, p, "momentum_buffer", b))
                    if "step" not in s:
                        # a fresh buffer: no step applied yet (torch's "first step")
                        t0 = torch.zeros((), dtype=torch.float32, device=p.device)
                        pending.append((st, p, "step", t0))
                        s = {**s, "step": t0}
                bufs.append(b)
            t = s.get("step")
            if t is None:  # state loaded from torch.optim.SGD: its buffer is initialised
                t = torch.ones((), dtype=torch.float32, device=p.device)
                pending.append((st, p, "step", t))
            elif t.device != p.device:
                t = t.to(p.device, torch.float32)
                pending.append((st, p, "step", t))
            steps.append(t)
        if momentum != 0.0:
            _check_like(ps, bufs, "momentum_buffer")
        return _GroupPlan(
            "sgd_step_",
            group,
            ps,
            dict(momentum_buffers=bufs, steps=steps, backups=backups),
            _SGD_KEYS,
        )

    def _prepare_adamw(self, group, ps, backups, pending):
        """The fused AdamW launch of one group, checked; nothing run or stored yet."""
        st = self.base_optimizer.state
        amsgrad = group["amsgrad"]
        m, v, vm, steps = [], [], [], []
        for p in ps:
            s = st[p] if p in st else {}
            # step counters in fp32 (torch's capturable AdamW), fp64 for fp64 parameters
            sdt = torch.float64 if p.dtype == torch.float64 else torch.float32
            new: dict[str, torch.Tensor] = {}
            if "exp_avg" not in s:
                new["step"] = torch.zeros((), dtype=sdt, device=p.device)
                new["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                new["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif s["step"].device != p.device or s["step"].dtype != sdt:
                new["step"] = s["step"].to(p.device, sdt)
            if amsgrad and "max_exp_avg_sq" not in s:
                new["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if new:
                pending.extend((st, p, k, t) for k, t in new.items())
                s = {**s, **new}
            m.append(s["exp_avg"])
            v.append(s["exp_avg_sq"])
            if amsgrad:
                vm.append(s["max_exp_avg_sq"])
            steps.append(s["step"])
        _check_like(ps, m, "exp_avg")
        _check_like(ps, v, "exp_avg_sq")
        if amsgrad:
            _check_like(ps, vm, "max_exp_avg_sq")
        state = dict(exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=vm, steps=steps, backups=backups)
        return _GroupPlan("adamw_step_", group, ps, state, _ADAMW_KEYS)

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        """Algorithm state that is not per parameter (subclasses extend)."""
        return {"counters": self._counters.clone()}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._counters.copy_(torch.as_tensor(extra["counters"]).to(self._counters))

    def _init_param_state(self, params: list[torch.Tensor]) -> None:
        """Create the algorithm's per-parameter state of ``params`` as a fresh optimizer's
        (DCP's state initialisation, :mod:`python_api._state`); subclasses with some extend."""

    def state_dict(self) -> dict[str, Any]:
        """torch's format: ``{"state": {i: {...}}, "param_groups": [...]}``.

        ``state[i]`` holds the base optimizer's state of parameter ``i`` under its own keys
        (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``step``) and the
        algorithm's (LookSAM's ``gv``) beside it; ``param_groups`` the shared groups (base and
        algorithm hyper-parameters); ``param_groups[0]["sam_state"]`` the class name and the
        algorithm's scalars (counters, ``t``, AE-SAM's statistics, seeds and offsets). It loads
        into ``torch.optim.SGD`` / ``AdamW`` (which ignore the extra keys) and works with
        ``torch.distributed.checkpoint``. See :mod:`python_api._state`.
        """
        return _state.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint; the whole dict is checked first, and a refused one changes nothing.

        Accepted:

        - a dict of this class (``state_dict()`` above, or the previous release's
          ``{"sam", "base", "extra"}``; ``torch.distributed.checkpoint``'s, keyed by names);
          hyper-parameters come from the dict, as with torch's optimizers;
        - a plain base-optimizer dict (``torch.optim.SGD(...).state_dict()`` into a wrapper over
          SGD, AdamW's over AdamW): the base state is loaded, the algorithm's own
          hyper-parameters (``rho``, ...) are kept, and its state starts fresh (counters and
          statistics zero, no stored LookSAM ``gv``; seeds kept).

        Refused with :class:`python_api._state.StateDictError` (a ``ValueError``) naming both
        sides: another algorithm's dict (a SAM dict into AESAM, AESAM's into SAM, SAM's into
        FrobSAM; a previous-release dict whose algorithm state has other keys); another base
        optimizer's (AdamW state or groups into a wrapper over SGD, and the reverse); other group
        or parameter counts; per-parameter tensors whose shape is not the parameter's;
        algorithm scalars of the wrong shape or kind; hyper-parameters this class rejects.
        """
        _state.load_state_dict(self, state_dict)

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults/state/param_groups: a copy would lose its base optimizer
        return _state.getstate(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch's: hook tables, the patched step
        self._reset_caches()
        if "base_optimizer" in state:
            _WRAPPERS[self.base_optimizer] = weakref.ref(self)

    def _reset_caches(self) -> None:
        """Per-step caches: stale-gradient marks, live backups, the step plans."""
        self._grad_marks = {}
        self._live = []
        self._param_sig = []
        self._plan = None
        self._mode_plan = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SAMFamily:
        return _state.deepcopy(self, memo)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        # torch's: class name and every group's hyper-parameters, plus the base's class
        return _conventions.optimizer_repr(self)


_SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
_ADAMW_KEYS = ("lr", "eps", "weight_decay", "amsgrad")


class _GroupPlan:
    """One group's fused base-step launch: the op, its parameters and their state lists.

    Built and checked once (shapes, dtypes, devices of every state buffer); a step adds only the
    gradients, the group's current hyper-parameters (an LR scheduler changes them) and the flag.
    """

    __slots__ = ("fn", "group", "params", "state", "keys")

    def __init__(self, fn: str, group: dict, params: list, state: dict, keys: tuple) -> None:
        self.fn, self.group, self.params, self.state, self.keys = fn, group, params, state, keys

    def launch(self, grads, ok: torch.Tensor, backend: str | None):
        g = self.group
        hyper = {k: g[k] for k in self.keys}
        hyper["maximize"] = g.get("maximize", False)
        if "betas" in g:
            hyper["beta1"], hyper["beta2"] = g["betas"]
        return getattr(sk, self.fn), dict(
            params=self.params, grads=grads, ok=ok, backend=backend, **self.state, **hyper
        )


class _ModePlan:
    """The norm's and the ascent's parameter lists by (adaptive, eta), with the rho vector."""

    __slots__ = ("key", "norm", "pert", "rho", "_backups", "_keep")

    def __init__(self, key, norm, pert, rho, opt: SAMFamily) -> None:
        self.key, self.norm, self.pert, self.rho = key, norm, pert, rho
        self._backups: list[list[torch.Tensor]] | None = None
        self._keep = tuple(opt.param_groups)  # the ids in the key stay valid

    def backups(self, opt: SAMFamily) -> list[list[torch.Tensor]]:
        """The backups of each setting's parameters; allocated once, re-checked by identity
        (a state dict loaded or a buffer re-allocated since gives new ones)."""
        b = self._backups
        st = opt.state
        if b is None or not all(
            st[p].get("backup") is t
            for (_, _, ps, _), bs in zip(self.pert, b)
            for p, t in zip(ps, bs)
        ):
            b = self._backups = [opt._backups(ps) for _, _, ps, _ in self.pert]
            for (_, _, ps, _), bs in zip(self.pert, b):
                # once per plan: the steps then run the ops under sk.prevalidated()
                sk.check_lists(("params", "backups"), ps, bs, outputs=("params", "backups"))
        return b


class _BasePlan:
    """Everything of the fused base step that does not change from step to step.

    Keyed on the groups, the set of parameters with a gradient, the perturbed set and the
    state dicts' identity; ``intact()`` checks (by identity, one dict read per state entry)
    that no state tensor was replaced behind the plan's back (a user's edit, a base optimizer's
    ``load_state_dict``). Parameters re-typed or moved drop the plan (``_follow_params``).
    """

    __slots__ = ("key", "groups", "restore_first", "pending", "_entries", "_keep")

    def __init__(self, key, groups, restore_first, pending, opt: SAMFamily) -> None:
        self.key, self.groups, self.restore_first, self.pending = (
            key,
            groups,
            restore_first,
            pending,
        )
        st = opt.base_optimizer.state
        self._entries = [
            (st[p], k, v) for gp in groups for p in gp.params if p in st for k, v in st[p].items()
        ]
        self._entries += [
            (opt.state[p], "backup", b)
            for gp in groups
            if gp.state.get("backups") is not None
            for p, b in zip(gp.params, gp.state["backups"])
        ]
        # the objects whose ids are in the key stay alive as long as the plan (no id reuse)
        self._keep = (tuple(opt.param_groups), st, opt.state)

    def intact(self) -> bool:
        return not self.pending and all(d.get(k) is v for d, k, v in self._entries)


def _guard_step(step: Callable) -> Callable:
    """Wrap a subclass's ``step``: atomic on errors, and the stale-gradient marks on exit.

    If the step raises anywhere before its base step has been launched (closure, a check, a
    kernel), the parameters it perturbed are restored from their exact backups; the base
    optimizer's state and the counters are only changed by the launch itself.
    """

    @functools.wraps(step)
    def wrapped(self: SAMFamily, *args: Any, **kwargs: Any):
        try:
            return step(self, *args, **kwargs)
        except BaseException:
            self._abort_step()
            raise
        finally:
            self._mark_grads()
            # a torch LR scheduler built on the base optimizer (``SAM(None, base)``) sees the
            # step, which the fused path takes without calling ``base.step()``
            self.base_optimizer._opt_called = True

    if _DYNAMO_REFUSES_STEP_STATE:
        # torch < 2.13: dynamo refuses the step's attribute writes in the frames it resumes after
        # a graph break ("Attempted setattr on a user-defined object that does not have an
        # AttributeMutation mutation_type", seen with torch 2.11 on an H200), so a compiled
        # training step runs the optimizer step eagerly there (a graph break, right results)
        wrapped = torch._dynamo.disable(wrapped)
    return wrapped


def _follow(v: torch.Tensor, p: torch.Tensor, key: str) -> torch.Tensor:
    """State tensor ``v`` of parameter ``p`` cast/moved to follow ``p`` (see _follow_params)."""
    if key != "step" and v.is_floating_point() and v.shape == p.shape:
        if v.dtype != p.dtype or v.device != p.device:
            return v.to(device=p.device, dtype=p.dtype)
        return v
    return v if v.device == p.device else v.to(p.device)


def _check_like(ps: Sequence[torch.Tensor], ts: Sequence[torch.Tensor], what: str) -> None:
    """Every ``ts[i]`` has the shape, dtype and device of ``ps[i]`` (else a clear error)."""
    for i, (p, t) in enumerate(zip(ps, ts)):
        if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            raise RuntimeError(
                f"{what} of parameter {i} of its group is {t.dtype} {tuple(t.shape)} on "
                f"{t.device}, but the parameter is {p.dtype} {tuple(p.shape)} on {p.device}; "
                "nothing was changed"
            )


def _flatten_params(params: Iterable) -> list[torch.Tensor]:
    out = []
    for item in params:
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            out.append(item)
    return out


def _scaled(grad: Any, scale: torch.Tensor) -> sk.LinComb:
    """A base-step gradient (list or :class:`sam_kernels.LinComb`) times a device scalar, as a
    ``LinComb`` the fused step combines in its pass (no pass of its own)."""
    if isinstance(grad, sk.LinComb):
        return sk.LinComb(grad.terms, grad.coefs * scale.to(grad.coefs.dtype))
    grad = list(grad)
    f64 = any(g.dtype == torch.float64 for g in grad)
    coef = scale.to(torch.float64 if f64 else torch.float32).reshape(1)
    return sk.LinComb((grad,), coef)


def _dense_grads(opt: SAMFamily, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[p.grad for p in params]``, refusing sparse gradients (the one per-step check the ops
    skip under ``sk.prevalidated()``: torch keeps a gradient's device, shape and dtype, not its
    layout)."""
    return _check_dense(opt, [p.grad for p in params])


def _check_dense(opt: SAMFamily, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads``, after refusing a sparse one (a clear error naming the class)."""
    for g in grads:
        if g.layout is not torch.strided:
            raise ValueError(
                f"{type(opt).__name__} does not support sparse gradients (layout {g.layout})"
            )
    return grads


def _combine_norms(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sqrt(sum n_i^2)`` of partial norms, on ``device``, in the first one's dtype: combined in
    fp64, so partial norms near the fp32 limit do not overflow here."""
    if len(norms) == 1:
        return norms[0]
    n64 = torch.stack([n.to(device, torch.float64) for n in norms])
    return torch.linalg.vector_norm(n64).to(norms[0].dtype)
