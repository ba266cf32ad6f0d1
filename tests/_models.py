"""What the optimizer tests share: the awkward model, data, bases and the closure forms of a
step (the comparison helpers are in _helpers.py)."""

from __future__ import annotations

import copy

import torch
from _helpers import HOST_READ_OPS, HostReads
from torch import nn


class AwkwardNet(nn.Module):
    """Linear -> (BN) -> tanh -> linear, with a non-contiguous, a zero-size and an unused
    parameter. Test modules subclass it to add their parameter groups."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 5) * 0.5)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2t = nn.Parameter((torch.randn(8, 3) * 0.5).t())  # non-contiguous
        assert not self.w2t.is_contiguous()
        self.b2 = nn.Parameter(torch.zeros(3))
        self.empty = nn.Parameter(torch.randn(0, 4))  # zero-size
        self.unused = nn.Parameter(torch.randn(4))  # never gets a gradient
        self.bn = nn.BatchNorm1d(8) if bn else None

    def forward(self, x):
        h = x @ self.w1.t() + self.b1
        if self.bn is not None:
            h = self.bn(h)
        h = torch.tanh(h)
        return h @ self.w2t.t() + self.b2 + self.empty.sum()


class GroupedBNNet(AwkwardNet):
    """The awkward model with batch norm (by default) and three parameter groups."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__(bn)

    def group_params(self):
        norm = [self.bn.weight, self.bn.bias] if self.bn is not None else []
        return [[self.w1, self.b1, self.unused], [self.w2t, self.empty], [self.b2, *norm]]

    def groups(self, rhos=(0.05, 0.2, 0.0), **extra):
        return [{"params": ps, "rho": r, **extra} for ps, r in zip(self.group_params(), rhos)]


#: steps of the float64 comparison with the reference (the spec: 1e-6 over 20 steps)
STEPS = 20


def data(n=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, 3, (n,), generator=g)


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def bn_buffers(model):
    return [model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked]


def eval_grads(model, groups, x, y, keep_bn):
    """One evaluation of the float64 references: ``(loss, {param: grad copy})`` at the current
    weights, over ``groups`` (``[(rho, params), ...]``); ``keep_bn`` leaves the BN buffers as
    they were (an evaluation at a perturbed point)."""
    saved = [b.clone() for b in bn_buffers(model)] if keep_bn else None
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = loss_fn(model, x, y)
        loss.backward()
    if saved is not None:
        for b, s in zip(bn_buffers(model), saved):
            b.copy_(s)
    return loss.detach(), {p: p.grad.clone() for _, g in groups for p in g if p.grad is not None}


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)),
}


def snapshot(model, opt):
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["sam_state"].pop("counters")
    return [p.detach().clone() for p in model.parameters()], sd


def poisoned_closure(model, x, y, call, kind):
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model, x, y)
        if len(calls) == call:
            if kind == "loss":  # the loss is NaN, its gradients are finite
                loss.backward()
                return loss.detach() + float("nan")
            loss = loss * float("inf")  # non-finite gradients (and loss)
        loss.backward()
        return loss

    return closure


def bw(loss):
    loss.backward()
    return loss


# ---------------------------------------------------------------- the closure forms of a step
def closure_for(model, x, y):
    """The standard closure: forward and backward at the current weights; the loss."""

    def closure():
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    return closure


def opt_step(opt, model, x, y, form="closure", seed=None, **kw):
    """One step of ``opt`` in one of the closure forms (``kw``: to ``opt.step``).

    ``closure``: no gradients present, the optimizer evaluates at w itself; returns the step's
    value. ``grads``: the user ran the first backward (davda54/sam's loop); returns that loss.
    ``grads_loss``: the same, and the loss is passed as ``loss=``: the step must return it.
    ``grads_only``: the user ran the first backward, no loss passed; returns None.
    ``seed``: the global generator seeded just before the step (after the user's backward).
    """
    closure = closure_for(model, x, y)
    opt.zero_grad()
    if form == "closure":
        if seed is not None:
            torch.manual_seed(seed)
        return opt.step(closure, **kw)
    l0 = closure()
    if seed is not None:
        torch.manual_seed(seed)
    if form == "grads":
        opt.step(closure, **kw)
        return l0
    if form == "grads_loss":
        got = opt.step(closure, loss=l0, **kw)
        assert got.item() == l0.item()
        return got
    assert form == "grads_only", form
    opt.step(closure, **kw)  # gradients present, no loss: L0 re-evaluated only where needed
    return None


def run_with_ref(opt, model, ref, steps, *ref_args, fp32=False, seed=None):
    """``steps`` steps of ``opt`` (closure form) and of the float64 reference ``ref``
    (``ref.step(x, y, *ref_args)``), on ``data(seed=step)``. ``fp32``: the optimizer's inputs in
    float32; ``seed``: the global generator seeded with ``seed + step`` before each of the two."""
    for step in range(steps):
        x, y = data(seed=step)
        s = None if seed is None else seed + step
        opt_step(opt, model, x.float() if fp32 else x, y, "closure", seed=s)
        if s is not None:
            torch.manual_seed(s)
        ref.step(x, y, *ref_args)


def spied_step(opt, model, x, y, form="closure", counted=HOST_READ_OPS):
    """One step in form ``closure`` or ``grads_loss`` (see :func:`opt_step`) with only
    ``opt.step`` under a :class:`HostReads` spy counting ``counted``; the spy."""
    closure = closure_for(model, x, y)
    opt.zero_grad()
    kw = {}
    if form == "grads_loss":
        kw["loss"] = closure()
    else:
        assert form == "closure", form
    with HostReads(counted) as spy:
        opt.step(closure, **kw)
    return spy
