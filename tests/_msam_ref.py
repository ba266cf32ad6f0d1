"""The Momentum-SAM tests' float64 reference and setup (test_msam, test_msam_clipping).

``RefMSAM`` re-implements MarlonBecker/MSAM ``optimizer/msam.py`` and ``optimizer/adamW_msam.py``
per parameter in float64 (several groups, the norm global, each parameter moved back by the
scale it was moved down with). It was checked against the real reference code over 20 steps on
a small MLP (one group, as the reference supports; SGD with momentum 0.9 and 0, AdamW with two
settings) in a scratch folder outside the project: max relative difference 1.7e-15 at the
moved-down point and 5.1e-16 at ``w`` after the reference's ``move_back_from_momentumAscent``.
"""

from __future__ import annotations

import copy
import math

import torch
from _helpers import METADATA_OPS, HostReads
from _models import GroupedBNNet, data, loss_fn

from python_api.msam import MSAM, AdamWMSAM

EPS = 1e-12
CLASSES = {"sgd": MSAM, "adamw": AdamWMSAM}
#: three groups: different hyper-parameters, a momentum-0 / no-decay group, a rho=0 group
HPS = {
    "sgd": [
        dict(lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3),
        dict(lr=0.05, momentum=0.0, weight_decay=5e-3, rho=0.1),
        dict(lr=0.2, momentum=0.5, weight_decay=0.0, rho=0.0),
    ],
    "adamw": [
        dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, rho=1.0),
        dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, rho=0.5),
        dict(lr=5e-3, betas=(0.0, 0.9), eps=1e-8, weight_decay=0.0, rho=0.0),
    ],
}


# ---------------------------------------------------------------- the independent reference
class RefMSAM:
    """Per-parameter float64 Momentum-SAM (``form`` 'sgd' or 'adamw'), no sam_kernels.

    ``groups``: ``[(hp, [params])]``. Parameters whose ``.grad`` is None are left alone.
    """

    def __init__(self, groups, form):
        self.groups, self.form, self.state = groups, form, {}

    @torch.no_grad()
    def step(self):
        active = [(hp, [p for p in ps if p.grad is not None]) for hp, ps in self.groups]
        for hp, ps in active:
            lr, wd = hp["lr"], hp["weight_decay"]
            for p in ps:
                st = self.state.setdefault(
                    p, {"v": torch.zeros_like(p), "u": torch.zeros_like(p), "t": 0, "s": 0.0}
                )
                g = p.grad.double()
                if self.form == "sgd":
                    d = g + wd * p  # at the moved-down point, as msam.py
                    p.add_(st["s"] * st["v"])
                    st["v"] = hp["momentum"] * st["v"] + d
                    p.sub_(lr * st["v"])
                else:
                    b1, b2 = hp["betas"]
                    p.add_(st["s"] * st["v"])
                    st["t"] += 1
                    t = st["t"]
                    st["v"] = b1 * st["v"] + (1 - b1) * g
                    st["u"] = b2 * st["u"] + (1 - b2) * g * g
                    denom = st["u"].sqrt() / math.sqrt(1 - b2**t) + hp["eps"]
                    p.sub_(lr / (1 - b1**t) * st["v"] / denom)
                    p.mul_(1 - lr * wd)  # after the Adam update, as adamW_msam.py
        sq = sum(float(self.state[p]["v"].pow(2).sum()) for _, ps in active for p in ps)
        norm = math.sqrt(sq)
        for hp, ps in active:
            for p in ps:
                st = self.state[p]
                st["s"] = hp["rho"] / (norm + EPS)
                p.sub_(st["s"] * st["v"])

    @torch.no_grad()
    def unperturbed(self, p):
        st = self.state.get(p)
        return p.detach().clone() if st is None else p.detach() + st["s"] * st["v"]

    @torch.no_grad()
    def finalize(self):
        for _, ps in self.groups:
            for p in ps:
                st = self.state.get(p)
                if st is not None:
                    p.add_(st["s"] * st["v"])
                    st["s"] = 0.0


# ---------------------------------------------------------------- setup
def make(form, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    model = GroupedBNNet(bn=False).to(dtype)
    groups = [{"params": ps, **hp} for ps, hp in zip(model.group_params(), HPS[form])]
    return model, CLASSES[form](groups, **kw)


def ref_for(model, form):
    ref_model = copy.deepcopy(model).double()
    hps = [dict(hp) for hp in HPS[form]]
    return ref_model, RefMSAM(list(zip(hps, ref_model.group_params())), form)


def backward(model, x, y, drop=()):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y)
    loss.backward()
    for name in drop:
        getattr(model, name).grad = None
    return loss.detach()


def batch(i, dtype=torch.float64):
    return data(seed=i, dtype=dtype)


def run(model, opt, steps, dtype=torch.float64, drop_at=None):
    for i in steps:
        x, y = batch(i, dtype)
        backward(model, x, y, drop_at(i) if drop_at else ())
        opt.step()


def drop_b1_odd(i):
    """b1 has no gradient on odd steps (it keeps its own scale meanwhile)."""
    return ("b1",) if i % 2 else ()


#: metadata-only views left out of a step's op count (the eager reference's dtype views and
#: detaches are one per tensor, and run no kernel)
VIEWS = METADATA_OPS | {"aten.alias"}


def step_op_count(form, n, **kw):
    """Ops dispatched by one step (after a first) of ``CLASSES[form]`` over ``n`` one-dimensional
    parameters (``kw``: to the constructor), :data:`VIEWS` left out."""
    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(n)]
    opt = CLASSES[form](ps, **kw)
    for p in ps:
        p.grad = torch.randn(5)
    opt.step()
    with HostReads() as spy:
        opt.step()
    return spy.kernels(VIEWS)
