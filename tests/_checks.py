"""Behaviour checks that several per-algorithm tests run on _models.py's awkward net, each
written once: a sparse gradient refused, a non-finite step skipped without a trace or raising,
and a checkpoint resuming bit-identically. The algorithm's own equations are checked in its
file against its float64 reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _helpers import same
from _models import GroupedBNNet, bn_buffers, bw, data, opt_step, poisoned_closure, snapshot
from torch import nn

from python_api._base import NonFiniteError


def check_sparse_refused(cls) -> None:
    """``cls`` (over SGD) refuses a step with sparse gradients, the weights as they were."""
    emb = nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters(), torch.optim.SGD, lr=0.1)
    w = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step(lambda: bw(emb(torch.tensor([1, 2])).sum()))
    assert torch.equal(w, emb.weight)


def _seed(seeded: bool, s: int):
    return s if seeded else None


def check_skip_leaves_no_trace(make, call: int, kind: str, seeded: bool = False) -> None:
    """``make(model)``: the optimizer over a fresh :class:`GroupedBNNet` and over its twin. Two
    steps; a third whose closure call ``call`` is poisoned (``kind``: "grad" or "loss", see
    ``poisoned_closure``) changes nothing (weights, state) and is counted as skipped; after
    three more steps the weights equal the twin's, which never saw it. ``seeded``: the global
    generator (the user's) seeded with the batch index before every step, identically."""
    model = GroupedBNNet()
    clean = copy.deepcopy(model)
    opt, opt_clean = make(model), make(clean)
    batches = [data(seed=s, dtype=torch.float32) for s in range(6)]
    for s in range(2):
        opt_step(opt, model, *batches[s], "closure", seed=_seed(seeded, s))
        opt_step(opt_clean, clean, *batches[s], "closure", seed=_seed(seeded, s))
    snap = snapshot(model, opt)
    opt.zero_grad()
    opt.step(poisoned_closure(model, *batches[2], call, kind))
    assert same(snap, snapshot(model, opt)), "a skipped step must change nothing"
    assert opt.skipped_steps == 1 and opt.steps_taken == 2
    for s in range(3, 6):
        opt_step(opt, model, *batches[s], "closure", seed=_seed(seeded, s))
        opt_step(opt_clean, clean, *batches[s], "closure", seed=_seed(seeded, s))
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)


def check_raise_leaves_no_trace(model, opt, call: int, what: str) -> None:
    """``opt`` (``on_nonfinite="raise"``) after one step: a gradient poisoned at closure call
    ``call`` raises NonFiniteError matching ``what``, weights and state as they were."""
    x, y = data(dtype=torch.float32)
    opt_step(opt, model, x, y, "closure")
    snap = snapshot(model, opt)
    opt.zero_grad()
    with pytest.raises(NonFiniteError, match=what):
        opt.step(poisoned_closure(model, x, y, call, "grad"))
    assert same(snap, snapshot(model, opt))


def check_resume(make, scratch, seeded: bool = False) -> None:
    """``make(model)``: the optimizer over a :class:`GroupedBNNet`. Three steps, a checkpoint
    (model and optimizer; it must hold none of the state keys ``scratch``), three more; a fresh
    net and optimizer loaded from the checkpoint take the same three: bit-identical weights and
    batch-norm buffers. ``seeded``: as in :func:`check_skip_leaves_no_trace`."""
    model = GroupedBNNet()
    opt = make(model)
    batches = [data(seed=s, dtype=torch.float32) for s in range(6)]
    for s in range(3):
        opt_step(opt, model, *batches[s], "closure", seed=_seed(seeded, s))
    sd = opt.state_dict()
    kept = {n for st in sd["state"].values() for n in st}
    assert not kept & set(scratch), kept  # scratch is not saved
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buf)
    for s in range(3, 6):
        opt_step(opt, model, *batches[s], "closure", seed=_seed(seeded, s))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    fresh = GroupedBNNet()
    fresh.load_state_dict(ckpt["model"])
    opt2 = make(fresh)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps_taken == 3
    for s in range(3, 6):
        opt_step(opt2, fresh, *batches[s], "closure", seed=_seed(seeded, s))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(bn_buffers(model), bn_buffers(fresh)):
        assert torch.equal(a, b)
