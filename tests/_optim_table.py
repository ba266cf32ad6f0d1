"""The one optimizer table (python_api/optimizer_table.py) as the generic tests use it: every
class's constructor arguments and host-read allowance, a small model with awkward parameters
and three groups, batches, and the closure each class expects. Used by test_optim_common (the
table-driven tests) and the clipping, integrity, scheduler, state-dict, conventions,
integration, extension and distributed tests built on it."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from python_api.optimizer_table import OPTIMIZERS

# the one optimizer table (python_api/optimizer_table.py) drives every generic test:
# id -> (module, class, constructor kwargs, host reads allowed per step)
# (the standalone classes, which replace a base instead of wrapping one, have their own files)
SPECS = {
    o.id: (o.module, o.cls, o.test_kwargs, o.host_reads) for o in OPTIMIZERS if not o.standalone
}
NAMES = list(SPECS)
RANDOM = {o.id for o in OPTIMIZERS if o.global_noise}  # draw from the global generator on eager
FORWARD_ONLY = {o.id for o in OPTIMIZERS if o.closure == "forward-only"}  # ESAM
SEEDED = {o.id for o in OPTIMIZERS if o.seeded}  # their own generators advance by a step's draws
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}


def opt_class(name):
    mod, cls, _, _ = SPECS[name]
    return getattr(importlib.import_module(mod), cls)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 10)
        self.bn = nn.BatchNorm1d(10)
        self.w2t = nn.Parameter((torch.randn(10, 3) * 0.3).t())  # non-contiguous
        self.b2 = nn.Parameter(torch.zeros(3))
        self.empty = nn.Parameter(torch.randn(0, 2))  # zero-size
        self.unused = nn.Parameter(torch.randn(5))  # never a gradient

    def forward(self, x):
        h = torch.relu(self.bn(self.l1(x)))
        return h @ self.w2t.t() + self.b2 + self.empty.sum()

    def groups(self):
        return [
            {"params": [self.l1.weight, self.w2t, self.empty, self.unused]},
            {"params": [self.b2], "rho": 0.0},  # in the norm, never perturbed
            {"params": [self.l1.bias, self.bn.weight, self.bn.bias], "rho": 0.02},
        ]


def batches(n=8, bs=12):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(bs, 6, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)
    ]


def build(name, base, model, **extra):
    _, _, kw, _ = SPECS[name]
    cls, hp = BASES[base]
    return opt_class(name)(model.groups(), cls, model=model, **{**kw, **hp, **extra})


def make_closure(name, model, x, y, hook=None):
    """The closure the class expects (ESAM: forward only, per-example losses)."""
    if name in FORWARD_ONLY:

        def closure():
            if hook:
                hook()
            return nn.functional.cross_entropy(model(x), y, reduction="none")

        return closure

    def closure():
        if hook:
            hook()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def run_steps(name, model, opt, data, hook=None):
    for x, y in data:
        opt.zero_grad()
        opt.step(make_closure(name, model, x, y, hook))
