"""The per-step plans: what a step would otherwise rebuild every time.

- :class:`_ModePlan`: the norm's and the ascent's parameter lists by (adaptive, eta), with the
  per-tensor rho vector (built by ``Perturbation._modes``);
- :class:`_BasePlan` of :class:`_GroupPlan`: the fused SGD/AdamW base step's launches, their
  state lists checked once (built by :class:`BaseStepPlans`, which prepares each group's
  launch and the state entries a first step creates).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

import sam_kernels as sk
from sam_kernels import same_entries, same_values


def _fused_kind(base: Optimizer) -> str | None:
    """'sgd' / 'adamw' when the wrapper can run the base step itself, else None.

    ``foreach=False`` or ``fused=False`` given for the base (torch's single-tensor or unfused
    implementation asked for explicitly) is honoured: torch's own ``step()`` runs
    (see :class:`python_api._base.SAMFamily`). ``None``/``True`` and any ``capturable`` keep
    the fused path.
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


class BaseStepPlans:
    """The fused base step's plan, built and checked only when it must be (a part of
    ``SAMFamily``)."""

    def _base_plan(self, perturbed: Sequence[torch.Tensor]) -> _BasePlan:
        """The fused base step's plan (see :class:`_BasePlan`), rebuilt only when it must be."""
        key = self._base_plan_key(perturbed)
        plan = self._plan
        if plan is not None:
            if plan.key == key and plan.intact():
                return plan
            # the classes that switch between a SAM step and a one-pass step (AE-SAM, LookSAM,
            # SS-SAM) alternate between two keys (the perturbed set): the other plan is kept
            other = plan.other
            if other is not None and other.key == key and other.intact():
                plan.other, other.other = None, plan
                self._plan = other
                return other
            plan.other = None
        new = self._plan = self._build_base_plan(key, perturbed)
        new.other = plan
        return new

    def _base_plan_key(self, perturbed: Sequence[torch.Tensor]) -> tuple:
        """What the base plan is keyed on: the groups and their parameter lists, the parameters
        with a gradient, the perturbed ones, the state dicts, the settings that add state."""
        groups = self.param_groups
        return (
            tuple(map(id, groups)),
            tuple(id(g["params"]) for g in groups),
            # the parameters themselves: a group's list changed in place rebuilds the plan
            tuple(map(id, chain.from_iterable(g["params"] for g in groups))),
            tuple(p.grad is not None for g in groups for p in g["params"]),
            tuple(map(id, perturbed)),
            id(self.base_optimizer.state),
            id(self.state),
            tuple(g.get("momentum", 0.0) != 0.0 or g.get("amsgrad", False) for g in groups),
        )

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

    __slots__ = ("key", "norm", "pert", "rho", "_backups", "_held", "_keep")

    def __init__(self, key, norm, pert, rho, opt: Any) -> None:
        self.key, self.norm, self.pert, self.rho = key, norm, pert, rho
        self._backups: list[list[torch.Tensor]] | None = None
        # (state mapping, its per-parameter dicts in order, the backups' dicts, the backups)
        self._held: tuple | None = None
        self._keep = tuple(opt.param_groups)  # the ids in the key stay valid

    def backups(self, opt: Any) -> list[list[torch.Tensor]]:
        """The backups of each setting's parameters; allocated once, re-checked by identity
        (a state dict loaded, a parameter's state replaced or a buffer re-allocated since gives
        new ones)."""
        b = self._backups
        if b is None or not self._held_intact(opt.state):
            b = self._backups = [opt._backups(ps) for _, _, ps, _ in self.pert]
            for (_, _, ps, _), bs in zip(self.pert, b):
                # once per plan: the steps then run the ops under sk.prevalidated()
                sk.check_lists(("params", "backups"), ps, bs, outputs=("params", "backups"))
            st = opt.state
            ps = [p for _, _, ps, _ in self.pert for p in ps]
            self._held = (st, list(st.values()), [st[p] for p in ps], list(chain(*b)))
        return b

    def _held_intact(self, st: Any) -> bool:
        # by identity: the mapping, each parameter's dict in it, each backup in its dict
        held_st, dicts, bdicts, backups = self._held
        return st is held_st and same_values(st, dicts) and same_entries(bdicts, "backup", backups)


