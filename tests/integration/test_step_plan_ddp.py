"""SAM's planned step under plain DDP (python_api/_step_plan.py), with 2 gloo processes on the CPU.

Plain DDP: a ``DistributedDataParallel`` model, torch.distributed initialized, no helper object
of ours. The unplanned step's one collective is the MIN all-reduce of the finite flag in the
descent; the planned step runs the ascent as one op and the descent as two with that
all-reduce between them. One launch of two workers (this file run as a script) trains every
case twice per rank, planned (the default) and unplanned (``plan_steps = False``), from the
same weights on the same shards; the tests require:

- planned and unplanned bit-identical on every rank (weights, the base optimizer's state, the
  counters) for SGD with momentum and AdamW, ``first_step``/``second_step`` and
  ``step(closure)``, ASAM, clipping, DDP's ``gradient_as_bucket_view``;
- a non-finite loss (``L0`` or ``L1``) or gradient (``g0`` or ``g1``) on one rank only: every
  rank skips that step, the replicas stay equal;
- a plan that falls back on one rank only (a gradient missing there in either pass, so the C++
  check of ``plan_ascent`` or ``plan_descent_flag`` fails; or that rank never planned): the
  collectives still pair up (no hang) and the results are the unplanned ones;
- the plan is used: one dispatched op in ``first_step``, three in ``second_step``
  (``plan_descent_flag``, ``c10d.allreduce_``, ``plan_descent_apply``).

The fallback after the all-reduce and a one-rank group over the odd-shaped model of
tests/optim/test_step_plan_ext.py run in process (a one-rank gloo group on a HashStore).
"""

from __future__ import annotations

import sys

import _gloo
import pytest
import torch
from _dist_setup import HP, all_reduces_counted, batch, groups, make_model, shard, snapshot
from _models import loss_fn

from sam_kernels import step_plan

pytestmark = pytest.mark.skipif(
    not step_plan.available("cpu"),
    reason="the compiled extension (with its step plan) is not built",
)

STEPS = 6
#: the step of every injection (on rank 1 only); the plan runs from step 2 on (step 0 creates
#: the base state, step 1 builds the plan's lists)
BAD = 3
FIRST_PLANNED = 2
#: below the gradient norms of these runs: the steps are clipped
CLIP = 0.05
BASES = {
    "sgd": (torch.optim.SGD, HP),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}
#: name -> (optimizer arguments, DDP arguments, injection on rank 1 at step BAD, rank 1 never
#: planned)
VARIANTS = {
    "plain": ({}, {}, None, False),
    "asam": (dict(adaptive=True, eta=0.01), {}, None, False),
    "clip": (dict(max_grad_norm=CLIP), {}, None, False),
    "bucket-view": ({}, dict(gradient_as_bucket_view=True), None, False),
    "nan-loss0": ({}, {}, "loss0", False),
    "nan-loss1": ({}, {}, "loss1", False),
    "nan-g0": ({}, {}, "g0", False),
    "nan-g1": ({}, {}, "g1", False),
    "nan-g1-clip": (dict(max_grad_norm=CLIP), {}, "g1", False),
    "drop-g0": ({}, {}, "drop-g0", False),
    "drop-g1": ({}, {}, "drop-g1", False),
    "rank1-unplanned": ({}, {}, None, True),
}
#: L0 is only looked at by step(closure)
CLOSURE_ONLY = ("nan-loss0",)
#: a non-finite value on rank 1 at step BAD: every rank skips it
SKIPPING = ("nan-loss0", "nan-loss1", "nan-g0", "nan-g1", "nan-g1-clip")
FORMS = ("two-call", "closure")


# ----------------------------------------------------------------- in the workers
def _inject(model, what: str | None, where: str) -> None:
    """Rank 1's injection at step BAD, after the backward of pass ``where`` (g0 or g1): the
    gradients are already all-reduced, so the change is this rank's alone."""
    last = model.module[2]
    if what == where:
        last.weight.grad[0, 0] = float("nan")
    elif what == "drop-" + where:
        last.bias.grad = None  # the plan expects it: its C++ check fails on this rank only


