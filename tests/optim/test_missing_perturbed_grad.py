"""A parameter with a gradient at ``w`` but none at the perturbed point (a mixture of experts'
expert that gets no token at ``w + e``).

SAM and the references' ``base.step()`` leave such a parameter as it was: torch skips a
parameter whose ``.grad`` is None, so its weights, momentum and weight decay are untouched. The
classes that descend along the perturbed gradient alone (the switching classes' SAM steps,
GSAM, FriendlySAM, R-SAM, ESAM) do the same: the parameter is restored from its backup and not
stepped. Before, they filled its gradient with zeros and stepped it along its momentum and
weight decay (GSAM: along ``-alpha * g0``). CR-SAM and the universal class combine several
evaluations into one gradient and keep zeros for a missing term (python_api/_perturbation.py,
``_collect_grads``).
"""

from __future__ import annotations

import pytest
import torch
from _optim_table import FORWARD_ONLY, Net, batches, build
from torch import nn

#: the classes whose base step is along the gradient at the perturbed point alone
DESCENT_ALONE = [
    "SAM",
    "ASAM",
    "AESAM",
    "AELookSAM",
    "LookSAM",
    "SSSAM",
    "ESAM",
    "GSAM",
    "RSAM",
    "FriendlySAM",
]


class ExpertNet(Net):
    """The generic tests' model with an "expert" whose term is in the loss only where the step
    says so (``use_expert``)."""

    def __init__(self) -> None:
        super().__init__()
        self.expert = nn.Parameter(torch.randn(6) * 0.3)
        self.use_expert = True

    def expert_term(self, x: torch.Tensor) -> torch.Tensor:
        return 0.1 * (x @ self.expert).pow(2)  # per example

    def groups(self):
        gs = super().groups()
        gs[0]["params"].append(self.expert)
        return gs


def _closure(name: str, model: ExpertNet, x, y, calls: list[int]):
    def closure():
        calls[0] += 1
        at_w = calls[0] == 1  # the step's first evaluation is at w
        per_example = nn.functional.cross_entropy(model(x), y, reduction="none")
        if at_w or model.use_expert:
            per_example = per_example + model.expert_term(x)
        if name in FORWARD_ONLY:
            return per_example
        loss = per_example.mean()
        loss.backward()
        return loss

    return closure


def _state_of(opt, p) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in opt.base_optimizer.state.get(p, {}).items()}


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", DESCENT_ALONE)
def test_a_parameter_without_a_gradient_at_w_plus_e_is_not_stepped(name, base):
    torch.manual_seed(0)
    model = ExpertNet()
    opt = build(name, base, model)
    data = batches(8)
    perturbed_steps = 0
    for i, (x, y) in enumerate(data):
        # two steps with the expert everywhere: it has momentum / moments to keep
        model.use_expert = i < 2
        w_before = model.expert.detach().clone()
        st_before = _state_of(opt, model.expert)
        other_before = model.l1.weight.detach().clone()
        calls = [0]
        opt.zero_grad()
        opt.step(_closure(name, model, x, y, calls))
        assert not torch.equal(model.l1.weight, other_before), "the step was not taken"
        if i < 2:
            continue
        if calls[0] == 1:
            # a one-pass step (a switching class's cheap step): the expert's gradient at w is
            # the step's gradient
            assert not torch.equal(model.expert, w_before)
            continue
        perturbed_steps += 1
        assert torch.equal(model.expert, w_before), f"step {i}: the expert moved"
        st_after = _state_of(opt, model.expert)
        assert st_after.keys() == st_before.keys()
        for k in st_before:
            assert torch.equal(st_after[k], st_before[k]), f"step {i}: its {k} changed"
    assert perturbed_steps > 0


def test_gsam_cosine_over_the_parameters_of_g1():
    """GSAM's cosine and ratio use ||g0|| over the parameters that have g1, as the reference's
    norms skip a parameter whose .grad is None at w + e: the step equals the spec's formula on
    those parameters."""
    torch.manual_seed(2)
    model = ExpertNet()
    model.bn.eval()  # no batch statistics: the loss is a function of the weights alone
    opt = build("GSAM", "sgd", model, momentum=0.0, weight_decay=0.0, lr=0.1)
    (x, y) = batches(1)[0]
    model.use_expert = False
    ps = [p for g in opt.param_groups for p in g["params"]]
    w0 = [p.detach().clone().double() for p in ps]

    def grads_at(ws, with_expert):
        with torch.no_grad():
            for p, w in zip(ps, ws):
                p.copy_(w)
        model.zero_grad()
        per = nn.functional.cross_entropy(model(x), y, reduction="none")
        if with_expert:
            per = per + model.expert_term(x)
        per.mean().backward()
        return [None if p.grad is None else p.grad.detach().double().clone() for p in ps]

    g0 = grads_at(w0, True)
    # the perturbation: the optimizer's own, read back from its first evaluation
    with torch.no_grad():
        for p, w in zip(ps, w0):
            p.copy_(w)
    opt.zero_grad()
    opt.step(_closure("GSAM", model, x, y, [0]))
    w_after = [p.detach().double() for p in ps]
    # the spec's formula over the parameters with g1 (the expert has none); e per group's rho
    alpha = opt.alpha
    rhos = [g["rho"] for g in opt.param_groups for _ in g["params"]]
    n0_all = torch.sqrt(sum((g * g).sum() for g in g0 if g is not None))
    e = [None if g is None else g * (r / (n0_all + 1e-12)) for g, r in zip(g0, rhos)]
    g1 = grads_at([w if ei is None else w + ei for w, ei in zip(w0, e)], False)
    have = [i for i, g in enumerate(g1) if g is not None and g0[i] is not None]
    dot = sum((g0[i] * g1[i]).sum() for i in have)
    n0 = torch.sqrt(sum((g0[i] * g0[i]).sum() for i in have))
    n1 = torch.sqrt(sum((g1[i] * g1[i]).sum() for i in have))
    cos = dot / (n1 * n0 + 1e-12)
    lr = opt.param_groups[0]["lr"]
    for i in range(len(ps)):
        if i not in have:
            if g0[i] is not None:  # the expert: restored, not stepped
                assert torch.equal(w_after[i], w0[i]), i
            continue
        vertical = g0[i] - cos * n0 * g1[i] / (n1 + 1e-12)
        want = w0[i] - lr * (g1[i] - alpha * vertical)
        torch.testing.assert_close(w_after[i], want, rtol=1e-5, atol=1e-6)
