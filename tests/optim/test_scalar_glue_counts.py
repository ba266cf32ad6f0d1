"""The scalar glue of a step is fused (issue 14, item 3): ops dispatched per step on the
extension's CPU backend, counted with :class:`_helpers.DispatchedOps` over 161 one-element
parameters (SGD momentum, fused), so that glue creeping back fails here.

Measured with the fused flag (``finite_and``), scale (``ascent_scale``) and counters
(``count_step_``): CR-SAM 22 per step (51 before: ``(x - x) == 0`` casts and products, the
reciprocal chain, ``neg``, ``rsub``/``stack``/``add_``), its log form 55 (84), unplanned SAM 16
(35), Frob-SAM 378 (404; 322 of them the step-local ``empty_like`` buffers of its two sums).
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
BUDGET = {"CRSAM": 22, "CRSAM-log": 55, "SAM-unplanned": 16, "FrobSAM": 378}
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
