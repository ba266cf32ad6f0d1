"""The scalar glue of a step is fused (issue 14, item 3): ops dispatched per step on the
extension's CPU backend, counted with :class:`_helpers.DispatchedOps` over 161 one-element
parameters (SGD momentum, fused), so that glue creeping back fails here.

Measured with the fused flag (``finite_and``), scale (``ascent_scale``) and counters
(``count_step_``): CR-SAM 22 per step (51 before: ``(x - x) == 0`` casts and products, the
reciprocal chain, ``neg``, ``rsub``/``stack``/``add_``), its log form 55 (84), unplanned SAM 16
(35), Frob-SAM unplanned 50 (404, then 378 with 322 of them the step-local ``empty_like``
buffers of its two sums, 58 with one ``empty_like_list`` per sum; planned it is n + 2 ops of its
own, tests/optim/test_universal_plan.py).

The ops per step do not grow with the tensor count either (issue 14: host work per tensor):
Frob-SAM (its step-local sums), FriendlySAM (its scratch ``d`` and the skip's zeroing of
``g0``), GSAM (its ``dot``, an extension op) and R-SAM (its ``filter_noise_perturb_``, an
extension op, and its delta scratch) dispatch as many ops over 100 tensors as over 10.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _helpers import DispatchedOps

import python_api as pa
import sam_kernels as sk

pytestmark = pytest.mark.skipif(
    not sk.available("ext", "cpu"), reason="the compiled extension is not built"
)

N_PARAMS = 161
#: the most ops one step may dispatch (the figures measured with the fused glue)
BUDGET = {"CRSAM": 22, "CRSAM-log": 55, "SAM-unplanned": 16, "FrobSAM": 50}
#: the glue the fused ops replaced: none of it may be dispatched by these steps
GLUE = ("aten.sub.Tensor", "aten.eq.Scalar", "aten.reciprocal.default", "aten.rsub.Scalar")


def _opt(name: str):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(N_PARAMS)]
    grads = [torch.randn(3) for _ in ps]
    cls, kw = {
        "CRSAM": (pa.CRSAM, {}),
        "CRSAM-log": (pa.CRSAM, {"log_form": True}),
        "SAM-unplanned": (pa.SAM, {}),
        "FrobSAM": (pa.FrobSAM, {"seed": 1}),
    }[name]
    opt = cls(ps, torch.optim.SGD, lr=0.1, momentum=0.9, fused=True, backend="ext", **kw)
    opt.plan_steps = False  # SAM: the unplanned step (the plan is 2 ops, tested elsewhere)
    loss = torch.tensor(1.0)

    def closure():
        for p, g in zip(ps, grads):
            p.grad = g  # the same tensors every time (the step only reads them): no op here
        return loss

    return opt, closure


@pytest.mark.parametrize("name", list(BUDGET))
def test_ops_per_step_on_the_extension(name):
    opt, closure = _opt(name)
    for _ in range(3):  # plans and buffers built
        opt.step(closure)
    with DispatchedOps() as seen:
        opt.step(closure)
    counts = Counter(seen.ops)
    assert len(seen.ops) <= BUDGET[name], (len(seen.ops), counts)
    if name in ("CRSAM", "SAM-unplanned"):  # (the others' coefficients: arithmetic of their own)
        assert not set(GLUE) & set(counts), counts
    assert opt.steps_taken == 4


def _counted_step(cls, n_tensors: int, **kw) -> Counter:
    """The ops one step dispatches over ``n_tensors`` (8, 8) parameters, plans and buffers
    built by two steps first. The closure hands out gradient tensors made before the count
    (a fresh set per evaluation: FriendlySAM zeroes ``g0`` on a skip), so it dispatches
    nothing itself."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(n_tensors)]
    grads = [torch.randn(8, 8) for _ in ps]
    opt = cls(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend="ext", **kw)
    loss = torch.tensor(1.0)
    sets: list[list[torch.Tensor]] = []

    def closure():
        for p, g in zip(ps, sets.pop()):
            p.grad = g
        return loss

    for counted in (False, False, True):
        sets[:] = [[g.clone() for g in grads] for _ in range(4)]  # more than a step evaluates
        opt.zero_grad(set_to_none=True)
        if not counted:
            opt.step(closure)
    with DispatchedOps() as seen:
        opt.step(closure)
    return Counter(seen.ops)


@pytest.mark.parametrize(
    "cls, kw",
    [
        (pa.FrobSAM, {"seed": 1}),
        (pa.TraceSAM, {"seed": 1}),
        (pa.FriendlySAM, {}),
        (pa.GSAM, {}),
        (pa.RSAM, {"seed": 1}),
    ],
    ids=["FrobSAM", "TraceSAM", "FriendlySAM", "GSAM", "RSAM"],
)
def test_ops_per_step_do_not_grow_with_the_tensor_count(cls, kw):
    small, large = _counted_step(cls, 10, **kw), _counted_step(cls, 100, **kw)
    grown = {op: (small[op], large[op]) for op in set(small) | set(large) if small[op] != large[op]}
    assert not grown, grown


#: the ops a planned step runs inside its own ops (each a kernel launch or two on a GPU: the
#: norm's partials and their sum), in order; no ATen glue between them (a ``to`` or ``reshape``
#: that copies nothing launches nothing)
INSIDE_PLAN = {
    "SAM": [
        ["grad_norm", "finite_and", "ascent_scale", "perturb_"],
        ["grad_norm", "finite_and", "sgd_step_", "count_step_"],
    ],
    "CRSAM": [
        ["grad_norm", "finite_and", "ascent_scale", "perturb_"],
        ["grad_norm", "perturb_"],
        ["grad_norm", "finite_and", "sgd_step_", "count_step_"],
    ],
}
NO_LAUNCH = ("aten::to", "aten::reshape", "aten::view")
COPIES = ("aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")


def _below(e) -> list[str]:
    """The names of every op below profiler event ``e``."""
    return [n for c in e.cpu_children for n in (c.name, *_below(c))]


@pytest.mark.parametrize("name", list(INSIDE_PLAN))
def test_planned_step_runs_only_the_extensions_ops(name):
    from torch.profiler import ProfilerActivity, profile

    opt, closure = _opt("SAM-unplanned" if name == "SAM" else name)
    opt.plan_steps = True
    for _ in range(3):  # plans and buffers built
        opt.step(closure)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step(closure)
    plan_ops = [
        e
        for e in prof.events()
        if e.name.startswith("sam_kernels_C::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("sam_kernels_C::"))
    ]
    inside = []
    for e in plan_ops:
        names = []
        for c in e.cpu_children:
            if c.name in NO_LAUNCH:
                # a dtype or shape no-op: nothing copied below it
                assert not set(_below(c)) & set(COPIES), (e.name, c.name, _below(c))
                continue
            names.append(c.name.removeprefix("sam_kernels_C::"))
        inside.append(names)
    assert inside == INSIDE_PLAN[name], [e.name for e in plan_ops]
    assert opt.steps_taken == 4
