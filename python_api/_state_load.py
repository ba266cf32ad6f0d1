"""Loading a ``state_dict`` (:meth:`python_api._base.SAMFamily.load_state_dict`): the previous
release's dicts read, the whole dict checked against the live optimizer (class, base optimizer,
group and parameter counts, shapes, the algorithm's scalars, hyper-parameters), then loaded.

Separate from saving and copies (:mod:`python_api._state`, whose docstring describes the format):
this is the longest part of the state code and the only one that refuses input. Everything is
checked before anything changes.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from itertools import chain
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
    _param_order,
    class_name,
)


def _from_release_0(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
    """The previous release's ``{"sam": ..., "base": ..., "extra": ...}`` in today's format."""
    sam, base, extra = sd["sam"], sd["base"], sd["extra"]
    for part, what in ((sam, "sam"), (base, "base")):
        if not isinstance(part, dict) or not {"state", "param_groups"} <= set(part):
            raise StateDictError(f"state_dict[{what!r}] is not an optimizer state_dict")
    if not isinstance(extra, dict):
        raise StateDictError("state_dict['extra'] is not a dict")
    state = {k: dict(v) for k, v in base["state"].items()}
    # the wrapper's own state was numbered over the same (shared) groups
    for k, v in sam["state"].items():
        state.setdefault(k, {}).update(v)
    if len(sam["param_groups"]) != len(base["param_groups"]):
        raise StateDictError("state_dict['sam'] and ['base'] have different numbers of groups")
    groups = []
    for mine, theirs in zip(sam["param_groups"], base["param_groups"]):
        g = dict(theirs)
        for k, v in mine.items():
            g.setdefault(k, v)
        groups.append(g)
    if groups:
        groups[0][FORMAT_KEY] = {"class": None, "version": 0, **extra}
    return {"state": state, "param_groups": groups}


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)}"
    return type(v).__name__


def _check_extra(opt: Any, saved_class: str | None, extra: dict[str, Any]) -> None:
    """The saved scalars against the live optimizer's (keys, tensor shapes, kinds)."""
    me = class_name(opt)
    src = f"a {saved_class} state_dict" if saved_class else "this state_dict"
    template = opt._extra_state()
    optional = set(type(opt)._optional_extra_state)
    missing = sorted(k for k in template if k not in extra and k not in optional)
    unknown = sorted(k for k in extra if k not in template and k not in optional)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"lacks {me}'s {missing}")
        if unknown:
            parts.append(f"holds {unknown}, which {me} does not have")
        raise StateDictError(
            f"{src} cannot be loaded into {me}: its algorithm state "
            + " and ".join(parts)
            + " (a checkpoint of another algorithm?)"
        )
    for k, v in extra.items():
        t = template.get(k)
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            if not isinstance(v, torch.Tensor) or v.shape != t.shape:
                raise StateDictError(
                    f"{src} cannot be loaded into {me}: algorithm state {k!r} is "
                    f"{_describe(v)}, expected {_describe(t)}"
                )
            if v.is_floating_point() != t.is_floating_point():
                raise StateDictError(
                    f"{src} cannot be loaded into {me}: algorithm state {k!r} has dtype "
                    f"{v.dtype}, expected {t.dtype}"
                )
        elif isinstance(t, (int, float)) and not isinstance(t, bool):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise StateDictError(
                    f"{src} cannot be loaded into {me}: algorithm state {k!r} is "
                    f"{_describe(v)}, expected a number"
                )


def _fresh_extra(opt: Any) -> dict[str, Any]:
    """The algorithm's scalars as constructed: counters and statistics zero, seeds kept."""
    keep = set(type(opt)._config_extra_state)
    out = {}
    for k, v in opt._extra_state().items():
        if k in keep or not isinstance(v, torch.Tensor):
            out[k] = v
        else:
            out[k] = torch.zeros_like(v)
    return out


class _Plan:
    """What a validated ``state_dict`` loads: the base's dict, the algorithm's parts."""

    def __init__(self) -> None:
        self.base_sd: dict[str, Any] = {}
        self.algo_state: dict[int, dict[str, torch.Tensor]] = {}  # position -> key -> value
        self.extra: dict[str, Any] | None = None  # None: fresh


