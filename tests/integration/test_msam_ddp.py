"""Momentum-SAM under plain DDP (2 gloo ranks on the CPU): the replicas stay identical and equal
single-process training on the whole batch.

MSAM and AdamWMSAM take one gradient per step, at the moved-down weights; DDP averages it over
the ranks, so the momentum, its global norm and the skip decision are the same on every rank with
no collective of the optimizer's own. Also: a non-finite gradient on one rank (it reaches every
rank through the all-reduce) skips the step on both, and the replicas stay identical.
"""

from __future__ import annotations

import copy
import sys

import _gloo
import pytest
import torch
from _gloo import WORLD
from torch import nn

from python_api import MSAM, AdamWMSAM

STEPS = 4
BATCH = 8  # per rank
CLASSES = {
    "MSAM": (MSAM, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3)),
    "AdamWMSAM": (AdamWMSAM, dict(lr=1e-2, weight_decay=1e-2, rho=0.5)),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * BATCH, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD * BATCH,), generator=g)
    return x, y


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int | None, bad_step=None):
    for s in range(STEPS):
        x, y = _batch(s)
        if rank is not None:
            x, y = x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]

        def closure(s=s, x=x, y=y):
            loss = nn.functional.cross_entropy(model(x), y)
            if s == bad_step and rank in (None, 0):
                loss = loss * float("nan")  # rank 0's gradient only: the all-reduce spreads it
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
    with opt.unperturbed():
        return [p.detach().clone() for p in model.parameters()], opt.steps_taken


def _scenario(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name, (cls, kw) in CLASSES.items():
        for bad in (None, 1):
            base = _model()
            ddp = DDP(base)
            opt = cls(ddp.parameters(), **kw)
            out[(name, bad)] = _train(ddp, opt, rank, bad)
    return out


SCENARIOS = {"ddp": _scenario}


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return _gloo.launch(__file__, tmp_path_factory.mktemp("msam_ddp"))


@pytest.mark.parametrize("bad", [None, 1], ids=["clean", "nan-on-rank0"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_ddp_equals_single_process(dist_results, name, bad):
    r0, r1 = (res[(name, bad)] for res in _gloo.results_of(dist_results, "ddp"))
    (p0, taken0), (p1, taken1) = r0, r1
    assert taken0 == taken1 == (STEPS if bad is None else STEPS - 1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)), "the replicas differ"
    cls, kw = CLASSES[name]
    model = _model()
    ref = copy.deepcopy(model)
    want, taken = _train(model, cls(model.parameters(), **kw), None, bad)
    assert taken == taken0
    err = max((a - b).abs().max().item() for a, b in zip(p0, want))
    assert err < 1e-12, err
    # the steps moved the weights (the comparison is not of two untouched models)
    assert max((a - b).abs().max().item() for a, b in zip(want, ref.parameters())) > 1e-3


if __name__ == "__main__" and _gloo.is_worker_call(sys.argv):
    _gloo.worker_main(sys.argv, SCENARIOS)
