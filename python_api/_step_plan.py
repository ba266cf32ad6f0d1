"""SAM's planned step on the compiled extension: two dispatched ops per step (issue 14, item 2).

:class:`python_api.SAM` (and ASAM) over a fused SGD or AdamW base, on tensors where the compiled
extension runs every op of the step, builds one :class:`sam_kernels.step_plan.SamStepPlan` from
its cached plans (:class:`python_api._plans._ModePlan` and ``_BasePlan``, so the lists, their
checks and the state are the unplanned path's own) and then runs each half of a step as one op.
The results are bit-identical to the unplanned path (tests/optim/test_step_plan_ext.py).

What is checked where:

- in C++, on every call, before anything is written: each parameter's gradient is present
  exactly where the plan expects it, dense, shaped, typed and placed like the parameter; no
  parameter changed dtype, device or shape. Otherwise the call does nothing and the step runs
  unplanned (and rebuilds its plans as it always does);
- here, on every call (:meth:`PlannedStep.valid`): the key (the groups, their parameter lists,
  the hyper-parameters that shape the lists, the backend, clipping's threshold and the settings
  that add work to a step: ``on_nonfinite="raise"``, AMP or DDP hooks), the identity of the
  optimizer's cached plans and counters (a state dict loaded, parameters moved or re-typed, a
  first step creating state all drop those), and that no state tensor was replaced behind the
  plan's back.

Gradient clipping (``max_grad_norm``) is planned: the descent reuses the norm of ``g1`` it takes
for the finite check, as the unplanned path does.

Plain DDP (torch.distributed initialized, the gradients all-reduced by a
``DistributedDataParallel`` model or otherwise, no AMP or data-parallel helper of ours) is
planned too. The unplanned step performs one collective of its own there: in the descent,
``SAMFamily._gate_ok`` takes the MIN of the finite flag over ``opt.process_group`` (a loss is
each rank's own; a rank that skipped alone would leave the replicas apart), after the flag is
complete (``ok`` of the ascent, which already holds ``finite(L0)``, times ``finite(||g1||)`` and
``finite(L1)``) and before clipping and the base step. The ascent has none (the norm is of the
all-reduced gradients; its flag is only reduced in the descent). So a distributed step runs the
ascent as one op, as a single process does, and the descent as two, with the unplanned path's
all-reduce between them (``SAM._planned_gated_descent``):

.. code-block:: text

    plan_ascent                                      (no collective)
    plan_descent_flag -> ok, ||g1||                  (the flag before the gate)
    _all_reduce_min(ok, opt.process_group)           (_gate_ok's all-reduce, in place)
    plan_descent_apply(ok, ||g1||)                   (clipping, base steps, counters, marks)

Three dispatched ops in the descent (the all-reduce is ``c10d.allreduce_``), four per step;
the same bits as the unplanned path, no host read. Whether a step is distributed is read when
its descent runs, as ``_gate_ok`` reads it.

The ranks never diverge on the collectives, whatever each rank's plan does: every path of a
plain-DDP SAM step, planned or not, performs exactly one all-reduce, the MIN of the same 0-d
flag, at the same point of the step, and a plan only ever falls back where that stays true:

- before the all-reduce (the Python checks, ``plan_ascent`` or ``plan_descent_flag`` finding a
  gradient or parameter changed): nothing written, and the unplanned path from there performs
  the all-reduce itself (an ascent has none, in either path). So one rank may run planned and
  another unplanned in the same step (a rank rebuilding its plan, a gradient missing on one
  rank): the collectives still pair up, and the results are the same bits either way;
- after it (``plan_descent_apply`` checks the plan again; nothing but the all-reduce ran since
  ``plan_descent_flag`` checked it, so this does not happen in practice): nothing written, and
  the step continues as the unplanned base step from after its gate, with the reduced flag
  (``_base_step(..., gated=True)``), never a second all-reduce.

No plan decision is itself a collective or depends on another rank.

Not planned (the unplanned path runs, as before): any other class (but CR-SAM and the universal
class, below) or base optimizer, Triton or eager ops, fp64, a learning rate given as a tensor,
several (adaptive, eta) settings in one optimizer, a group that is not perturbed while others
are, torch.compile tracing, a step under a GradScaler or a data-parallel helper
(``SAMDDPStep``, ``FSDP2SAMStep``).

CR-SAM (:class:`python_api.CRSAM`) uses the same plan (:class:`PlannedSteps`: the same lists,
state, checks and marks) for three ops around its two perturbed evaluations, where its step is
the reference form with ``on_nonfinite="skip"``, no clipping and one process:

.. code-block:: text

    crsam_ascent   ok = finite(||g0||) [* finite(L0)];  b = w;  w += e;  g0 kept;  p.grad = None
    (closure at w + e)
    crsam_middle   g+ collected (missing: zeros; outside the set: dropped) and kept;  ||g+||;
                   w = b - e (from the backups);  p.grad = None
    (closure at w - e)
    crsam_descent  g- collected;  ok *= finite(||g+||, L+, ||g-||, L-);  per group the fused
                   step from the backups with g = c . (g+, g-, g0);  counters;  marks

Only the ascent checks the gradients and may decline (nothing written; the step runs
unplanned). After it the step is committed to the plan: the middle and the descent collect the
gradients as the unplanned step does. If the groups' settings change during the closures (the
key, or a learning rate made a tensor), the base step runs unplanned from the gradients the plan
kept (:meth:`sam_kernels.step_plan.SamStepPlan.kept`). The results are bit-identical to the
unplanned path (tests/optim/test_crsam_plan.py). The universal class (Frob-, Trace-, Det-SAM)
runs on it as an ascent, one op per noisy sample and a descent (python_api/_universal_plan.py).
"""