def _validate(opt: Any, sd: Any) -> _Plan:
    me = class_name(opt)
    if not isinstance(sd, dict):
        raise StateDictError(f"{me}.load_state_dict expects a dict, got {type(sd).__name__}")
    if {"sam", "base", "extra"} <= set(sd) and "state" not in sd:
        sd = _from_release_0(opt, sd)
    if not {"state", "param_groups"} <= set(sd):
        raise StateDictError(
            f"{me}.load_state_dict: not an optimizer state_dict (expected the keys 'state' "
            f"and 'param_groups', got {sorted(map(str, sd))})"
        )
    state, saved_groups = sd["state"], sd["param_groups"]
    if not isinstance(state, dict) or not isinstance(saved_groups, (list, tuple)):
        raise StateDictError(f"{me}.load_state_dict: 'state' must be a dict, 'param_groups' a list")
    groups = opt.param_groups
    if len(saved_groups) != len(groups):
        raise StateDictError(
            f"{me}.load_state_dict: the state_dict has {len(saved_groups)} parameter groups, "
            f"this optimizer {len(groups)}"
        )
    for i, (sg, g) in enumerate(zip(saved_groups, groups)):
        if not isinstance(sg, dict) or "params" not in sg:
            raise StateDictError(f"{me}.load_state_dict: param_groups[{i}] has no 'params'")
        if len(sg["params"]) != len(g["params"]):
            raise StateDictError(
                f"{me}.load_state_dict: param_groups[{i}] has {len(sg['params'])} parameters "
                f"in the state_dict, {len(g['params'])} here"
            )
    # the scalars and the class
    plan = _Plan()
    info = [sg.get(FORMAT_KEY) for sg in saved_groups]
    found = [x for x in info if x is not None]
    if len(found) > 1:
        raise StateDictError(f"{me}.load_state_dict: {FORMAT_KEY!r} in more than one group")
    saved_class = None
    if found:
        meta = found[0]
        if not isinstance(meta, dict):
            raise StateDictError(f"{me}.load_state_dict: {FORMAT_KEY!r} must be a dict")
        saved_class = meta.get("class")
        version = meta.get("version", 0)
        if isinstance(version, torch.Tensor):
            version = int(version.item())
        if version > FORMAT_VERSION:
            raise StateDictError(
                f"{me}.load_state_dict: the state_dict's format version {version} is newer than "
                f"this release's ({FORMAT_VERSION})"
            )
        if saved_class is not None and saved_class not in {
            c.__qualname__ for c in type(opt).__mro__
        }:
            raise StateDictError(
                f"a {saved_class} state_dict cannot be loaded into {me} (different algorithms "
                "keep different state); build the optimizer of the checkpoint, or load only the "
                "base optimizer's part with opt.base_optimizer.load_state_dict"
            )
        extra = {k: v for k, v in meta.items() if k not in ("class", "version")}
        _check_extra(opt, saved_class, extra)
        plan.extra = extra
    src = f"a {saved_class} state_dict" if saved_class else "this state_dict"
    # parameter ids by position, as torch loads them
    saved_ids = list(chain.from_iterable(sg["params"] for sg in saved_groups))
    params = _param_order(groups)
    pos: dict[Any, int] = {}
    for i, pid in enumerate(saved_ids):
        pos.setdefault(pid, i)
    kind = opt._fused
    algo_keys = set(type(opt)._param_state_keys)
    base_state: dict[int, dict[str, Any]] = {}
    for pid, st in state.items():
        if pid not in pos:
            raise StateDictError(
                f"{me}.load_state_dict: state for parameter {pid!r}, which no group lists"
            )
        if not isinstance(st, dict):
            raise StateDictError(f"{me}.load_state_dict: state[{pid!r}] is not a dict")
        i = pos[pid]
        p = params[i]
        b: dict[str, Any] = {}
        a: dict[str, torch.Tensor] = {}
        for k, v in st.items():
            if k in algo_keys:
                if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                    raise StateDictError(
                        f"{src} cannot be loaded into {me}: state[{pid!r}][{k!r}] is "
                        f"{_describe(v)}, the parameter has shape {tuple(p.shape)}"
                    )
                a[k] = v
                continue
            if kind is not None and k not in _BASE_STATE[kind]:
                raise StateDictError(
                    f"{src} cannot be loaded into {me} over {_BASE_NAME[kind]}: state[{pid!r}] "
                    f"holds {k!r}, which is neither {_BASE_NAME[kind]}'s state nor {me}'s "
                    "(a checkpoint of another base optimizer or algorithm?)"
                )
            if k in _SHAPED and (not isinstance(v, torch.Tensor) or v.shape != p.shape):
                raise StateDictError(
                    f"{src} cannot be loaded into {me}: state[{pid!r}][{k!r}] is "
                    f"{_describe(v)}, the parameter has shape {tuple(p.shape)}"
                )
            if k == "step" and kind is not None:
                if isinstance(v, torch.Tensor) and v.numel() != 1:
                    raise StateDictError(
                        f"{src} cannot be loaded into {me}: state[{pid!r}]['step'] has "
                        f"{v.numel()} elements"
                    )
            b[k] = v
        if a:
            plan.algo_state[i] = a
        if b:
            base_state[i] = b
    # groups: the base's hyper-parameters must be there; the algorithm's are kept if absent
    own_keys = tuple(opt._own_keys)
    new_groups = []
    for gi, (sg, g) in enumerate(zip(saved_groups, groups)):
        if kind is not None:
            lacking = [k for k in _BASE_GROUP_KEYS[kind] if k not in sg]
            if lacking:
                raise StateDictError(
                    f"{src} cannot be loaded into {me} over {_BASE_NAME[kind]}: param_groups"
                    f"[{gi}] lacks {lacking} (a checkpoint of another base optimizer?)"
                )
        ng = {k: v for k, v in sg.items() if k not in ("params", FORMAT_KEY)}
        for k in own_keys:
            if k not in ng:
                ng[k] = g[k]
        try:
            opt._check_group(ng)
        except (ValueError, TypeError) as err:
            raise StateDictError(
                f"{src} cannot be loaded into {me}: param_groups[{gi}]: {err}"
            ) from err
        start = sum(len(x["params"]) for x in groups[:gi])
        ng["params"] = list(range(start, start + len(g["params"])))
        new_groups.append(ng)
    plan.base_sd = {
        "state": {i: {k: _fresh_copy(v) for k, v in st.items()} for i, st in base_state.items()},
        "param_groups": new_groups,
    }
    return plan


