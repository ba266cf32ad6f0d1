"""The eager (foreach) fused-op backend against plain per-tensor float64 formulas.

The eager backend is the reference every other backend is tested against, so here it is
checked against independent per-tensor loops written from the spec's equations.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import OP_TOL, bits, close, same

import sam_kernels as sk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [[0], [1], [17], [4097], [3, 5, 0, 1, 33], [7] * 40]


def make(sizes, dtype, noncontig=False):
    out = []
    for n in sizes:
        if noncontig and n > 1:
            t = torch.randn(n, 2).to(dtype)[:, 0]  # a strided view (stride 2)
        else:
            t = torch.randn(n).to(dtype)
        out.append(t)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_norm(sizes, dtype, adaptive):
    gs, ps = make(sizes, dtype), make(sizes, dtype)
    eta = 0.01 if adaptive else 0.0
    got = sk.grad_norm(gs, ps if adaptive else None, eta=eta, backend="eager")
    assert got.dtype == torch.float32 and got.dim() == 0
    ref = sum(
        (((p.double().abs() + eta) if adaptive else 1.0) * g.double()).pow(2).sum()
        for g, p in zip(gs, ps)
    )
    ref = torch.as_tensor(ref, dtype=torch.float64).sqrt()
    assert abs(got.double() - ref) <= OP_TOL[dtype] * max(ref.item(), 1e-30) + 1e-30


def test_grad_norm_nonfinite_and_empty():
    assert sk.grad_norm([], backend="eager").item() == 0.0
    gs = [torch.randn(5), torch.randn(3)]
    gs[1][2] = float("nan")
    assert not torch.isfinite(sk.grad_norm(gs))
    assert sk.finite_flag(gs).item() == 0.0
    gs[1][2] = float("inf")
    assert sk.finite_flag(gs).item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_perturb(sizes, dtype, adaptive, per_tensor):
    ps, gs = make(sizes, dtype, noncontig=True), make(sizes, dtype)
    ps0 = [p.clone() for p in ps]
    backups = [torch.full_like(p, float("nan")) for p in ps]
    scale = torch.rand(len(ps)) if per_tensor else torch.tensor(0.37)
    eta = 0.1 if adaptive else 0.0
    sk.perturb_(ps, gs, backups, scale, adaptive=adaptive, eta=eta, backend="eager")
    for i, (p, p0, g, b) in enumerate(zip(ps, ps0, gs, backups)):
        assert torch.equal(b, p0), "backup must be bit-exact"
        s = scale[i] if per_tensor else scale
        t2 = (p0.double().abs() + eta) ** 2 if adaptive else 1.0
        # ASAM chains |p|, +eta, square, *g, *s, +p: six roundings in bf16/fp16
        # the eager path computes in the tensors' dtype (as torch.optim does) and chains 6
        # low-precision roundings (adaptive) or 2: the bound grows with them (by 6 / 2 or 1)
        mul = 3 if adaptive and dtype != torch.float32 else 1
        close(p, p0.double() + s.double() * t2 * g.double(), dtype, tol_mul=mul)
    sk.restore_(ps, backups, backend="eager")
    assert all(torch.equal(p, p0) for p, p0 in zip(ps, ps0))


def _perturb_both_paths(monkeypatch, ps, gs, scale, adaptive, eta):
    """perturb_ on the eager backend twice from the same inputs: its scratch path (writes the
    parameters before it has read everything) and the temporary-list path that runs while
    torch.compile traces (``scratch_ok`` is False there, forced here through
    ``torch.compiler.is_compiling``). Returns ``[(params, backups)]`` of each."""
    out = []
    for compiling in (False, True):
        p, b = [t.clone() for t in ps], [torch.full_like(t, float("nan")) for t in ps]
        with monkeypatch.context() as mp:
            if compiling:
                mp.setattr(torch.compiler, "is_compiling", lambda: True)
            sk.perturb_(p, gs, b, scale, adaptive=adaptive, eta=eta, backend="eager")
        out.append((p, b))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", [[1], [17], [4097], [3, 5, 0, 1, 33], [7] * 40])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_perturb_paths_bit_identical(monkeypatch, sizes, dtype, adaptive, per_tensor):
    """Both eager paths of perturb_ round alike, bit for bit. They did not: on CPU fp32 the
    scratch path took ``p + s * g`` as one addcmul (one rounding) and the temporary path as
    ``(g * s) + p`` (the product rounded on its own), an ulp apart on about 5% of the elements,
    so a training step under torch.compile left other weights than the same step run eagerly."""
    gen = torch.Generator().manual_seed(len(sizes) * 1000 + sizes[0])
    ps = [torch.randn(n, 2, generator=gen).to(dtype)[:, 0] for n in sizes]  # strided views
    gs = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    scale = torch.rand(len(ps), generator=gen) if per_tensor else torch.rand((), generator=gen)
    (p_a, b_a), (p_b, b_b) = _perturb_both_paths(monkeypatch, ps, gs, scale, adaptive, 0.1)
    assert same(b_a, ps, dtype=True) and same(b_b, ps, dtype=True)
    for a, b in zip(p_a, p_b):
        assert a.dtype == b.dtype == dtype
        # bits, so that -0.0 and 0.0 differ too
        assert torch.equal(bits(a), bits(b))


def test_perturb_compiled_equals_eager():
    """The same through torch.compile itself (backend "eager": the graph runs ATen's ops)."""
    gen = torch.Generator().manual_seed(5)
    ps = [torch.randn(s, generator=gen) for s in [(10, 6), (10,), (4097,)]]
    gs = [torch.randn_like(p) for p in ps]
    scale = torch.tensor(0.0371)

    def run(p, b):
        sk.perturb_(p, gs, b, scale, backend="eager")

    torch._dynamo.reset()
    results = []
    for fn in (run, torch.compile(run, backend="eager", fullgraph=False)):
        p, b = [t.clone() for t in ps], [torch.empty_like(t) for t in ps]
        fn(p, b)
        results.append(p + b)
    torch._dynamo.reset()
    assert same(results[0], results[1], dtype=True)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_noise_perturb_reference_stream(kind):
    ps = make([4, 0, 9], torch.float32)
    ps0 = [p.clone() for p in ps]
    backups = [torch.empty_like(p) for p in ps]
    scale = torch.tensor([0.1, 0.2, 0.3])
    torch.manual_seed(5)
    sk.noise_perturb_(ps, backups, scale, kind=kind, half_cube_len=0.5, backend="eager")
    torch.manual_seed(5)
    for i, (p, p0) in enumerate(zip(ps, ps0)):
        if kind == "normal":
            eps = torch.normal(0, 1, size=p0.shape)
        else:
            eps = 2 * 0.5 * torch.rand(p0.shape) - 0.5
        assert torch.allclose(p, p0 + scale[i] * eps, rtol=1e-6, atol=1e-7)
        assert torch.equal(backups[i], p0)
    # a second sample perturbs from the backup, not from the current weights
    sk.noise_perturb_(ps, backups, scale, save_backup=False, noise=[torch.ones_like(p) for p in ps])
    for i, p0 in enumerate(ps0):
        assert torch.allclose(ps[i], p0 + scale[i], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_lincomb(dtype, per_tensor):
    sizes = [0, 1, 17, 300]
    terms = [make(sizes, dtype) for _ in range(3)]
    coefs = torch.randn(3, len(sizes)) if per_tensor else torch.randn(3)
    out = [torch.full_like(t, float("nan")) for t in terms[0]]
    sk.lincomb_(out, terms, coefs, backend="eager")
    for i, o in enumerate(out):
        ref = sum(
            (coefs[k, i] if per_tensor else coefs[k]).double() * terms[k][i].double()
            for k in range(3)
        )
        close(o, ref, dtype)
    # out may alias a term
    sk.lincomb_(terms[0], terms, coefs, backend="eager")
    for i in range(len(sizes)):
        close(terms[0][i], out[i].double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_frob_accumulate(dtype):
    sizes = [0, 1, 17, 4097]
    cross, gsum, gs = make(sizes, dtype), make(sizes, dtype), make(sizes, dtype)
    c0, s0 = [c.clone() for c in cross], [s.clone() for s in gsum]
    loss = torch.tensor(1.7)
    sk.frob_accumulate_(cross, gsum, gs, loss, backend="eager")
    for c, s, a, b, g in zip(cross, gsum, c0, s0, gs):
        close(c, a.double() + 1.7 * g.double(), dtype)
        close(s, b.double() + g.double(), dtype)


def test_aesam_stats_sequence():
    stats = torch.zeros(2)
    mu = var = 0.0
    delta, c = 0.9, 0.5
    for t in range(6):
        gs = [torch.randn(7) * (t + 1), torch.randn(3)]
        s = sum(float(g.double().pow(2).sum()) for g in gs)
        mu = delta * mu + (1 - delta) * s
        var = delta * var + (1 - delta) * (s - mu) ** 2
        want = 1 if s >= mu + c * var**0.5 else 0
        got = sk.aesam_stats_(gs, stats, delta=delta, c=c, backend="eager")
        assert int(got) == want
        assert stats[0].item() == pytest.approx(mu, rel=1e-5)
        assert stats[1].item() == pytest.approx(var, rel=1e-4)
    before = stats.clone()
    bad = [torch.tensor([float("nan")])]
    assert int(sk.aesam_stats_(bad, stats, delta=delta, c=c)) == sk.DECISION_NONFINITE
    assert torch.equal(stats, before)


SGD_CASES = [
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-3, maximize=False),
    dict(momentum=0.9, dampening=0.3, nesterov=False, weight_decay=0.0, maximize=True),
    dict(momentum=0.8, dampening=0.0, nesterov=True, weight_decay=5e-4, maximize=False),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01, maximize=False),
]


def _run_sgd_pair(cfg, dtype, use_backup, lr):
    sizes = [0, 1, 17, 301]
    ps = make(sizes, dtype)
    ref_ps = [p.clone().requires_grad_() for p in ps]
    ref = torch.optim.SGD(ref_ps, lr=lr, **cfg)
    bufs = [torch.zeros_like(p) for p in ps] if cfg["momentum"] else []
    steps = [torch.zeros(()) for _ in ps]
    for _ in range(5):
        gs = make(sizes, dtype)
        for p, g in zip(ref_ps, gs):
            p.grad = g.clone()
        ref.step()
        backups = None
        if use_backup:  # the step must read the backup, not the (perturbed) params
            backups = [p.clone() for p in ps]
            torch._foreach_add_(ps, 1.0)
        sk.sgd_step_(ps, gs, bufs, steps, backups=backups, lr=lr, ok=torch.tensor(1.0), **cfg)
    return ps, ref_ps


@pytest.mark.parametrize("cfg", SGD_CASES)
@pytest.mark.parametrize("use_backup", [False, True])
def test_sgd_step_matches_torch(cfg, use_backup):
    ps, ref_ps = _run_sgd_pair(cfg, torch.float32, use_backup, 0.05)
    for p, r in zip(ps, ref_ps):
        close(p, r.detach().double(), torch.float32)


def test_sgd_step_tensor_lr_and_bf16():
    cfg = SGD_CASES[0]
    ps, ref_ps = _run_sgd_pair(cfg, torch.bfloat16, False, 0.05)
    for p, r in zip(ps, ref_ps):
        close(p, r.detach().double(), torch.bfloat16)


ADAM_CASES = [
    dict(weight_decay=0.01, amsgrad=False, maximize=False, beta1=0.9, beta2=0.999, eps=1e-8),
    dict(weight_decay=0.1, amsgrad=True, maximize=True, beta1=0.8, beta2=0.99, eps=1e-6),
]


@pytest.mark.parametrize("cfg", ADAM_CASES)
@pytest.mark.parametrize("use_backup", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_adamw_step_matches_torch(cfg, use_backup, tensor_lr):
    sizes = [0, 1, 17, 301]
    ps = make(sizes, torch.float32)
    ref_ps = [p.clone().requires_grad_() for p in ps]
    kw = {k: v for k, v in cfg.items() if k not in ("beta1", "beta2")}
    ref = torch.optim.AdamW(ref_ps, lr=1e-2, betas=(cfg["beta1"], cfg["beta2"]), **kw)
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    vm = [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros(()) for _ in ps]
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    for _ in range(5):
        gs = make(sizes, torch.float32)
        for p, g in zip(ref_ps, gs):
            p.grad = g.clone()
        ref.step()
        backups = None
        if use_backup:
            backups = [p.clone() for p in ps]
            torch._foreach_add_(ps, 1.0)
        sk.adamw_step_(ps, gs, m, v, vm, steps, backups=backups, lr=lr, ok=torch.tensor(1.0), **cfg)
    for p, r in zip(ps, ref_ps):
        close(p, r.detach().double(), torch.float32)
    assert [s.item() for s in steps] == [5.0] * len(ps)


@pytest.mark.parametrize("which", ["sgd", "adamw"])
def test_step_ok_zero_changes_nothing(which):
    sizes = [0, 1, 17, 301]
    ps = make(sizes, torch.float32)
    gs = make(sizes, torch.float32)
    gs[2][3] = float("nan")
    gs[3][0] = float("inf")
    state = [make(sizes, torch.float32) for _ in range(3)]
    state[1] = [t.abs() for t in state[1]]  # second moments are >= 0
    state[2] = [t.abs() for t in state[2]]
    steps = [torch.full((), 3.0) for _ in ps]
    backups = [p.clone() for p in ps]
    torch._foreach_add_(ps, 0.5)  # "perturbed" params: the step must restore them
    snap = [[t.clone() for t in lst] for lst in state] + [[s.clone() for s in steps]]
    ok = sk.finite_flag(gs)
    assert ok.item() == 0.0
    if which == "sgd":
        sk.sgd_step_(ps, gs, state[0], steps, backups=backups, lr=0.1, momentum=0.9, ok=ok)
    else:
        sk.adamw_step_(ps, gs, *state, steps, backups=backups, lr=0.1, amsgrad=True, ok=ok)
    assert all(torch.equal(p, b) for p, b in zip(ps, backups))
    for lst, old in zip(state + [steps], snap):
        assert all(torch.equal(a, b) for a, b in zip(lst, old))


def test_lincomb_gradient_in_step():
    sizes = [5, 17]
    ps = make(sizes, torch.float32)
    ps2 = [p.clone() for p in ps]
    terms = [make(sizes, torch.float32) for _ in range(3)]
    coefs = torch.tensor([1.11, 0.09, -0.2])
    comb = sk.LinComb(tuple(terms), coefs)
    s1, s2 = [torch.zeros(()) for _ in ps], [torch.zeros(()) for _ in ps]
    sk.sgd_step_(ps, comb, [], s1, lr=0.1)
    g = [sum(coefs[k] * terms[k][i] for k in range(3)) for i in range(len(sizes))]
    sk.sgd_step_(ps2, g, [], s2, lr=0.1)
    for a, b in zip(ps, ps2):
        close(a, b.double(), torch.float32)


def test_bad_inputs():
    a = [torch.randn(3)]
    with pytest.raises(ValueError, match="grads"):
        sk.grad_norm(a, [torch.randn(3), torch.randn(2)])
    with pytest.raises(ValueError, match="sparse"):
        sk.grad_norm([torch.randn(3).to_sparse()])
    with pytest.raises(ValueError, match="backend"):
        sk.grad_norm(a, backend="nope")
    with pytest.raises(ValueError, match="kind"):
        sk.noise_perturb_(a, [torch.empty(3)], torch.tensor(1.0), kind="cauchy")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="different devices"):
            sk.grad_norm([torch.randn(3), torch.randn(3, device="cuda")])


def test_backend_chooser(monkeypatch):
    from sam_kernels import _backend

    monkeypatch.delenv("SAM_KERNELS_BACKEND", raising=False)
    # CPU tensors: the compiled extension when it is built, else the eager reference
    assert sk.backend_name("cpu") == ("ext" if sk.available("ext", "cpu") else "eager")
    monkeypatch.setenv("SAM_KERNELS_BACKEND", "eager")
    assert sk.backend_name("cpu") == "eager"
    monkeypatch.setenv("SAM_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SAM_KERNELS_BACKEND"):
        sk.backend_name("cpu")
    monkeypatch.delenv("SAM_KERNELS_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        _backend.resolve("grad_norm", torch.device("cpu"), "triton")


def _cpu_backends() -> list[str]:
    return [b for b in ("eager", "triton", "ext") if sk.available(b, "cpu")]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("beta2", [0.999, 0.9999])
def test_adamw_bias_corrections_in_float64(backend, beta2):
    """``1 - beta^t`` from the betas as torch's AdamW takes them (Python floats: fp64), not from
    their fp32 roundings: ``beta2 = 0.9999`` rounded to fp32 is off by 2.5e-9, which ``1 - beta2^t``
    turns into a 2e-4 relative error of the step at small ``t`` (8e-5 at ``t = 1``), where torch's
    step is exact to fp32 rounding. Parameters at zero and no weight decay: the new parameter is
    the update itself, compared with the fp64 formula on the same fp32 inputs."""
    beta1, eps, lr = 0.9, 1e-8, 1.0
    gen = torch.Generator().manual_seed(3)
    counts = [0.0, 1.0, 9.0, 99.0, 999.0]
    ps = [torch.zeros(7) for _ in counts]
    gs = [torch.randn(7, generator=gen) for _ in counts]
    m = [0.1 * torch.randn(7, generator=gen) for _ in counts]
    v = [0.01 * torch.rand(7, generator=gen) for _ in counts]
    m0, v0 = [x.double() for x in m], [x.double() for x in v]
    steps = [torch.tensor(c) for c in counts]
    sk.adamw_step_(
        ps, gs, m, v, [], steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=0.0,
        amsgrad=False, maximize=False, ok=torch.tensor(1.0), backend=backend,
    )  # fmt: skip
    for i, (p, g, c) in enumerate(zip(ps, gs, counts)):
        t = c + 1.0
        g64 = g.double()
        m1 = beta1 * m0[i] + (1.0 - beta1) * g64
        v1 = beta2 * v0[i] + (1.0 - beta2) * g64 * g64
        want = -lr * (m1 / (1.0 - beta1**t)) / (v1.sqrt() / (1.0 - beta2**t) ** 0.5 + eps)
        err = float(((p.double() - want).abs() / want.abs()).max())
        assert err < 2e-6, (i, t, err)
