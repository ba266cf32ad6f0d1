"""Data parallel and sharded training with 2 gloo processes on the CPU (127.0.0.1 only).

One launch of two worker processes (this file run as a script) runs every scenario and saves
its results; the tests compare them with single-process computations:
- DDP global mode equals single-process SAM on the whole batch (10 steps, within 1e-6);
- DDP per-replica mode equals a hand computation of the m-sharpness update;
- a non-finite first pass on one replica only makes every replica skip (per-replica mode);
- the sharded global norm equals the norm of the concatenated gradients;
- SAM over an FSDP2 ``fully_shard`` model equals single-process SAM on the whole batch;
- every class of the optimizer table over FSDP2 equals single-process training or is refused
  with the reason;
- plain DDP with a non-finite loss value on one rank only keeps the replicas equal.
"""

from __future__ import annotations

import copy
import sys

import _gloo
import pytest
import torch
from _dist_setup import (
    HP,
    RHOS,
    batch,
    ddp_sam,
    fsdp2_model,
    groups,
    m_sharpness_grads,
    make_model,
    max_diff,
    shard,
    snapshot,
    table_closure,
    table_opt,
)
from _gloo import WORLD
from _models import bw, loss_fn
from torch import nn

STEPS_GLOBAL = 10
STEPS_PER_REPLICA = 3


# ----------------------------------------------------------------- worker scenarios
def _scenario_global(rank: int) -> dict:
    model, _, step = ddp_sam("global")
    for s in range(STEPS_GLOBAL):
        x, y = shard(*batch(s), rank)
        step(lambda: bw(loss_fn(model, x, y)))
    return {"params": snapshot(model.module)}


def _scenario_per_replica(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from python_api import SAM
    from python_api.distributed import sam_ddp_step

    model = DDP(make_model())
    opt = SAM(groups(model.module), torch.optim.SGD, **HP)
    out = []
    with sam_ddp_step(model, opt, mode="per_replica") as step:
        for s in range(STEPS_PER_REPLICA):
            x, y = shard(*batch(s), rank)
            step(lambda: bw(loss_fn(model, x, y)))
            out.append(snapshot(model.module))
    return {"params": out}


def _scenario_skip(rank: int) -> dict:
    """Rank 1's first pass of step 1 is non-finite: both replicas must skip that step."""
    model, opt, step = ddp_sam("per_replica")
    snaps = []
    for s in range(3):
        x, y = shard(*batch(s), rank)
        calls = []

        def closure():
            calls.append(1)
            loss = loss_fn(model, x, y)
            if s == 1 and rank == 1 and len(calls) == 1:
                loss = loss * float("inf")
            loss.backward()
            return loss

        snaps.append(snapshot(model.module))
        step(closure)
    snaps.append(snapshot(model.module))
    return {"snaps": snaps, "skipped": opt.skipped_steps, "taken": opt.steps_taken}


def _scenario_amp_per_replica(rank: int) -> dict:
    """GradScaler + per-replica mode; rank 1's first pass overflows at step 1 only."""
    model, opt, step = ddp_sam("per_replica")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    snaps, scales = [], []
    for s in range(3):
        x, y = shard(*batch(s), rank)
        calls = []

        def closure():
            calls.append(1)
            loss = loss_fn(model, x, y)
            scaled = scaler.scale(loss)
            if s == 1 and rank == 1 and len(calls) == 1:
                scaled = scaled * float("inf")
            scaled.backward()
            return loss

        snaps.append(snapshot(model.module))
        step(closure, scaler=scaler)
        scaler.update()
        scales.append(scaler.get_scale())
    snaps.append(snapshot(model.module))
    return {"snaps": snaps, "scales": scales, "skipped": opt.skipped_steps}


def _scenario_sharded_norm(rank: int) -> dict:
    from python_api.sharded import sharded_grad_norm

    g = torch.Generator().manual_seed(7 + rank)
    grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    if rank == 1:
        grads.append(torch.randn(2, 2, generator=g))
    params = [torch.randn(t.shape, generator=g) for t in grads]
    return {
        "grads": grads,
        "params": params,
        "norm": sharded_grad_norm(grads),
        "anorm": sharded_grad_norm(grads, params, eta=0.01),
        "empty": sharded_grad_norm([] if rank == 0 else grads),
    }


def _scenario_fsdp2(rank: int) -> dict:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:  # pragma: no cover - old torch
        return {"skip": f"torch.distributed.fsdp.fully_shard unavailable: {err}"}
    from torch.distributed.device_mesh import init_device_mesh

    from python_api import SAM
    from python_api.sharded import FSDP2SAMStep, LocalShards

    # a CPU mesh: without one, fully_shard moves the shards to CUDA where a GPU is present
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = fsdp2_model(mesh)
    shards = LocalShards(model)
    opt = SAM(shards.param_groups(groups(model)), torch.optim.SGD, **HP)
    step = FSDP2SAMStep(model, opt, shards)
    for s in range(STEPS_GLOBAL):
        x, y = shard(*batch(s), rank)
        step(lambda: bw(loss_fn(model, x, y)))
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()]}


