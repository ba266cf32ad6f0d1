"""The eager reference's CPU forms (issue 14, item 4): in place, block by block, same values.

On CPU tensors the eager SGD/AdamW steps (from backups, with the finite flag) run in place over
blocks of the lists (:func:`sam_kernels.ops._common.cpu_blocks`), perturb is one fused
multiply-add and the fp64 norm goes through one block-sized scratch. Checked here against the
former formulation with temporary lists (still the path for GPU tensors, half types, aliasing
gradients), bit for bit where the operations are the same, with small blocks so that tensors
are split and grouped.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _helpers import same

import sam_kernels as sk
from sam_kernels.ops import _common
from sam_kernels.ops._common import cpu_blocks, sanitize_, scratch_ok
from sam_kernels.ops._step_args import AdamWHyper, SgdHyper

sgd_mod = importlib.import_module("sam_kernels.ops.sgd_step")
adamw_mod = importlib.import_module("sam_kernels.ops.adamw_step")
norm_mod = importlib.import_module("sam_kernels.ops.grad_norm")

SHAPES = [(0,), (1,), (17,), (30, 7), (1000,), (3, 64), (129,)]


def make(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def clones(ts):
    return [t.clone() for t in ts]


# ------------------------------------------------------------------------ cpu_blocks
@pytest.mark.parametrize("block", [1, 16, 64, 1000, 1 << 16])
def test_cpu_blocks_cover_every_element_once(block):
    a = [torch.zeros(s) for s in SHAPES] + [torch.zeros(40, 3)[:, 0]]  # one strided tensor
    b = [torch.zeros_like(t) for t in a]
    seen_idx = []
    for idx, (xa, xb) in cpu_blocks([a, b], block):
        assert len(idx) == len(xa) == len(xb)
        if len(xa) > 1:
            assert sum(t.numel() for t in xa) <= max(block, max(t.numel() for t in xa))
        for i, va, vb in zip(idx, xa, xb):
            assert va.untyped_storage().data_ptr() == a[i].untyped_storage().data_ptr()
            assert vb.shape == va.shape
            va.add_(1.0)
            vb.add_(2.0)
        seen_idx.extend(idx)
    assert sorted(set(seen_idx)) == list(range(len(a)))
    assert all(bool((t == 1).all()) for t in a)
    assert all(bool((t == 2).all()) for t in b)


def test_cpu_blocks_small_lists_are_one_block():
    a = make()
    blocks = list(cpu_blocks([a, a], 1 << 16))
    assert len(blocks) == 1
    idx, (x, y) = blocks[0]
    assert idx == list(range(len(a))) and all(u is v for u, v in zip(x, a))


# ------------------------------------------------------------------------ helpers
def test_sanitize_in_place():
    t = [torch.tensor([1.5, float("nan"), float("-inf"), -0.0]), torch.tensor([2.0])]
    sanitize_(t, torch.tensor(0.0))
    assert all(bool((x == 0).all()) for x in t)
    u = [torch.tensor([1.5, float("nan"), -0.0])]
    ref = u[0].clone()
    sanitize_(u, torch.tensor(1.0))
    assert torch.equal(u[0].view(torch.int32), ref.view(torch.int32))


def test_scratch_ok_refuses_aliasing_and_other_dtypes():
    p = [torch.randn(5), torch.randn(3)]
    assert scratch_ok(p, [torch.randn(5), torch.randn(3)])
    assert not scratch_ok(p, [torch.randn(5), p[1]])  # p[1] itself
    assert not scratch_ok(p, [torch.randn(5), p[0][:3]])  # a view of another parameter
    assert not scratch_ok(p, [torch.randn(5, dtype=torch.float64), torch.randn(3)])


# ------------------------------------------------------------------------ steps
def _force_old(monkeypatch, mod):
    monkeypatch.setattr(mod, "in_place_ok", lambda *a, **k: False)


SGD_CFGS = [
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, maximize=False),
    dict(momentum=0.8, dampening=0.3, weight_decay=0.0, maximize=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("okv", [1.0, 0.0])
@pytest.mark.parametrize("cfg", SGD_CFGS)
@pytest.mark.parametrize("lincomb", [False, True])
@pytest.mark.parametrize("block", [64, 1 << 16])
def test_sgd_in_place_equals_temporary_form(monkeypatch, dtype, okv, cfg, lincomb, block):
    monkeypatch.setattr(_common, "CPU_BLOCK", block)
    params, backups = make(dtype, 1), make(dtype, 2)
    grads = make(dtype, 3)
    if okv == 0.0:
        grads[3][2, 1] = float("nan")
        grads[4][0] = float("inf")
    g = sk.LinComb((grads, make(dtype, 4)), torch.tensor([0.7, -0.2])) if lincomb else grads
    results = []
    for old in (False, True):
        with monkeypatch.context() as mp:
            if old:
                _force_old(mp, sgd_mod)
            ps, bufs = clones(params), [t.abs() for t in make(dtype, 5)]
            steps = [torch.full((), 2.0) for _ in ps]
            for _ in range(2):
                hyper = SgdHyper(0.05, **cfg)
                sgd_mod.sgd_step_eager(ps, g, bufs, steps, backups, hyper, torch.tensor(okv))
            results.append(ps + bufs + steps)
    assert same(results[0], results[1], dtype=True)
    if okv == 0.0:
        assert same(results[0][: len(SHAPES)], backups, dtype=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("okv", [1.0, 0.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_in_place_matches_temporary_form(monkeypatch, dtype, okv, maximize):
    """Moments and step counters bit for bit; parameters within an ulp of the update (the
    in-place form takes the update as torch's addcdiv); a skipped step changes nothing."""
    monkeypatch.setattr(_common, "CPU_BLOCK", 64)
    params, backups, grads = make(dtype, 1), make(dtype, 2), make(dtype, 3)
    if okv == 0.0:
        grads[3][0, 0] = float("nan")
    results = []
    for old in (False, True):
        with monkeypatch.context() as mp:
            if old:
                _force_old(mp, adamw_mod)
            ps, m = clones(params), make(dtype, 5)
            v = [t.abs() for t in make(dtype, 6)]
            steps = [torch.full((), 3.0, dtype=dtype) for _ in ps]
            ok_t = torch.tensor(okv)
            for _ in range(2):
                hyper = AdamWHyper(1e-2, 0.9, 0.999, 1e-8, 0.05, False, maximize)
                adamw_mod.adamw_step_eager(ps, grads, m, v, [], steps, backups, hyper, ok_t)
            results.append((ps, m + v + steps))
    (p_new, s_new), (p_old, s_old) = results
    assert same(s_new, s_old, dtype=True)
    eps = torch.finfo(dtype).eps
    for a, b in zip(p_new, p_old):
        # an ulp of the update (~lr) apart, which the final rounding may carry to an ulp of p
        torch.testing.assert_close(a, b, rtol=2 * eps, atol=1e-2 * eps)
    if okv == 0.0:
        assert same(p_new, backups, dtype=True)


def test_aliased_gradients_take_the_temporary_form():
    """A gradient that is a parameter itself (allowed: inputs may alias outputs)."""
    ps = make()
    ps_ref = clones(ps)
    backups, b_ref = [torch.empty_like(p) for p in ps], [torch.empty_like(p) for p in ps]
    sk.perturb_(ps, ps, backups, torch.tensor(0.5), backend="eager")
    scratch = clones(ps_ref)  # the same values through separate gradient tensors
    sk.perturb_(ps_ref, scratch, b_ref, torch.tensor(0.5), backend="eager")
    assert same(ps, ps_ref, dtype=True) and same(backups, b_ref, dtype=True)


# ------------------------------------------------------------------------ norm
@pytest.mark.parametrize("block", [7, 64, 1 << 17])
def test_cpu_norm_blocks(monkeypatch, block):
    monkeypatch.setattr(norm_mod, "CPU_BLOCK", block)
    gs = make() + [torch.randn(50, 4)[:, 1], torch.randn(4, 5, 6).transpose(0, 2)]
    want = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in gs]))
    got = sk.grad_norm(gs, backend="eager")
    assert got.dtype == torch.float32
    assert abs(float(got) - float(want)) <= 1e-6 * float(want)
    gs[-1][1, 2, 3] = float("nan")
    assert not torch.isfinite(sk.grad_norm(gs, backend="eager"))
