"""The optimizer's state: torch's ``state_dict`` format, validated loading, DCP, copies.

Format (``SAMFamily.state_dict``), torch's own::

    {
        "state": {0: {"momentum_buffer": T, "step": T, "gv": T}, ...},   # per parameter
        "param_groups": [
            {"lr": 0.1, "momentum": 0.9, ..., "rho": 0.05, "params": [0, 1, 2],
             "sam_state": {"class": "LookSAM", "version": 1,
                           "counters": T, "t": T, "decisions": T}},
            {"lr": 0.1, ..., "params": [3, 4]},
        ],
    }

- ``state[i]`` holds the base optimizer's per-parameter state under its own keys
  (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``step``) and, beside
  them, the algorithm's persistent per-parameter state (LookSAM's ``gv``; the class attribute
  ``_param_state_keys``). Scratch buffers valid only inside a step are left out.
- ``param_groups`` are the groups the wrapper shares with its base: the base's hyper-parameters
  and the algorithm's own (``rho``, ``adaptive``, ...).
- ``param_groups[0]["sam_state"]`` holds the algorithm's scalars (``_extra_state``: step and
  skip counters, ``t``, AE-SAM's statistics, seeds and offsets) and the class name. It sits in
  a parameter group, not at the top level, because ``torch.distributed.checkpoint`` keeps only
  ``state`` and ``param_groups``.

So a ``torch.optim.SGD`` / ``AdamW`` checkpoint loads into a wrapper over the same base, and a
wrapper's loads into them (they keep the extra keys and ignore them). The previous release's
``{"sam", "base", "extra"}`` dicts are read too. What is accepted is documented on
:meth:`python_api._base.SAMFamily.load_state_dict`; everything is checked before anything
changes.

Layout: this module holds the format (above), saving (:func:`state_dict`), copies and pickling;
:mod:`python_api._state_format` the format's constants and helpers, :mod:`python_api._state_load`
the validated loading, :mod:`python_api._state_init` DCP's state initialisation. Every name
defined here before the split is still importable from here (``__all__``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from python_api._state_format import (
    _BASE_GROUP_KEYS,
    _BASE_NAME,
    _BASE_STATE,
    _SHAPED,
    FORMAT_KEY,
    FORMAT_VERSION,
    StateDictError,
    _hooks,
    _param_index,
    _param_order,
    class_name,
)
from python_api._state_init import _is_init_call, init_state, recognise_init_step
from python_api._state_load import (
    _check_extra,
    _describe,
    _fresh_copy,
    _fresh_extra,
    _from_release_0,
    _Plan,
    _validate,
    load_state_dict,
)

#: what ``from python_api._state import X`` gives (the parts live in the modules above)
__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "StateDictError",
    "_BASE_GROUP_KEYS",
    "_BASE_NAME",
    "_BASE_STATE",
    "_NOT_COPIED",
    "_Plan",
    "_SHAPED",
    "_check_extra",
    "_describe",
    "_fresh_copy",
    "_fresh_extra",
    "_from_release_0",
    "_hooks",
    "_is_init_call",
    "_param_index",
    "_param_order",
    "_validate",
    "class_name",
    "deepcopy",
    "getstate",
    "init_state",
    "load_state_dict",
    "recognise_init_step",
    "state_dict",
]

#: attributes of the live optimizer never copied or pickled: torch's hook tables (torch's own
#: ``__getstate__`` drops them too) and the per-step hooks of python_api.amp / distributed
_NOT_COPIED = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
    "_amp",
    "_dist",
    # an LR scheduler's wrapper of ``step`` on the instance: it steps the original optimizer
    # (a weak reference to it), so a copy keeps the class's step
    "step",
    # per-step caches of the live object (weak references, plans over its own tensors):
    # rebuilt by SAMFamily.__setstate__
    "_grad_marks",
    "_plan",
    "_mode_plan",
    "_live",
    "_param_sig",
    "_followed",
    "_checked_settings",
)


# ----------------------------------------------------------------- state_dict
def state_dict(opt: Any) -> dict[str, Any]:
    """The wrapper's ``state_dict`` (see the module doc). Tensors of per-parameter state are
    the live ones (as torch's); the scalars are copies. Runs the wrapper's state-dict hooks."""
    for hook in _hooks(opt, "_optimizer_state_dict_pre_hooks"):
        hook(opt)
    base = opt.base_optimizer.state_dict()
    state = {k: dict(v) for k, v in base["state"].items()}
    groups = [dict(g) for g in base["param_groups"]]
    index = _param_index(opt.param_groups)
    keep = set(type(opt)._param_state_keys)
    for p, st in opt.state.items():
        own = {k: v for k, v in st.items() if k in keep}
        if own and id(p) in index:
            state.setdefault(index[id(p)], {}).update(own)
    extra = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt._extra_state().items()
    }
    groups[0][FORMAT_KEY] = {"class": class_name(opt), "version": FORMAT_VERSION, **extra}
    for g in groups[1:]:
        g.pop(FORMAT_KEY, None)
    sd: dict[str, Any] = {"state": state, "param_groups": groups}
    for hook in _hooks(opt, "_optimizer_state_dict_post_hooks"):
        out = hook(opt, sd)
        if out is not None:
            sd = out
    return sd


# ----------------------------------------------------------------- copies and pickling
def getstate(opt: Any) -> dict[str, Any]:
    """Everything the optimizer holds (torch keeps only defaults, state and groups, which
    leaves a wrapper without its base optimizer), less hooks and per-step helpers."""
    if opt.__dict__.get("process_group") is not None:
        raise TypeError(
            f"{class_name(opt)} with a process_group cannot be pickled (a process group is "
            "not picklable); save opt.state_dict() instead"
        )
    return {k: v for k, v in opt.__dict__.items() if k not in _NOT_COPIED}


def deepcopy(opt: Any, memo: dict[int, Any]) -> Any:
    """A working copy: base optimizer, model, parameters and state copied together (one memo,
    so a copy of ``{"model": m, "opt": opt}`` steps the copied model's parameters); a process
    group is shared, not copied."""
    pg = opt.__dict__.get("process_group")
    if pg is not None:
        memo.setdefault(id(pg), pg)
    cls = type(opt)
    new = cls.__new__(cls)
    memo[id(opt)] = new
    state = {k: v for k, v in opt.__dict__.items() if k not in _NOT_COPIED}
    new.__setstate__(copy.deepcopy(state, memo))
    return new
