"""Gradient accumulation inside the closure: 4 micro-batches equal one batch of 4x the size."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _models import BASES, bw
from torch import nn

from python_api import SAM
from python_api.recipes import accumulate_closure


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(s, n=32):
    g = torch.Generator().manual_seed(200 + s)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def both_steps(opt, closure, ropt, ref, x, y, reduction="mean"):
    """One step of ``opt`` on the accumulating ``closure`` and one of ``ropt`` on ``ref`` over
    the whole batch; the two losses."""

    def full():
        loss = nn.functional.cross_entropy(ref(x), y, reduction=reduction)
        loss.backward()
        return loss

    opt.zero_grad()
    l_acc = opt.step(closure)
    ropt.zero_grad()
    return l_acc, ropt.step(full)


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_four_micro_batches_equal_one_big_batch(base, reduction):
    cls, hp = BASES[base]
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), cls, rho=0.1, **hp)
    ropt = SAM(ref.parameters(), cls, rho=0.1, **hp)
    for s in range(3):
        x, y = batch(s)

        # by hand, the documented pattern: loss_i / 4 (mean) or loss_i (sum) per micro-batch
        def closure():
            total = 0.0
            for xb, yb in zip(x.chunk(4), y.chunk(4)):
                loss = nn.functional.cross_entropy(model(xb), yb, reduction=reduction)
                if reduction == "mean":
                    loss = loss / 4
                loss.backward()
                total = total + loss.detach()
            return total

        l_acc, l_full = both_steps(opt, closure, ropt, ref, x, y, reduction)
        torch.testing.assert_close(l_acc, l_full, rtol=1e-6, atol=1e-6)
    scale = 1.0 if reduction == "mean" else 1.0 / 32  # sum: gradients are 32x larger
    assert max_diff(model, ref) * scale < 1e-6


def test_helper_unequal_micro_batches():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ropt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for s in range(3):
        x, y = batch(s)
        mbs = [(x[a:b], y[a:b]) for a, b in [(0, 10), (10, 20), (20, 26), (26, 32)]]
        closure = accumulate_closure(
            lambda mb: nn.functional.cross_entropy(model(mb[0]), mb[1]), mbs
        )
        l_acc, l_full = both_steps(opt, closure, ropt, ref, x, y)
        torch.testing.assert_close(l_acc, l_full, rtol=1e-6, atol=1e-6)
    assert max_diff(model, ref) < 1e-6


def test_helper_with_grad_scaler():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ropt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for s in range(3):
        x, y = batch(s)
        closure = accumulate_closure(
            lambda mb: nn.functional.cross_entropy(model(mb[0]), mb[1]),
            list(zip(x.chunk(4), y.chunk(4))),
            scaler=scaler,
        )
        opt.zero_grad()
        opt.step(closure, scaler=scaler)
        scaler.update()
        ropt.zero_grad()
        ropt.step(lambda: bw(nn.functional.cross_entropy(ref(x), y)))
    assert max_diff(model, ref) < 1e-6


def test_helper_no_sync_all_but_last():
    """With a DDP model, micro-batches 1..3 run under no_sync and the last one reduces."""
    entered = []

    class FakeDDP(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
            self.syncing = True

        def forward(self, x):
            entered.append(self.syncing)
            return self.module(x)

        @contextlib.contextmanager
        def no_sync(self):
            old, self.syncing = self.syncing, False
            try:
                yield
            finally:
                self.syncing = old

    model = FakeDDP(make_model())
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    closure = accumulate_closure(
        lambda mb: nn.functional.cross_entropy(model(mb[0]), mb[1]),
        list(zip(x.chunk(4), y.chunk(4))),
        no_sync_model=model,
    )
    opt.step(closure)
    assert entered == [False, False, False, True] * 2  # two evaluations, 4 micro-batches each


def test_helper_validation():
    with pytest.raises(ValueError, match="reduction"):
        accumulate_closure(lambda mb: mb, [torch.zeros(1)], reduction="max")
    with pytest.raises(ValueError, match="empty"):
        accumulate_closure(lambda mb: mb, [])
    with pytest.raises(TypeError, match="sizes"):
        accumulate_closure(lambda mb: mb, [object()])