class _BasePlan:
    """Everything of the fused base step that does not change from step to step.

    Keyed on the groups, the set of parameters with a gradient, the perturbed set and the
    state dicts' identity; ``intact()`` checks (by identity, one dict read per state entry)
    that no state tensor was replaced behind the plan's back (a user's edit, a base optimizer's
    ``load_state_dict``), and that no parameter's whole state was replaced or deleted
    (``base.state[p] = {}`` or ``del base.state[p]``: a reset that the next step must see).
    Parameters re-typed or moved drop the plan (``_follow_params``).
    """

    __slots__ = (
        "key",
        "groups",
        "restore_first",
        "pending",
        "other",
        "_dicts",
        "_keys",
        "_values",
        "_bdicts",
        "_backups",
        "_outer",
        "_keep",
    )

    def __init__(self, key, groups, restore_first, pending, opt: Any) -> None:
        self.key, self.groups, self.restore_first, self.pending = (
            key,
            groups,
            restore_first,
            pending,
        )
        # the plan this one replaced, kept for a step under its key (see _base_plan): dropped
        # with this one wherever the plans are dropped
        self.other: _BasePlan | None = None
        st = opt.base_optimizer.state
        # the base state's entries (the descent writes them) and the backups (the ascent writes
        # them): checked apart, each by the half of a planned step that uses them
        entries = [
            (st[p], k, v) for gp in groups for p in gp.params if p in st for k, v in st[p].items()
        ]
        backups = [
            (opt.state[p], b)
            for gp in groups
            if gp.state.get("backups") is not None
            for p, b in zip(gp.params, gp.state["backups"])
        ]
        self._dicts = [d for d, _, _ in entries]
        self._keys = [k for _, k, _ in entries]
        self._values = [v for _, _, v in entries]
        self._bdicts = [d for d, _ in backups]
        self._backups = [b for _, b in backups]
        # each state mapping with its per-parameter dicts in order: none replaced, deleted or
        # added (a reset of a parameter's state); read by identity (sam_kernels.same_values)
        self._outer = [(m, list(m.values())) for m in (st, opt.state)]
        # the objects whose ids are in the key stay alive as long as the plan (no id reuse)
        self._keep = (tuple(opt.param_groups), st, opt.state)

    def intact(self) -> bool:
        return not self.pending and self.entries_intact()

    def entries_intact(self) -> bool:
        """Every state entry the plan holds is still the state's, in the same dicts."""
        return self.state_intact() and self._backups_held()

    def state_intact(self) -> bool:
        """The per-parameter dicts and the base state's entries (what a descent writes)."""
        return self._outer_held() and same_entries(self._dicts, self._keys, self._values)

    def backups_intact(self) -> bool:
        """The per-parameter dicts and the backups (what an ascent writes)."""
        return self._outer_held() and self._backups_held()

    def _outer_held(self) -> bool:
        (m0, d0), (m1, d1) = self._outer
        return same_values(m0, d0) and same_values(m1, d1)

    def _backups_held(self) -> bool:
        return same_entries(self._bdicts, "backup", self._backups)


def _check_like(ps: Sequence[torch.Tensor], ts: Sequence[torch.Tensor], what: str) -> None:
    """Every ``ts[i]`` has the shape, dtype and device of ``ps[i]`` (else a clear error)."""
    for i, (p, t) in enumerate(zip(ps, ts)):
        if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            raise RuntimeError(
                f"{what} of parameter {i} of its group is {t.dtype} {tuple(t.shape)} on "
                f"{t.device}, but the parameter is {p.dtype} {tuple(p.shape)} on {p.device}; "
                "nothing was changed"
            )
