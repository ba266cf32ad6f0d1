"""GSAM under DDP (2 gloo processes on the CPU): global mode equals single-process training.

The inner product and both norms are of the all-reduced gradients, so a global step is the
single-process step on the whole batch. Per-replica mode (m-sharpness) is refused: the base
step uses the first pass's gradient ``g0``, which would stay local to each replica.
"""

from __future__ import annotations

import sys

import _gloo
import pytest
import torch
from _dist_setup import HP, batch, groups, make_model, shard, snapshot
from _models import bw, loss_fn

STEPS = 6
KW = dict(rho=0.1, alpha=0.4, rho_min=0.02)


def _gsam(model):
    from python_api.gsam import GSAM

    opt = GSAM(groups(model, (0.1, 0.05)), torch.optim.SGD, **KW, **HP)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def _scenario_global(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from python_api.distributed import SAMDDPStep

    out = {}
    for helper in (False, True):
        model = DDP(make_model())
        opt, sched = _gsam(model.module)
        step = SAMDDPStep(model, opt, mode="global") if helper else None
        for s in range(STEPS):
            x, y = shard(*batch(s), rank)
            if step is not None:
                step(lambda: bw(loss_fn(model, x, y)))
            else:
                opt.zero_grad()
                opt.step(lambda: bw(loss_fn(model, x, y)))
            sched.step()
        out[helper] = {"params": snapshot(model.module), "taken": opt.steps_taken}
    try:
        SAMDDPStep(DDP(make_model()), _gsam(make_model())[0], mode="per_replica")
        out["per_replica"] = "accepted"
    except ValueError as err:
        out["per_replica"] = str(err)
    return out


SCENARIOS = {"global": _scenario_global}


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return _gloo.launch(__file__, tmp_path_factory.mktemp("gsam_ddp"))


def test_global_mode_equals_single_process(dist_results):
    r0, r1 = _gloo.results_of(dist_results, "global")
    model = make_model()
    opt, sched = _gsam(model)
    for s in range(STEPS):
        x, y = batch(s)
        opt.zero_grad()
        opt.step(lambda: bw(loss_fn(model, x, y)))
        sched.step()
    for helper in (False, True):
        assert r0[helper]["taken"] == STEPS
        for a, b in zip(r0[helper]["params"], r1[helper]["params"]):
            assert torch.equal(a, b)  # replicas identical
        for a, b in zip(r0[helper]["params"], snapshot(model)):
            assert (a - b).abs().max().item() < 1e-6
    assert "GSAM is not defined in per-replica mode" in r0["per_replica"]


if __name__ == "__main__" and _gloo.is_worker_call(sys.argv):
    _gloo.worker_main(sys.argv, SCENARIOS)