class _Calls:
    """Counts the plan's calls that ran (``sam_kernels.SamStepPlan`` methods wrapped)."""

    NAMES = ("ascent", "descent", "descent_flag", "descent_apply")

    def __init__(self) -> None:
        self.ran = dict.fromkeys(self.NAMES, 0)

    def __enter__(self):
        cls = step_plan.SamStepPlan
        self._orig = {n: getattr(cls, n) for n in self.NAMES}
        for n, fn in self._orig.items():

            def wrapped(plan, *a, _fn=fn, _n=n, **kw):
                out = _fn(plan, *a, **kw)
                if out is not None and out is not False:
                    self.ran[_n] += 1
                return out

            setattr(cls, n, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for n, fn in self._orig.items():
            setattr(step_plan.SamStepPlan, n, fn)


def _train(rank: int, base: str, form: str, variant: str, planned: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from python_api import SAM

    kw, ddp_kw, inject, rank1_unplanned = VARIANTS[variant]
    torch.manual_seed(0)
    model = DDP(make_model(), **ddp_kw)
    cls, hp = BASES[base]
    opt = SAM(groups(model.module), cls, **{**hp, **kw})
    opt.plan_steps = planned and not (rank1_unplanned and rank == 1)
    with _Calls() as calls:
        for s in range(STEPS):
            x, y = shard(*batch(s), rank)
            what = inject if (s == BAD and rank == 1) else None
            if form == "two-call":
                opt.zero_grad()
                loss_fn(model, x, y).backward()
                _inject(model, what, "g0")
                opt.first_step(zero_grad=True)
                l1 = loss_fn(model, x, y)
                l1.backward()
                _inject(model, what, "g1")
                if what == "loss1":
                    opt.second_step(zero_grad=True, loss=l1.detach() + float("nan"))
                else:
                    opt.second_step(zero_grad=True)
            else:
                evals = []

                def closure(x=x, y=y, what=what, evals=evals):
                    evals.append(1)
                    where = "g0" if len(evals) == 1 else "g1"
                    opt.zero_grad()
                    loss = loss_fn(model, x, y)
                    loss.backward()
                    _inject(model, what, where)
                    if what == "loss" + where[1]:  # the value only: its gradient stays finite
                        loss = loss + torch.tensor(float("nan"))
                    return loss

                opt.step(closure)
    state = []
    for p in model.module.parameters():
        st = opt.base_optimizer.state.get(p, {})
        state.append({k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()})
    return {
        "params": snapshot(model.module),
        "state": state,
        "counters": opt._counters.clone(),
        "calls": calls.ran,
    }


def _scenario(base: str, form: str):
    def run(rank: int) -> dict:
        out = {}
        for variant in VARIANTS:
            if variant in CLOSURE_ONLY and form != "closure":
                continue
            out[variant] = {
                "planned": _train(rank, base, form, variant, True),
                "unplanned": _train(rank, base, form, variant, False),
            }
        return out

    return run


def _scenario_ops(rank: int) -> dict:
    """The dispatched ops of planned DDP steps (each form, after the steps that build the
    plan); the closure's forward and backward are not counted."""
    from _helpers import DispatchedOps as Ops
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils._python_dispatch import _disable_current_modes

    from python_api import SAM

    out = {}
    for base in BASES:
        torch.manual_seed(0)
        model = DDP(make_model())
        cls, hp = BASES[base]
        opt = SAM(groups(model.module), cls, **hp)
        first, second, closure_ops = [], [], []
        for s in range(5):
            x, y = shard(*batch(s), rank)
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            with Ops() as a:
                opt.first_step()
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            with Ops() as b:
                opt.second_step()
            first.append(a.ops)
            second.append(b.ops)

            def closure(x=x, y=y):
                with _disable_current_modes():
                    opt.zero_grad()
                    loss = loss_fn(model, x, y)
                    loss.backward()
                    return loss

            with Ops() as c:
                opt.step(closure)
            closure_ops.append(c.ops)
        out[base] = {"first": first, "second": second, "closure": closure_ops}
    return out


SCENARIOS = {f"{base}-{form}": _scenario(base, form) for base in BASES for form in FORMS}
SCENARIOS["ops"] = _scenario_ops


# ----------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return _gloo.launch(__file__, tmp_path_factory.mktemp("plan_ddp"))


def _equal(a: dict, b: dict, what: str) -> None:
    for i, (p, q) in enumerate(zip(a["params"], b["params"])):
        assert torch.equal(p, q), (what, "param", i)
    for i, (s, t) in enumerate(zip(a["state"], b["state"])):
        assert s.keys() == t.keys(), (what, "state", i)
        for k in s:
            assert torch.equal(torch.as_tensor(s[k]), torch.as_tensor(t[k])), (what, i, k)
    assert torch.equal(a["counters"], b["counters"]), (what, a["counters"], b["counters"])


CASES = [
    (base, form, variant)
    for base in BASES
    for form in FORMS
    for variant in VARIANTS
    if not (variant in CLOSURE_ONLY and form != "closure")
]


@pytest.mark.parametrize(("base", "form", "variant"), CASES)
def test_planned_equals_unplanned_on_every_rank(dist_results, base, form, variant):
    runs = _gloo.results_of(dist_results, f"{base}-{form}")
    for rank, run in enumerate(runs):
        _equal(run[variant]["planned"], run[variant]["unplanned"], (rank, variant))
        assert sum(run[variant]["unplanned"]["calls"].values()) == 0
    calls = [run[variant]["planned"]["calls"] for run in runs]
    assert all(c["descent"] == 0 for c in calls)  # the single-process descent never runs
    planned = STEPS - FIRST_PLANNED
    _, _, inject, rank1_unplanned = VARIANTS[variant]
    # rank 0 plans every step from FIRST_PLANNED on (its own plan never fails)
    assert calls[0]["ascent"] == calls[0]["descent_apply"] == planned, calls
    if rank1_unplanned:
        assert calls[1] == dict.fromkeys(_Calls.NAMES, 0)
    elif inject in ("drop-g0", "drop-g1"):
        # step BAD fell back on rank 1 (in its ascent or before its all-reduce); the plan is
        # rebuilt at the next step: BAD + 1 runs unplanned there, then planned again
        assert calls[1]["descent_flag"] == calls[1]["descent_apply"] == planned - 2, calls
        assert calls[1]["ascent"] == planned - 2 + (inject == "drop-g1"), calls
    else:
        assert calls[1] == calls[0], calls


@pytest.mark.parametrize(("base", "form", "variant"), CASES)
def test_replicas_step_or_skip_together(dist_results, base, form, variant):
    r0, r1 = (run[variant]["planned"] for run in _gloo.results_of(dist_results, f"{base}-{form}"))
    skipped = 1 if variant in SKIPPING else 0
    for r in (r0, r1):
        assert r["counters"].tolist() == [STEPS - skipped, skipped], (variant, r["counters"])
    if variant == "drop-g1":
        # rank 1 restored the last bias at step BAD without stepping it (as unplanned: a
        # parameter with no gradient is not stepped); everything else stays equal
        diff = [not torch.equal(p, q) for p, q in zip(r0["params"], r1["params"])]
        assert diff == [False, False, False, True]
    else:
        for p, q in zip(r0["params"], r1["params"]):
            assert torch.equal(p, q), variant


def test_dispatched_ops_per_planned_step(dist_results):
    plan_ops = [
        "sam_kernels_C.plan_descent_flag.default",
        "c10d.allreduce_.default",
        "sam_kernels_C.plan_descent_apply.default",
    ]
    for run in _gloo.results_of(dist_results, "ops"):
        for base, ops in run.items():
            for s in range(FIRST_PLANNED, 5):
                assert ops["first"][s] == ["sam_kernels_C.plan_ascent.default"], (base, s)
                assert ops["second"][s] == plan_ops, (base, s)
                # step(closure): the two losses detached (the closure's own ops not counted;
                # the profiler's record_function of torch's Optimizer.step wrapper left out)
                work = [op for op in ops["closure"][s] if not op.startswith("profiler.")]
                assert work == [
                    "aten.detach.default",
                    "sam_kernels_C.plan_ascent.default",
                    "aten.detach.default",
                    *plan_ops,
                ], (base, s)


# ----------------------------------------------------------------- in process (one rank)
def test_fallback_after_the_all_reduce_reduces_once():
    """``plan_descent_apply`` finding a gradient gone (here: dropped inside the all-reduce,
    where nothing of the step can drop it) writes nothing; the step ends as the unplanned base
    step from after its gate, with no second all-reduce: the same bits as the unplanned step
    with the same gradient dropped at the same point."""
    import python_api._hooks as hooks
    import python_api.sam as sam_mod
    from python_api import SAM
    from python_api._step_plan import PlannedStep

    models = [make_model(), make_model()]
    opts = [SAM(groups(m), torch.optim.SGD, **HP) for m in models]
    opts[1].plan_steps = False
    real = hooks._all_reduce_min
    drop = [False]

    def reduce_and_drop(model):
        def fn(flag, group=None, **kw):
            out = real(flag, group, **kw)
            if drop[0]:
                model[2].bias.grad = None
            return out

        return fn

    with all_reduces_counted(True) as calls:
        for s in range(7):
            drop[0] = s == 4
            for model, opt, mod in zip(models, opts, (sam_mod, hooks)):
                x, y = batch(s)
                n = len(calls)
                orig = mod._all_reduce_min
                mod._all_reduce_min = reduce_and_drop(model)
                try:
                    opt.zero_grad()
                    loss_fn(model, x, y).backward()
                    opt.first_step(zero_grad=True)
                    loss_fn(model, x, y).backward()
                    opt.second_step(zero_grad=True)
                finally:
                    mod._all_reduce_min = orig
                assert len(calls) == n + 1, (s, opt.plan_steps)
            if s == 3:
                assert isinstance(opts[0]._step_plan, PlannedStep)
            if s == 4:
                assert opts[0]._step_plan is None  # dropped by the fallback
            for p, q in zip(models[0].parameters(), models[1].parameters()):
                assert torch.equal(p, q), s
            assert torch.equal(opts[0]._counters, opts[1]._counters)
    # planned again (step 5 runs unplanned and rebuilds the base plan, step 6 the step plan)
    assert isinstance(opts[0]._step_plan, PlannedStep)


if __name__ == "__main__" and _gloo.is_worker_call(sys.argv):
    _gloo.worker_main(sys.argv, SCENARIOS)
