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

Layout: this module holds :class:`SAMFamily` (construction, parameter groups, state_dict glue)
and the compiled-step guard (:func:`_guard_step`); its parts are :mod:`python_api._closures`,
:mod:`python_api._perturbation`, :mod:`python_api._base_step`, :mod:`python_api._plans`,
:mod:`python_api._hooks` and :mod:`python_api._devices` (device following), and
:mod:`python_api._checks` holds the validators and small gradient helpers. Every name those
define that was importable from here before the split still is (``__all__``).
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api import _conventions, _state
from python_api._base_step import CLIP_CHUNK, BaseStep, _scaled
from python_api._checks import (
    _EPS,
    BASE_KEYS,
    NonFiniteError,
    _check_dense,
    _combine_norms,
    _dense_grads,
    ascent_inv,
    check_base_group,
    check_max_grad_norm,
    check_nonneg,
    check_range,
    check_real_params,
    finite01,
)
from python_api._closures import Closure, ClosureContract
from python_api._devices import DeviceFollowing, _follow
from python_api._hooks import HookCalls, _all_reduce_min, _distributed
from python_api._perturbation import Perturbation
from python_api._plans import (
    _ADAMW_KEYS,
    _SGD_KEYS,
    BaseStepPlans,
    _BasePlan,
    _check_like,
    _fused_kind,
    _GroupPlan,
    _ModePlan,
)
from python_api.amp import with_scaler_kwarg
from python_api.batchnorm import BNStatsKeeper

#: what ``from python_api._base import X`` gives besides SAMFamily (the family's building
#: blocks live in the modules above; algorithms and tests import them from here)
__all__ = [
    "CLIP_CHUNK",
    "Closure",
    "NonFiniteError",
    "SAMFamily",
    "_ADAMW_KEYS",
    "_BasePlan",
    "_DYNAMO_REFUSES_STEP_STATE",
    "_EPS",
    "_GroupPlan",
    "_ModePlan",
    "_SGD_KEYS",
    "_all_reduce_min",
    "_check_dense",
    "_check_like",
    "_combine_norms",
    "_dense_grads",
    "_distributed",
    "_flatten_params",
    "_follow",
    "_fused_kind",
    "_guard_step",
    "_scaled",
    "ascent_inv",
    "check_max_grad_norm",
    "check_nonneg",
    "check_range",
    "finite01",
]

# base optimizer -> the wrapper that owns its param_groups (one wrapper per base instance)
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ON_NONFINITE = ("skip", "raise")
#: torch releases whose dynamo cannot trace the step's bookkeeping (see _guard_step)
_DYNAMO_REFUSES_STEP_STATE = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13)


class SAMFamily(
    DeviceFollowing,
    HookCalls,
    ClosureContract,
    Perturbation,
    BaseStep,
    BaseStepPlans,
    Optimizer,
):
    """Base class: wrapping, closures, BN handling, the fused base step and non-finite skips.

    Subclasses implement :meth:`step` with the helpers of its parts:
    :class:`~python_api._closures.ClosureContract` (closures, stale gradients, the non-finite
    flag), :class:`~python_api._perturbation.Perturbation` (norm, ascent, backups, restore),
    :class:`~python_api._base_step.BaseStep` (the base step, clipping, the counters and their
    properties ``steps_taken`` / ``skipped_steps``) over
    :class:`~python_api._plans.BaseStepPlans`, and :class:`~python_api._hooks.HookCalls` (the
    AMP / DDP / FSDP2 hooks of a step), and :class:`~python_api._devices.DeviceFollowing`
    (device following). This class holds construction, parameter groups and the state_dict
    glue.

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
        check_real_params(self)
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
        # ({} until a step ends: then the parameters in order with (weakref, version) or None
        # each, or a step plan's marks)
        self._grad_marks: Any = {}
        self._live: list[torch.Tensor] = []
        self._param_sig: list[tuple[torch.dtype, torch.device]] = []
        self._followed = False  # _follow_device ran in the current step
        self._plan: _BasePlan | None = None
        self._mode_plan: _ModePlan | None = None
        self._checked_settings: list | None = None  # the group values last checked

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
        try:
            self._check_group(self.param_groups[-1])
            check_real_params(self)
        except (ValueError, TypeError):
            self.param_groups.pop()  # refused: the groups stay as they were
            raise
        self._rho_cache = None

    def _check_settings(self) -> None:
        """Every group's settings checked before a step changes anything, when one of them was
        replaced since the last check (by hand, a scheduler, a loaded state dict): this class's
        (``rho``, ...: :meth:`_check_group`) and those of the base step the package applies
        itself (:func:`python_api._checks.check_base_group`). A value written into a group was
        otherwise used as it was: ``rho = -1`` ascended against the gradient, a NaN ``lr``
        wrote NaN weights, an infinite ``rho`` skipped every step.

        The values last checked are held and compared by identity (held, so no id is reused):
        about 1 us per step while nothing changes."""
        keys = self._own_keys + BASE_KEYS.get(self._fused or "", ())
        vals = [g.get(k) for g in self.param_groups for k in keys]
        held = self._checked_settings
        if held is not None and len(held) == len(vals) and all(map(operator.is_, vals, held)):
            return  # (a group added since, or a key missing, changes the list)
        self._fill_group_settings()
        vals = [g.get(k) for g in self.param_groups for k in keys]
        for i, g in enumerate(self.param_groups):
            self._check_group(g)
            if self._fused is not None:
                check_base_group(self._fused, g, i)
        self._checked_settings = vals

    def _fill_group_settings(self) -> None:
        """Give a group added through the base optimizer (``base.add_param_group``, which knows
        only its own defaults) this optimizer's defaults (rho, ...), as :meth:`add_param_group`
        does: without them it was read as rho = 0 and silently never perturbed."""
        own = self._own_keys
        for g in self.param_groups:
            if not all(k in g for k in own):
                for k in own:
                    g.setdefault(k, self.defaults[k])
                self._check_group(g)
                self._rho_cache = None

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
        self._followed = False
        self._plan = None
        self._mode_plan = None
        self._checked_settings = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SAMFamily:
        return _state.deepcopy(self, memo)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        # torch's: class name and every group's hyper-parameters, plus the base's class
        return _conventions.optimizer_repr(self)


def _guard_step(step: Callable) -> Callable:
    """Wrap a subclass's ``step``: atomic on errors, and the stale-gradient marks on exit.

    If the step raises anywhere before its base step has been launched (closure, a check, a
    kernel), the parameters it perturbed are restored from their exact backups; the base
    optimizer's state and the counters are only changed by the launch itself.
    """

    @functools.wraps(step)
    def wrapped(self: SAMFamily, *args: Any, **kwargs: Any):
        self._followed = False  # a new step: the parameters are looked at again
        try:
            self._check_settings()
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


def _flatten_params(params: Iterable) -> list[torch.Tensor]:
    out = []
    for item in params:
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            out.append(item)
    return out