CLASS_STEPS = 3


def _scenario_fsdp2_classes(rank: int) -> dict:
    """Every class of the table over FSDP2 local shards: refused (the message) or 3 steps."""
    from _optim_table import NAMES
    from torch.distributed.device_mesh import init_device_mesh

    from python_api.sharded import FSDP2SAMStep, LocalShards

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    out = {}
    for name in NAMES:
        model = fsdp2_model(mesh)
        shards = LocalShards(model)
        opt = table_opt(name, shards.param_groups(groups(model)))
        try:
            step = FSDP2SAMStep(model, opt, shards)
        except ValueError as err:
            out[name] = {"refused": str(err)}
            continue
        for s in range(CLASS_STEPS):
            x, y = shard(*batch(s), rank)
            step(table_closure(name, model, x, y))
        full = [p.full_tensor().detach().clone() for p in model.parameters()]
        out[name] = {"params": full, "taken": opt.steps_taken, "skipped": opt.skipped_steps}
    return out


def _scenario_ddp_nan_loss(rank: int) -> dict:
    """Plain DDP (no helper), every class: at step 1 rank 1's loss (only the value, not its
    gradient) is NaN at the ``at``-th closure call. The replicas must stay equal."""
    from _optim_table import NAMES
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name in NAMES:
        for at in (1, 2, 3):
            torch.manual_seed(0)
            model = DDP(make_model())
            opt = table_opt(name, groups(model.module))
            torch.manual_seed(1)  # the eager universal class draws from the global generator
            injected = []
            for s in range(CLASS_STEPS):
                x, y = shard(*batch(s), rank)
                calls = []

                def hook(s=s, calls=calls):
                    calls.append(1)

                inner = table_closure(name, model, x, y, hook)

                def closure(s=s, calls=calls, inner=inner):
                    loss = inner()
                    if s == 1 and len(calls) == at:
                        injected.append(1)
                        if rank == 1:  # a constant: the gradients stay finite and global
                            loss = loss + torch.tensor(float("nan"))
                    return loss

                opt.zero_grad()
                opt.step(closure)
            out[(name, at)] = {
                "params": snapshot(model.module),
                "skipped": opt.skipped_steps,
                "injected": bool(injected),
            }
    return out


SCENARIOS = {
    "global": _scenario_global,
    "per_replica": _scenario_per_replica,
    "skip": _scenario_skip,
    "amp_per_replica": _scenario_amp_per_replica,
    "sharded_norm": _scenario_sharded_norm,
    "fsdp2": _scenario_fsdp2,
    "fsdp2_classes": _scenario_fsdp2_classes,
    "ddp_nan_loss": _scenario_ddp_nan_loss,
}


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return _gloo.launch(__file__, tmp_path_factory.mktemp("ddp"))


def _get(results, name):
    return _gloo.results_of(results, name)


# ----------------------------------------------------------------- tests
def test_global_mode_equals_single_process(dist_results):
    from python_api import SAM

    r0, r1 = _get(dist_results, "global")
    model = make_model()
    opt = SAM(groups(model), torch.optim.SGD, **HP)
    for s in range(STEPS_GLOBAL):
        x, y = batch(s)
        opt.zero_grad()
        opt.step(lambda: bw(loss_fn(model, x, y)))
    assert max_diff(r0["params"], r1["params"]) == 0.0  # replicas identical
    assert max_diff(r0["params"], snapshot(model)) < 1e-6


