"""What the tests of the planned steps share (tests/optim/test_crsam_plan.py,
tests/optim/test_universal_plan.py): the base optimizers, a small model with awkward parameters,
its data and closure, and the loop that trains a planned and an unplanned copy side by side and
compares them bit for bit after every step."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from _helpers import DispatchedOps
from torch import nn

from python_api import _step_plan as sp

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=1e-3)),
    "sgd-nesterov-maximize": (
        torch.optim.SGD,
        dict(lr=0.005, momentum=0.8, nesterov=True, maximize=True),
    ),
    "sgd-no-momentum": (torch.optim.SGD, dict(lr=0.02)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.95), amsgrad=True)),
}


class Net(nn.Module):
    """Odd shapes, a one-element parameter, a non-contiguous one, and one (``gated``) that only
    a loss with ``use_gated`` depends on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.scale = nn.Parameter(torch.ones(1))
        self.t = nn.Parameter(torch.randn(7, 3).t())  # a transposed (non-contiguous) weight
        self.gated = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor, use_gated: bool = True) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        out = (self.fc(h) * self.scale) @ self.t.t()
        return out + self.gated if use_gated else out


def make_pair(
    net: Callable[[], nn.Module],
    opt_cls: type,
    base: tuple[type, dict],
    groups: Callable | None = None,
    dtype=torch.float32,
    device="cpu",
    **kw,
):
    """Two identical models and optimizers of ``opt_cls`` over the ``base`` (class, kwargs):
    planned (the default) and unplanned (``plan_steps = False``). Off the CPU the extension is
    asked for by name (not the default there)."""
    torch.manual_seed(0)
    if device != "cpu":
        kw.setdefault("backend", "ext")
    m = net().to(device, dtype)
    r = copy.deepcopy(m)
    cls, hp = base
    opts = []
    for model in (m, r):
        params = groups(model) if groups is not None else model.parameters()
        opts.append(opt_cls(params, cls, **{**hp, **kw}))
    opts[1].plan_steps = False
    return m, r, opts[0], opts[1]


def data(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 6, 6, generator=g).to(dtype), torch.randn(6, 3, generator=g)


def on_model(model, x, y):
    """The batch on the model's device (the GPU run trains the pairs on CUDA too)."""
    device = model.fc.weight.device
    return x.to(device), y.to(device)


def closure_of(model, opt, x, y, calls=None, use_gated=lambda k: True, on_call=None):
    """A closure over ``model``; ``calls`` (a list) records the closure's calls, ``use_gated(k)``
    and ``on_call(k, opt)`` act on call ``k``."""
    x, y = on_model(model, x, y)

    def closure():
        k = len(calls) if calls is not None else 0
        if calls is not None:
            calls.append(k)
        if on_call is not None:
            on_call(k, opt)
        opt.zero_grad()
        loss = (model(x, use_gated(k)).float() - y).square().mean()
        loss.backward()
        return loss

    return closure


def nonfinite_closure(model, opt, x, y, where: int, kind: str):
    """A closure whose call ``where`` returns an infinite loss (``kind="loss"``) or leaves a NaN
    in a gradient (``kind="grad"``)."""
    x, y = on_model(model, x, y)
    calls: list[int] = []

    def closure():
        k = len(calls)
        calls.append(k)
        opt.zero_grad()
        loss = (model(x).float() - y).square().mean()
        if k == where and kind == "loss":
            loss = loss * float("inf")
            loss.backward()
            return loss
        loss.backward()
        if k == where:
            model.fc.weight.grad[0, 0] = float("nan")
        return loss

    return closure


def raise_at_call(model, opt, at: int) -> None:
    """One step whose closure raises at call ``at``: the error propagates, and the weights and
    the base optimizer's state are as they were before it."""
    before = [p.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.base_optimizer.state[model.fc.weight].items()}

    def boom(k, o):
        if k == at:
            raise RuntimeError("boom")

    x, y = data(30)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure_of(model, opt, x, y, calls=[], on_call=boom))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for k, v in opt.base_optimizer.state[model.fc.weight].items():
        assert torch.equal(v, state[k]), k


def lr_made_a_tensor(pairs, same: Callable, before_step: Callable[[int], None] | None = None):
    """One step of both copies in which the closure's call 2 makes the first group's learning
    rate a tensor (the groups change during the closures), then the copies compared."""

    def to_tensor(k, o):
        if k == 2:
            o.param_groups[0]["lr"] = torch.tensor(0.02)

    m, r, opt, ref = pairs
    x, y = data(20)
    for model, o in ((m, opt), (r, ref)):
        if before_step is not None:
            before_step(20)
        o.step(closure_of(model, o, x, y, calls=[], on_call=to_tensor))
    same(m, r, opt, ref)


def planned(opt) -> bool:
    return isinstance(opt._step_plan, sp.PlannedStep)


def train_pair(
    pairs,
    steps: int,
    *,
    descent: str,
    plan_ops: tuple[str, ...],
    same: Callable,
    dtype=torch.float32,
    user_backward: bool = False,
    before_step: Callable[[int], None] | None = None,
    **closure_kw,
) -> int:
    """``steps`` steps of both copies ``pairs = (model, ref_model, opt, ref_opt)``, compared by
    ``same`` after each; returns how many of the planned copy's steps ran their plan's
    ``descent`` op (the unplanned copy may run none of ``plan_ops``). ``before_step(s)`` runs
    before each copy's step ``s`` (e.g. seeding the global generator alike for both)."""
    m, r, opt, ref = pairs
    count = 0
    for s in range(steps):
        x, y = data(s, dtype)
        for model, o in ((m, opt), (r, ref)):
            if before_step is not None:
                before_step(s)
            if user_backward:  # davda54's loop: the user's own backward gives g0
                o.zero_grad()
                xd, yd = on_model(model, x, y)
                (model(xd).float() - yd).square().mean().backward()
            with DispatchedOps() as seen:
                o.step(closure_of(model, o, x, y, **closure_kw))
            if o is opt:
                count += seen.ops.count(descent)
            else:
                assert not any(op in plan_ops for op in seen.ops)
        same(m, r, opt, ref)
    return count