from __future__ import annotations

from typing import Any

import torch

import sam_kernels as sk
from sam_kernels import same_group_params

_SGD = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
_ADAMW = ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize")


def plan_key(opt: Any) -> tuple:
    """What the plan depends on that the C++ check does not see (cheap: one tuple per group)."""
    return (
        opt.backend,
        opt._fused,
        opt.max_grad_norm,
        opt.on_nonfinite,
        opt._amp is None and opt._dist is None,
        id(opt._param_sig),  # replaced when parameters are re-typed or moved (_follow_params)
        tuple(
            (
                id(g),
                id(g["params"]),
                len(g["params"]),
                g.get("rho", 0.0),
                g.get("sam", True),
                g.get("adaptive", False),
                g.get("eta", 0.0),
                g.get("momentum", 0.0) != 0.0,
                g.get("amsgrad", False),
            )
            for g in opt.param_groups
        ),
    )


def _none() -> None:
    return None


class _NotCopied:
    """Copies and pickles of an optimizer start without a plan (it holds C++ objects and the
    ids of the original's groups): ``copy.deepcopy`` and ``pickle`` give None."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (_none, ())


class Unplanned(_NotCopied):
    """The key under which the step did not qualify for a plan (not tried again under it)."""

    __slots__ = ("key",)

    def __init__(self, key: tuple) -> None:
        self.key = key


class PlanMarks:
    """The stale-gradient marks of a planned step, recorded by its C++ plan at the end of the
    descent (``_closures``'s ``_fresh_grads`` asks it); a copy or a pickle starts with none."""

    __slots__ = ("_step",)

    def __init__(self, step: PlannedStep) -> None:
        self._step = step

    def drop_stale(self, opt: Any) -> bool:
        """Drop the stale gradients of ``opt``'s parameters; True if a fresh one remains."""
        step = self._step
        if plan_key(opt) == step.key:  # the same parameters: no list to pass
            return step.plan.drop_stale_watched()
        return step.plan.drop_stale([p for g in opt.param_groups for p in g["params"]])

    def __deepcopy__(self, memo: dict) -> dict:
        return {}

    def __reduce__(self) -> tuple:
        return (dict, ())


class PlannedStep(_NotCopied):
    """One optimizer's planned SAM step (see the module docstring)."""

    __slots__ = (
        "key",
        "plan",
        "perturbed",
        "groups",
        "_modes",
        "_base",
        "_counters",
        "_state",
        "_watch",
        "_keep",
        "adaptive",
        "norm_params",
    )

    def __init__(self, opt: Any, key: tuple, modes: Any, base: Any, perturbed: list) -> None:
        self.key = key
        self.perturbed = perturbed
        self.groups = [(gp.group, _ADAMW if gp.fn == "adamw_step_" else _SGD) for gp in base.groups]
        self._modes, self._base, self._counters = modes, base, opt._counters
        self._state = (opt.state, opt.base_optimizer.state)
        # the state entries the plan holds, checked by identity on every call (a user's edit, a
        # base optimizer's load_state_dict, a parameter's state reset): the base plan's check
        self._keep = tuple(opt.param_groups)  # the ids in the key stay valid
        self._watch = [p for g in opt.param_groups for p in g["params"]]
        plan = self.plan = sk.SamStepPlan(opt._counters)
        plan.watch(self._watch)
        (adaptive, eta), norm_params = modes.norm[0]
        self.adaptive, self.norm_params = adaptive, list(norm_params)
        if modes.pert:
            _, _, pert_params, _ = modes.pert[0]
            backups = modes.backups(opt)[0]
        else:
            pert_params, backups = [], []
        rho = modes.rho if modes.rho is not None else torch.zeros(0, device=opt._device)
        plan.ascent_lists(norm_params, adaptive, eta, pert_params, backups, rho)
        for gp in base.groups:
            st = gp.state
            backups = st.get("backups") or []
            if gp.fn == "sgd_step_":
                has_m = gp.group["momentum"] != 0.0
                bufs = st["momentum_buffers"] if has_m else []
                plan.add_sgd_group(gp.params, bufs, st["steps"], backups, has_m)
            else:
                ams = bool(gp.group["amsgrad"])
                plan.add_adamw_group(
                    gp.params,
                    st["exp_avgs"],
                    st["exp_avg_sqs"],
                    st["max_exp_avg_sqs"] if ams else [],
                    st["steps"],
                    backups,
                    ams,
                )

    def valid(self, opt: Any, half: str = "ascent") -> bool:
        """The key, the optimizer's cached plans and counters, and the state entries the
        ``half`` of a step writes unchanged: the ascent the backups (and the parameter lists),
        the descent the base state's entries (momentum, moments, step counters). Each half
        checks its own: user code runs between them (the evaluation at ``w + e``, or between
        ``first_step`` and ``second_step``) and may replace or reset a state entry there.
        Before the descent the groups' settings are checked (``_check_settings``: raises on a
        value edited into a group there that the step must not apply)."""
        if half == "descent":
            opt._check_settings()
        return (
            self._plans_stand(opt)
            and opt._counters is self._counters
            and opt.state is self._state[0]
            and opt.base_optimizer.state is self._state[1]
            and (
                self._base.state_intact()
                if half == "descent"
                else self._base.backups_intact()
                # a group's list changed in place (the key has its identity and length)
                and same_group_params(opt.param_groups, self._watch)
            )
        )

    def params_unchanged(self, opt: Any) -> bool:
        """The optimizer's cached plans stand and no parameter was re-typed, moved or
        reshaped: following the parameters' device (``_follow_device``) would change nothing."""
        return self._plans_stand(opt) and self.plan.same_params()

    def _plans_stand(self, opt: Any) -> bool:
        """The optimizer's cached norm/ascent and base plans are the ones this plan was built
        from, and the key is unchanged."""
        return (
            opt._plan is self._base and opt._mode_plan is self._modes and plan_key(opt) == self.key
        )

    def hyper(self) -> list[float] | None:
        """Six floats per base group, read now (an LR scheduler changes them); None when one is
        not a number (a tensor learning rate: the unplanned path takes it)."""
        out: list[float] = []
        for g, names in self.groups:
            beta1, beta2 = g.get("betas", (0.0, 0.0))
            vals = {"beta1": beta1, "beta2": beta2}
            for n in names:
                v = vals[n] if n in vals else g.get(n, False)
                if isinstance(v, torch.Tensor):
                    return None
                out.append(float(v))
        return out


def build(opt: Any) -> PlannedStep | Unplanned | None:
    """The planned step of ``opt`` now; :class:`Unplanned` where the settings rule it out (not
    tried again under the same key), None where it may qualify at a later step (a first step
    creating state, no gradient yet, a tensor learning rate)."""
    if (
        opt._fused is None
        or opt.on_nonfinite != "skip"
        or opt._amp is not None
        or opt._dist is not None
        or torch.compiler.is_compiling()
        or not sk.step_plan_available(opt._device)
    ):
        return Unplanned(plan_key(opt))
    if opt._plan is None or opt._mode_plan is None:
        return None  # the unplanned step builds (and checks) its plans first
    opt._follow_device()
    modes = opt._modes()
    if not modes.norm:
        return None  # no gradient yet
    if len(modes.norm) != 1 or len(modes.pert) > 1 or (modes.pert and modes.pert[0][3] is not None):
        return Unplanned(plan_key(opt))
    (_, _), norm_params = modes.norm[0]
    if any(p.dtype == torch.float64 for p in norm_params):
        return Unplanned(plan_key(opt))
    perturbed = list(modes.pert[0][2]) if modes.pert else []
    modes.backups(opt)
    base = opt._plan
    if base is None or base.key != opt._base_plan_key(perturbed) or not base.intact():
        return None  # the unplanned step rebuilds it (creating state if need be) first
    if base.restore_first or not base.groups:
        return None  # a perturbed parameter without a gradient in the second pass
    if any(gp.state.get("backups") is None for gp in base.groups) and perturbed:
        return Unplanned(plan_key(opt))  # a group not perturbed while others are
    ops = ("grad_norm", "perturb", "adamw_step" if opt._fused == "adamw" else "sgd_step")
    if any(sk.runs_on(op, norm_params, opt.backend) != "ext" for op in ops):
        return Unplanned(plan_key(opt))
    step = PlannedStep(opt, plan_key(opt), modes, base, perturbed)
    return step if step.hyper() is not None else None


def _not_distributed() -> bool:
    return False


#: torch.distributed is initialized (``python_api._hooks._distributed``, without its import and
#: availability check on every call: read once per planned step)
distributed = (
    torch.distributed.is_initialized if torch.distributed.is_available() else _not_distributed
)


class PlannedSteps:
    """What a class whose steps a plan may run shares (:class:`python_api.SAM`,
    :class:`python_api.CRSAM`, the universal class): the plan, found or built
    (:meth:`_current_plan`), the marks its steps leave and its word that no parameter moved (the
    hooks of ``_closures``). Before ``SAMFamily`` in the bases."""

    #: run qualifying steps as the compiled extension's cached step plan (the same results);
    #: False on an instance or the class runs every step unplanned
    plan_steps = True
    #: the planned step, or the settings under which the step did not qualify (not tried again
    #: until they change), or None (not tried yet)
    _step_plan: PlannedStep | Unplanned | None = None
    #: the planned step that ran this step's descent (its plan records the marks)
    _marks_by: PlannedStep | None = None

    def _current_plan(self) -> PlannedStep | None:
        """The plan of this step (checked, or built now); None where the step runs unplanned."""
        plan = self._step_plan
        if isinstance(plan, PlannedStep) and plan.valid(self):
            return plan
        if isinstance(plan, Unplanned) and plan.key == plan_key(self):
            return None  # did not qualify under these settings: not tried again
        plan = self._step_plan = build(self)
        return plan if isinstance(plan, PlannedStep) else None

    def _plan_marks(self) -> PlanMarks | None:
        plan, self._marks_by = self._marks_by, None
        return PlanMarks(plan) if plan is not None else None

    def _params_as_planned(self) -> bool:
        plan = self._step_plan
        return (
            not torch.compiler.is_compiling()
            and isinstance(plan, PlannedStep)
            and plan.params_unchanged(self)
        )