def _fresh_copy(v: Any) -> Any:
    # torch's load_state_dict keeps the given tensors when no cast is needed: two optimizers
    # loaded from one dict (or from a live one, as DCP does) would share their buffers
    return v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)


def load_state_dict(opt: Any, sd: dict[str, Any]) -> None:
    """Validate ``sd`` entirely, then load it (see ``SAMFamily.load_state_dict``)."""
    if getattr(opt, "_live", None):
        # between first_step and second_step (or from a closure): the weights are at w + e and
        # the step's backups hold w; loading would drop them and the step could not finish
        raise RuntimeError(
            f"{class_name(opt)}.load_state_dict was called inside a step (after first_step, "
            "before second_step, or from the closure), while the weights are perturbed; load "
            "the state before first_step or after second_step. Nothing was changed"
        )
    if not isinstance(sd, dict):
        raise StateDictError(
            f"{class_name(opt)}.load_state_dict expects a dict, got {type(sd).__name__}"
        )
    sd = dict(sd)
    for hook in _hooks(opt, "_optimizer_load_state_dict_pre_hooks"):
        out = hook(opt, sd)
        if out is not None:
            sd = out
    plan = _validate(opt, sd)
    # nothing has changed so far; torch's own load checks the same counts before it changes
    # anything, so from here on nothing raises
    opt.base_optimizer.load_state_dict(plan.base_sd)
    opt.param_groups = opt.base_optimizer.param_groups
    params = _param_order(opt.param_groups)
    new_state: defaultdict = defaultdict(dict)
    for i, st in plan.algo_state.items():
        p = params[i]
        new_state[p] = {
            k: v.detach().to(device=p.device, dtype=p.dtype, copy=True) for k, v in st.items()
        }
    opt.state = new_state
    opt._load_extra_state(plan.extra if plan.extra is not None else _fresh_extra(opt))
    opt._rho_cache = None
    opt._plan = None
    opt._mode_plan = None
    for hook in _hooks(opt, "_optimizer_load_state_dict_post_hooks"):
        hook(opt)
