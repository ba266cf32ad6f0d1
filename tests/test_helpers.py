"""The shared test helpers (tests/_helpers.py) checked themselves: the float64 base steps
against torch.optim, the host-read counter on ops known to read, the comparisons."""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    HOST_READ_OPS,
    SCALAR_AND_NONZERO,
    SCALAR_READS,
    HostReads,
    RefBase,
    close,
    rel_err,
    same,
    unit_rows,
)

SGD_HPS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
]
ADAMW_HPS = [
    dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True),
    dict(lr=3e-3, amsgrad=True, maximize=True),
]


@pytest.mark.parametrize(
    "base,hp",
    [("sgd", hp) for hp in SGD_HPS] + [("adamw", hp) for hp in ADAMW_HPS],
    ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)),
)
def test_ref_base_matches_torch_optim(base, hp):
    """Six float64 steps on two parameters, gradients that change sign: the reference and
    torch.optim agree to rounding."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(7, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    torch_ps = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = (torch.optim.SGD if base == "sgd" else torch.optim.AdamW)(torch_ps, **hp)
    ref = RefBase(base, hp)
    for _ in range(6):
        gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        for q, g in zip(torch_ps, gs):
            q.grad = g.clone()
        opt.step()
        for p, g in zip(ps, gs):
            ref.step(p, g)
    for p, q in zip(ps, torch_ps):
        assert rel_err(p, q.detach()) < 1e-13


def test_ref_base_scheduled_lr_and_unknown_base():
    p, q = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    RefBase("sgd", dict(lr=0.1)).step(p, torch.ones(3, dtype=torch.float64), lr=0.5)
    RefBase("sgd", dict(lr=0.5)).step(q, torch.ones(3, dtype=torch.float64))
    assert torch.equal(p, q) and p[0] == 0.5
    with pytest.raises(ValueError, match="rmsprop"):
        RefBase("rmsprop", dict(lr=0.1))


def test_host_reads_counts_each_op_set():
    x = torch.tensor([0.0, 1.0, 2.0])
    with HostReads() as spy:
        x.sum().item()  # _local_scalar_dense
        x.nonzero()
        x.masked_select(x > 0)
        y = x * 2
    assert spy.reads == 3
    assert spy.found == {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select"}
    assert "aten.mul" in spy.ops and spy.by_op["aten.mul.Tensor"] == 1
    assert torch.equal(y, x * 2)
    for counted, want in ((SCALAR_READS, 1), (SCALAR_AND_NONZERO, 2), (HOST_READ_OPS, 3)):
        with HostReads(counted) as spy:
            x.sum().item()
            x.nonzero()
            x.masked_select(x > 0)
        assert spy.reads == want, counted


def test_host_reads_kernels_leave_out_metadata():
    x = torch.randn(4)
    with HostReads() as spy:
        x.view(2, 2).detach()
        x.add(1)
    assert spy.kernels() == 1  # the add
    assert spy.kernels(frozenset()) == len(spy.ops) == 3


def test_same():
    a = {"w": [torch.ones(2), (1, torch.zeros(3))], "n": 3}
    b = {"w": [torch.ones(2), (1, torch.zeros(3))], "n": 3}
    assert same(a, b) and same(a, b, dtype=True)
    b["w"][1][1][0] = 1e-30
    assert not same(a, b)
    assert same(torch.ones(2), torch.ones(2, dtype=torch.float64))  # torch.equal: values only
    assert not same(torch.ones(2), torch.ones(2, dtype=torch.float64), dtype=True)
    assert not same(torch.ones(2), torch.ones(1, 2))
    assert not same([torch.ones(2)], [torch.ones(2)] * 2)
    assert not same(torch.ones(1), 1.0)


def test_close_fails_beyond_the_tolerance():
    b = torch.full((5,), 2.0, dtype=torch.float64)
    close(b.float() + 3e-6, b, torch.float32)  # 2e-6 per unit of max |b| = 2
    with pytest.raises(AssertionError, match="max abs err"):
        close(b.float() + 5e-6, b, torch.float32)
    close(b.float() + 5e-6, b, torch.float32, tol_mul=2.0)
    with pytest.raises(AssertionError, match="non-finite"):
        close(torch.tensor([float("nan")]), torch.zeros(1), torch.float32)
    close(torch.tensor([1.0, 0.0]), torch.tensor([1.0, float("inf")]), torch.float32, 1.0, True)
    with pytest.raises(AssertionError):
        close(b.float(), b, torch.float32, alike=True)  # dtypes differ


@pytest.mark.parametrize("layout", ["c", "t", "s", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unit_rows_have_norm_one(layout, dtype):
    shapes = {"c": [(), (1,), (17,), (3, 5), (0, 4)], "t": [(4, 6)], "s": [(5, 6), (9,)],
              "cl": [(3, 2, 3, 3)]}[layout]  # fmt: skip
    for shape, w in zip(shapes, unit_rows([(s, layout) for s in shapes], dtype)):
        assert w.shape == shape and w.dtype == dtype
        if layout == "s":
            assert not w.is_contiguous()
        if layout == "cl":
            assert w.is_contiguous(memory_format=torch.channels_last)
        if not w.numel():
            continue
        rows = w.double().reshape(shape[0], -1) if w.dim() > 1 else w.double().reshape(1, -1)
        assert torch.equal(rows.norm(dim=1), torch.ones(rows.shape[0], dtype=torch.float64))
        assert torch.equal((rows != 0).sum(dim=1), torch.ones(rows.shape[0], dtype=torch.int64))