def _hand_m_sharpness(steps: int) -> list[list[torch.Tensor]]:
    """m-sharpness by hand: e_r from each replica's own gradient, g = mean_r grad L_r(w + e_r)."""
    model = make_model()
    params = list(model.parameters())
    rho_of = [RHOS[0]] * 2 + [RHOS[1]] * 2
    bufs = [None] * len(params)
    out = []
    for s in range(steps):
        g_sum = m_sharpness_grads(model, params, *batch(s), rho_of)
        with torch.no_grad():
            for i, (p, gs) in enumerate(zip(params, g_sum)):
                d = gs / WORLD + HP["weight_decay"] * p
                bufs[i] = d.clone() if bufs[i] is None else HP["momentum"] * bufs[i] + d
                p.sub_(HP["lr"] * bufs[i])
        out.append(snapshot(model))
    return out


def test_per_replica_mode_equals_hand_m_sharpness(dist_results):
    r0, r1 = _get(dist_results, "per_replica")
    hand = _hand_m_sharpness(STEPS_PER_REPLICA)
    for s in range(STEPS_PER_REPLICA):
        assert max_diff(r0["params"][s], r1["params"][s]) == 0.0
        assert max_diff(r0["params"][s], hand[s]) < 1e-6, s
    # and it is not the global step (the modes differ)
    from python_api import SAM

    model = make_model()
    opt = SAM(groups(model), torch.optim.SGD, **HP)
    x, y = batch(0)
    opt.step(lambda: bw(loss_fn(model, x, y)))
    assert max_diff(r0["params"][0], snapshot(model)) > 1e-6


def test_per_replica_nonfinite_on_one_replica_skips_everywhere(dist_results):
    r0, r1 = _get(dist_results, "skip")
    for r in (r0, r1):
        assert r["skipped"] == 1 and r["taken"] == 2
        snaps = r["snaps"]
        assert max_diff(snaps[1], snaps[2]) == 0.0  # step 1 changed nothing (bit for bit)
        assert max_diff(snaps[0], snaps[1]) > 0 and max_diff(snaps[2], snaps[3]) > 0
    for a, b in zip(r0["snaps"], r1["snaps"]):
        assert max_diff(a, b) == 0.0  # the replicas never diverge


def test_per_replica_with_grad_scaler_backs_off_on_every_rank(dist_results):
    r0, r1 = _get(dist_results, "amp_per_replica")
    for r in (r0, r1):
        assert r["skipped"] == 1
        assert r["scales"] == [2.0**10, 2.0**9, 2.0**9]  # every rank's scaler backed off
        assert max_diff(r["snaps"][1], r["snaps"][2]) == 0.0
    for a, b in zip(r0["snaps"], r1["snaps"]):
        assert max_diff(a, b) == 0.0
    # the unskipped steps are the plain per-replica steps (power-of-two scales: exact)
    hand = _hand_m_sharpness(1)
    assert max_diff(r0["snaps"][1], hand[0]) < 1e-6


def test_sharded_norm(dist_results):
    r0, r1 = _get(dist_results, "sharded_norm")
    allg = r0["grads"] + r1["grads"]
    allp = r0["params"] + r1["params"]
    want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in allg]))
    awant = torch.linalg.vector_norm(
        torch.cat([((p.abs() + 0.01) * g).flatten() for p, g in zip(allp, allg)])
    )
    ewant = torch.linalg.vector_norm(torch.cat([g.flatten() for g in r1["grads"]]))
    for r in (r0, r1):
        torch.testing.assert_close(r["norm"], want, rtol=1e-6, atol=0)
        torch.testing.assert_close(r["anorm"], awant, rtol=1e-6, atol=0)
        torch.testing.assert_close(r["empty"], ewant, rtol=1e-6, atol=0)


def test_fsdp2_equals_single_process(dist_results):
    from python_api import SAM

    r0, r1 = _get(dist_results, "fsdp2")
    if "skip" in r0:
        pytest.skip(r0["skip"])
    model = make_model()
    opt = SAM(groups(model), torch.optim.SGD, **HP)
    for s in range(STEPS_GLOBAL):
        x, y = batch(s)
        opt.zero_grad()
        opt.step(lambda: bw(loss_fn(model, x, y)))
    assert max_diff(r0["params"], r1["params"]) == 0.0
    assert max_diff(r0["params"], snapshot(model)) < 1e-6


def test_fsdp2_every_class_equals_single_process_or_is_refused(dist_results):
    """Issue 13 case 3: every class of the table over FSDP2 (2 ranks) either equals
    single-process training on the whole batch or is refused with a message naming it."""
    from _optim_table import NAMES

    r0, r1 = _get(dist_results, "fsdp2_classes")
    refused = {n for n in NAMES if "refused" in r0[n]}
    assert refused == {
        "LookSAM", "AELookSAM", "ESAM", "FrobSAM", "TraceSAM", "DetSAM", "GSAM", "RSAM"
    }  # fmt: skip
    for name in NAMES:
        assert ("refused" in r0[name]) == ("refused" in r1[name])
        if name in refused:
            cls = table_opt(name, make_model().parameters())
            assert type(cls).__name__ in r0[name]["refused"], r0[name]
            continue
        assert max_diff(r0[name]["params"], r1[name]["params"]) == 0.0, name
        model = make_model()
        opt = table_opt(name, groups(model))
        for s in range(CLASS_STEPS):
            x, y = batch(s)
            opt.zero_grad()
            opt.step(table_closure(name, model, x, y))
        assert r0[name]["taken"] == opt.steps_taken == CLASS_STEPS, name
        err = max_diff(r0[name]["params"], snapshot(model))
        assert err < 1e-6, (name, err)


def test_plain_ddp_nonfinite_loss_on_one_rank_keeps_replicas_equal(dist_results):
    """Issue 13 case 5: plain DDP, a NaN loss value on one rank only: every rank skips."""
    from _optim_table import NAMES

    r0, r1 = _get(dist_results, "ddp_nan_loss")
    for name in NAMES:
        for at in (1, 2, 3):
            a, b = r0[(name, at)], r1[(name, at)]
            assert max_diff(a["params"], b["params"]) == 0.0, (name, at)
            assert a["skipped"] == b["skipped"] == int(a["injected"]), (name, at, a, b)
    # the first evaluation is part of every step: the injection always happened there
    assert all(r0[(n, 1)]["injected"] for n in NAMES)


# ----------------------------------------------------------------- in-process checks
def test_helper_refuses_wrong_setups():
    from python_api import SAM
    from python_api.distributed import SAMDDPStep

    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="mode"):
        SAMDDPStep(model, opt, mode="local")
    with pytest.raises(TypeError, match="no_sync"):
        SAMDDPStep(model, opt, mode="per_replica")

    class FakeDDP(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

        def no_sync(self):  # pragma: no cover - never entered here
            raise AssertionError

    class NotSafe(SAM):
        per_replica_safe = False

    with pytest.raises(ValueError, match="per-replica"):
        SAMDDPStep(
            FakeDDP(model), NotSafe(model.parameters(), torch.optim.SGD, lr=0.1), "per_replica"
        )
    raising = SAM(model.parameters(), torch.optim.SGD, lr=0.1, on_nonfinite="raise")
    with pytest.raises(ValueError, match="on_nonfinite"):
        SAMDDPStep(FakeDDP(model), raising, mode="per_replica")
    with pytest.raises(ValueError, match="not the model's"):
        SAMDDPStep(make_model(1), opt, mode="global")
    # global mode without torch.distributed initialized is a plain SAM step
    ref = copy.deepcopy(model)
    ropt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    SAMDDPStep(model, opt)(lambda: bw(loss_fn(model, x, y)))
    ropt.step(lambda: bw(loss_fn(ref, x, y)))
    assert max_diff(snapshot(model), snapshot(ref)) == 0.0


def test_local_shards_of_plain_model_is_plain_sam():
    from python_api import SAM
    from python_api.sharded import FSDP2SAMStep, LocalShards, sharded_grad_norm

    model, ref = make_model(), make_model()
    shards = LocalShards(model)
    opt = SAM(shards.param_groups(groups(model)), torch.optim.SGD, **HP)
    ropt = SAM(groups(ref), torch.optim.SGD, **HP)
    step = FSDP2SAMStep(model, opt, shards)
    for s in range(2):
        x, y = batch(s)
        step(lambda: bw(loss_fn(model, x, y)))
        ropt.zero_grad()
        ropt.step(lambda: bw(loss_fn(ref, x, y)))
    assert max_diff(snapshot(model), snapshot(ref)) == 0.0
    gs = [torch.randn(4, 3), torch.randn(2)]
    torch.testing.assert_close(
        sharded_grad_norm(gs), torch.linalg.vector_norm(torch.cat([g.flatten() for g in gs]))
    )
    with pytest.raises(ValueError, match="local"):
        FSDP2SAMStep(model, SAM(make_model().parameters(), torch.optim.SGD, lr=0.1), shards)


if __name__ == "__main__" and _gloo.is_worker_call(sys.argv):
    _gloo.worker_main(sys.argv, SCENARIOS)
