"""The compiled extension (``backend="cuda"``, csrc/) against the eager reference.

Without the built library every test that needs it is skipped with the reason (the package then
runs on Triton / eager). With it, the C++ CPU ops run here on every CI run; with a GPU (marker
``gpu``) the same tests run on CUDA tensors, plus CUDA against Triton and whole optimizers.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _helpers import OP_TOL, close
from torch import nn

import sam_kernels as sk
from sam_kernels.ops.lincomb import LinComb

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        from sam_kernels import cuda_ext as EXT

        WHY = ""
    except ImportError as exc:
        EXT, WHY = None, str(exc)

needs_ext = pytest.mark.skipif(EXT is None, reason=f"compiled extension not built: {WHY}")
HAS_CUDA_EXT = EXT is not None and EXT.has_cuda_kernels() and torch.cuda.is_available()
NO_CUDA_WHY = (
    "needs a CUDA device" if not torch.cuda.is_available() else "extension built without CUDA"
)

DEVICES = [pytest.param("cpu", id="cpu")] + [
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not HAS_CUDA_EXT, reason=NO_CUDA_WHY),
        ],
    )
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [[0], [1], [17], [4097], [3, 5, 0, 1, 33], [7] * 40, [65539, 31, 0, 2049]]
NAN = float("nan")

pytestmark = needs_ext


def make(sizes, dtype, device, noncontig=False, scale=1.0):
    out = []
    for n in sizes:
        if noncontig and n > 1:
            t = (torch.randn(n, 2, device=device) * scale).to(dtype)[:, 0]  # stride 2
        else:
            t = (torch.randn(n, device=device) * scale).to(dtype)
        out.append(t)
    return out


def poisoned(ts):
    return [torch.full_like(t, NAN) for t in ts]


def clones(ts):
    return [t.clone() for t in ts]


def all_close(xs, ys, dtype, tol_mul=1.0, ref_finite_only=False):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        close(a, b, dtype, tol_mul, ref_finite_only, alike=True)


# ------------------------------------------------------------------------------ loading, chooser
def test_chooser_knows_the_extension(monkeypatch):
    monkeypatch.delenv("SAM_KERNELS_BACKEND", raising=False)
    assert sk.available("ext", "cpu")
    assert sk.backend_name("cpu", "ext") == "ext"
    # "cuda", the extension's former name, still selects it
    assert sk.available("cuda", "cpu")
    assert sk.backend_name("cpu", "cuda") == "ext"
    # built, it is the CPU default, but for the noise op (the reference's global stream)
    assert sk.backend_name("cpu") == "ext"
    cpu = [torch.ones(3)]
    assert sk.runs_on("grad_norm", cpu) == "ext"
    assert sk.runs_on("noise_perturb", cpu) == "eager"
    assert sk.runs_on("noise_perturb", cpu, backend="ext") == "ext"
    assert EXT.supports("cpu")
    assert EXT.supports("cuda") == HAS_CUDA_EXT
    assert EXT.LIBRARY.exists()


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in kat:
        assert EXT.philox4x32_10(ctr, key) == list(want)


# ------------------------------------------------------------------------------ reductions
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_norm(device, sizes, dtype, adaptive):
    gs = make(sizes, dtype, device, noncontig=True)
    ps = make(sizes, dtype, device)
    eta = 0.01 if adaptive else 0.0
    got = sk.grad_norm(gs, ps if adaptive else None, eta=eta, backend="cuda")
    want = sk.grad_norm(gs, ps if adaptive else None, eta=eta, backend="eager")
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.device.type == device or not any(g.numel() for g in gs)
    # against float64: the extension forms T(p)*g in fp32 and accumulates in fp32 (CUDA) or
    # fp64 (CPU) per chunk
    ref = sum(
        (((p.double().abs() + eta) if adaptive else 1.0) * g.double()).pow(2).sum().item()
        for g, p in zip(gs, ps)
    )
    ref = ref**0.5
    assert abs(got.item() - ref) <= 5e-6 * ref + 1e-30
    # against eager, which accumulates in fp32 and rounds T(p)*g to the dtype before squaring
    tol = OP_TOL[dtype] if adaptive and dtype != torch.float32 else 2e-5
    assert abs(got.item() - want.item()) <= tol * max(want.item(), 1e-30) + 1e-30


@pytest.mark.parametrize("device", DEVICES)
def test_grad_norm_deterministic_and_nonfinite(device):
    gs = make([100003, 5, 70000, 1, 4097] * 3, torch.float32, device)
    a = sk.grad_norm(gs, backend="cuda")
    b = sk.grad_norm(gs, backend="cuda")
    assert torch.equal(a, b)
    if device == "cpu":  # same bits whatever the thread count
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            c = sk.grad_norm(gs, backend="cuda")
        finally:
            torch.set_num_threads(n)
        assert torch.equal(a, c)
    gs[2][123] = NAN
    assert torch.isnan(sk.grad_norm(gs, backend="cuda"))
    gs[2][123] = float("inf")
    assert not torch.isfinite(sk.grad_norm(gs, backend="cuda"))
    assert sk.finite_flag(gs, backend="cuda").item() == 0.0
    assert sk.grad_norm([], backend="cuda").item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_aesam_stats(device, dtype):
    sizes = [17, 4097, 0, 33]
    stats_a = torch.zeros(2, device=device)
    stats_b = torch.zeros(2, device=device)
    for step in range(6):
        gs = make(sizes, dtype, device, scale=0.5 + step * 0.3 * (-1) ** step)
        c = 1.0 - step / 3
        got = sk.aesam_stats_(gs, stats_a, delta=0.9, c=c, backend="cuda")
        want = sk.aesam_stats_(gs, stats_b, delta=0.9, c=c, backend="eager")
        assert got.dtype == torch.int32 and got.dim() == 0 and got.device == stats_a.device
        torch.testing.assert_close(stats_a, stats_b, rtol=1e-5, atol=0)
        # the decision compares s with mu + c*sqrt(var): equal unless within rounding of the edge
        s = sum(g.double().pow(2).sum() for g in gs)
        edge = stats_b[0].double() + c * stats_b[1].double().sqrt()
        if abs(s - edge) > 1e-4 * abs(edge):
            assert got.item() == want.item()
    gs[1][0] = NAN
    before = stats_a.clone()
    assert sk.aesam_stats_(gs, stats_a, delta=0.9, c=0.0, backend="cuda").item() == -1
    assert torch.equal(stats_a, before)


# ------------------------------------------------------------------------------ element-wise
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_perturb_and_restore(device, sizes, dtype, adaptive, per_tensor):
    ps = make(sizes, dtype, device, noncontig=True)
    gs = make(sizes, dtype, device)
    ref_ps = clones(ps)
    backups, ref_backups = poisoned(ps), poisoned(ps)
    scale = torch.rand(len(ps), device=device) if per_tensor else torch.tensor(0.37, device=device)
    eta = 0.1 if adaptive else 0.0
    p0 = clones(ps)
    sk.perturb_(ps, gs, backups, scale, adaptive=adaptive, eta=eta, backend="cuda")
    sk.perturb_(ref_ps, gs, ref_backups, scale, adaptive=adaptive, eta=eta, backend="eager")
    for b, p in zip(backups, p0):
        assert torch.equal(b, p), "backup must be bit-exact"
    # against the exact value (float64), then against eager, which rounds each intermediate
    # (|p| + eta, its square, times g, times s) to the dtype: a few ulps of T^2*g*s apart
    for i, (p, q, g) in enumerate(zip(ps, p0, gs)):
        s = (scale[i] if per_tensor else scale).double()
        t2 = (q.double().abs() + eta) ** 2 if adaptive else 1.0
        close(p, (q.double() + s * t2 * g.double()).to(dtype), dtype, alike=True)
    all_close(ps, ref_ps, dtype, tol_mul=1.0 if dtype == torch.float32 or not adaptive else 4.0)
    sk.restore_(ps, backups, backend="cuda")
    for p, q in zip(ps, p0):
        assert torch.equal(p, q), "restore must be bit-exact"
    # restore into poisoned tensors (fully written)
    dst = poisoned(p0)
    sk.restore_(dst, p0, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(dst, p0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("alias", [False, True])
def test_lincomb(device, dtype, k, per_tensor, alias):
    sizes = [17, 0, 4097, 1, 65539, 5]
    terms = [make(sizes, dtype, device, noncontig=(j == 1)) for j in range(k)]
    coefs = (
        torch.randn(k, len(sizes), device=device) if per_tensor else torch.randn(k, device=device)
    )
    want = poisoned(terms[0])
    sk.lincomb_(want, terms, coefs, backend="eager")
    if alias:  # out is terms[0] itself
        out = terms[0]
        terms = [clones(terms[0])] + terms[1:]
        sk.lincomb_(out, [out] + terms[1:], coefs, backend="cuda")
    else:
        out = poisoned(terms[0])
        sk.lincomb_(out, terms, coefs, backend="cuda")
    all_close(out, want, dtype, tol_mul=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
def test_frob_accumulate(device, dtype, sizes):
    cross, gsum = make(sizes, dtype, device), make(sizes, dtype, device, noncontig=True)
    rc, rg = clones(cross), clones(gsum)
    for _ in range(2):
        gs = make(sizes, dtype, device)
        loss = torch.rand((), device=device) * 3
        sk.frob_accumulate_(cross, gsum, gs, loss, backend="cuda")
        sk.frob_accumulate_(rc, rg, gs, loss, backend="eager")
    all_close(cross, rc, dtype, tol_mul=2.0)
    all_close(gsum, rg, dtype, tol_mul=2.0)


# ------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_noise_perturb(device, dtype, kind):
    sizes = [0, 1, 17, 4097, 65539, 3]
    ps = make(sizes, dtype, device, noncontig=True)
    p0 = clones(ps)
    backups = poisoned(ps)
    a = 0.3
    scale = torch.rand(len(ps), device=device) + 0.5
    seed = torch.tensor(1234567890123, device=device)
    offset = torch.tensor(77, device=device)
    kw = dict(kind=kind, half_cube_len=a, seed=seed, offset=offset, backend="cuda")
    sk.noise_perturb_(ps, backups, scale, **kw)
    assert all(torch.equal(b, q) for b, q in zip(backups, p0))
    first = clones(ps)
    # regenerated from the backups (save_backup=False): the same values, bit for bit
    sk.noise_perturb_(ps, backups, scale, save_backup=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(ps, first))
    # another offset: other values
    sk.noise_perturb_(ps, backups, scale, save_backup=False, **{**kw, "offset": offset + 1})
    assert not torch.equal(ps[4], first[4])
    # the values are backups + scale * eps (p written in full)
    for i, (p, b) in enumerate(zip(first, backups)):
        assert torch.isfinite(p.float()).all()
        if dtype == torch.float32 and p.numel():
            eps = (p.double() - b.double()) / scale[i].double()
            assert eps.abs().max() < (a * 1.0001 if kind == "uniform" else 6.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_noise_statistics(device, kind):
    """Moments, and no correlation across neighbouring elements, tensors and offsets."""
    a = 0.5
    n = 1 << 18
    ps = [torch.zeros(n, device=device) for _ in range(2)]
    bk = [torch.zeros(n, device=device) for _ in range(2)]
    seed = torch.tensor(2024, device=device)

    def draw(off):
        sk.noise_perturb_(
            ps,
            bk,
            torch.tensor(1.0, device=device),
            kind=kind,
            half_cube_len=a,
            save_backup=False,
            seed=seed,
            offset=torch.tensor(off, device=device),
            backend="cuda",
        )
        return [p.double().cpu().clone() for p in ps]

    x0, x1 = draw(0)
    y0, _ = draw(n)  # the optimizers advance the offset by the elements drawn per sample
    mean, var = (0.0, 1.0) if kind == "normal" else (0.0, a * a / 3)
    se = (var / n) ** 0.5
    for x in (x0, x1, y0):
        assert abs(x.mean().item() - mean) < 5 * se
        assert abs(x.var().item() / var - 1) < 0.02
        if kind == "uniform":
            assert x.min() >= -a and x.max() < a
        else:
            assert abs((x**4).mean().item() - 3.0) < 0.1  # Gaussian kurtosis

    def corr(u, v):
        return torch.corrcoef(torch.stack([u, v]))[0, 1].item()

    lim = 5 / n**0.5
    assert abs(corr(x0[:-1], x0[1:])) < lim  # neighbours (also within a Box-Muller pair)
    assert abs(corr(x0[0::2], x0[1::2])) < 1.5 * lim
    assert abs(corr(x0, x1)) < lim  # tensors
    assert abs(corr(x0, y0)) < lim  # offsets


# ------------------------------------------------------------------------------ optimizer steps
SGD_CASES = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4, maximize=False),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True),
    dict(momentum=0.8, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False),
]


def _grad_arg(gs_terms, coefs):
    return gs_terms[0] if coefs is None else LinComb(tuple(gs_terms), coefs)


def _sgd_state(ps, hp, device):
    bufs = [torch.zeros_like(p) for p in ps] if hp["momentum"] else []
    steps = [torch.zeros((), device=device) for _ in ps]
    return bufs, steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hp", SGD_CASES)
@pytest.mark.parametrize("from_backups", [False, True])
@pytest.mark.parametrize(
    "grads,lr_kind", [("plain", "float"), ("lincomb3", "float"), ("lincomb2_per_tensor", "tensor")]
)
def test_sgd_step(device, dtype, hp, from_backups, grads, lr_kind):
    sizes = [17, 0, 4097, 1, 33, 65539]
    ps = make(sizes, dtype, device, noncontig=True)
    ref_ps = clones(ps)
    bufs, steps = _sgd_state(ps, hp, device)
    ref_bufs, ref_steps = _sgd_state(ps, hp, device)
    lr = 0.05 if lr_kind == "float" else torch.tensor(0.05, device=device)
    for step in range(3):
        k = {"plain": 1, "lincomb3": 3, "lincomb2_per_tensor": 2}[grads]
        terms = [make(sizes, dtype, device) for _ in range(k)]
        coefs = None
        if grads == "lincomb3":
            coefs = torch.tensor([1.2, -0.3, 0.1], device=device)
        elif grads == "lincomb2_per_tensor":
            coefs = torch.randn(2, len(sizes), device=device)
        ok = None if step == 0 else torch.tensor(1.0, device=device)
        backups = ref_backups = None
        if from_backups:
            backups = clones(ps)  # the saved weights; params hold perturbed garbage
            ref_backups = clones(ref_ps)
            for p, q in zip(ps, ref_ps):
                p.fill_(NAN)
                q.fill_(NAN)
        common = dict(lr=lr, ok=ok, **hp)
        sk.sgd_step_(
            ps, _grad_arg(terms, coefs), bufs, steps, backups=backups, backend="cuda", **common
        )
        sk.sgd_step_(
            ref_ps,
            _grad_arg(terms, coefs),
            ref_bufs,
            ref_steps,
            backups=ref_backups,
            backend="eager",
            **common,
        )
        all_close(ps, ref_ps, dtype, tol_mul=4.0)
        all_close(bufs, ref_bufs, dtype, tol_mul=4.0)
        assert all(torch.equal(a, b) for a, b in zip(steps, ref_steps))
    assert steps[0].item() == 3.0


ADAMW_CASES = [
    dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False),
    dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, amsgrad=True, maximize=False),
    dict(beta1=0.5, beta2=0.9, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=True),
]


def _adamw_state(ps, hp, device):
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    vm = [torch.zeros_like(p) for p in ps] if hp["amsgrad"] else []
    steps = [torch.zeros((), device=device) for _ in ps]
    return m, v, vm, steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hp", ADAMW_CASES)
@pytest.mark.parametrize("from_backups", [False, True])
@pytest.mark.parametrize("grads,lr_kind", [("plain", "float"), ("lincomb3", "tensor")])
def test_adamw_step(device, dtype, hp, from_backups, grads, lr_kind):
    sizes = [17, 0, 4097, 1, 33, 65539]
    ps = make(sizes, dtype, device, noncontig=True)
    # fp16 eager (like torch.optim.AdamW on fp16 tensors) adds eps in fp16, where 1e-8 is 0 and
    # 1e-6 is a subnormal: where sqrt(v) underflows its update is inf or huge, while the fused
    # ops add eps in fp32. So fp16 is compared with eager on fp32 copies of the same state,
    # rounded to fp16 after each step as the fused op stores it.
    ref_dtype = torch.float32 if dtype == torch.float16 else dtype
    ref_ps = [p.to(ref_dtype) for p in ps]
    st = _adamw_state(ps, hp, device)
    ref_st = _adamw_state(ref_ps, hp, device)
    lr = 1e-2 if lr_kind == "float" else torch.tensor(1e-2, device=device)
    for step in range(3):
        k = 1 if grads == "plain" else 3
        terms = [make(sizes, dtype, device) for _ in range(k)]
        coefs = None if k == 1 else torch.randn(3, len(sizes), device=device)
        ok = None if step == 0 else torch.tensor(1.0, device=device)
        backups = ref_backups = None
        if from_backups:
            backups, ref_backups = clones(ps), clones(ref_ps)
            for p, q in zip(ps, ref_ps):
                p.fill_(NAN)
                q.fill_(NAN)
        common = dict(lr=lr, ok=ok, **hp)
        sk.adamw_step_(ps, _grad_arg(terms, coefs), *st, backups=backups, backend="cuda", **common)
        ref_terms = [[t.to(ref_dtype) for t in term] for term in terms]
        sk.adamw_step_(
            ref_ps,
            _grad_arg(ref_terms, coefs),
            *ref_st,
            backups=ref_backups,
            backend="eager",
            **common,
        )
        if ref_dtype != dtype:  # the fused op stores its results in fp16: so does the reference
            for lst in (ref_ps, *ref_st[:3]):
                for q in lst:
                    q.copy_(q.to(dtype))
        tol = 8.0 if dtype == torch.float32 else 2.0
        all_close(ps, [q.to(dtype) for q in ref_ps], dtype, tol_mul=tol)
        for a, b in zip(st[:3], ref_st[:3]):
            all_close(a, [q.to(dtype) for q in b], dtype, tol_mul=tol)
        assert all(torch.equal(a, b) for a, b in zip(st[3], ref_st[3]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("from_backups", [False, True])
def test_step_skipped_when_not_ok(device, dtype, opt, from_backups):
    """ok = 0: params = the saved weights (or unchanged), state and counters untouched."""
    sizes = [17, 0, 4097, 65539]
    ps = make(sizes, dtype, device)
    saved = clones(ps)
    gs = make(sizes, dtype, device)
    gs[2][5] = NAN
    gs[3][7] = float("inf")
    backups = None
    if from_backups:
        backups = clones(ps)
        for p in ps:
            p.add_(1.0)  # "perturbed"
    ok = torch.tensor(0.0, device=device)
    if opt == "sgd":
        state = [make(sizes, dtype, device), [torch.full((), 4.0, device=device) for _ in ps]]
        before = [clones(x) for x in state]
        sk.sgd_step_(ps, gs, *state, backups=backups, lr=0.1, momentum=0.9, ok=ok, backend="cuda")
    else:
        state = [
            make(sizes, dtype, device),
            [t.abs() for t in make(sizes, dtype, device)],
            [t.abs() for t in make(sizes, dtype, device)],
            [torch.full((), 4.0, device=device) for _ in ps],
        ]
        before = [clones(x) for x in state]
        sk.adamw_step_(ps, gs, *state, backups=backups, lr=0.1, amsgrad=True, ok=ok, backend="cuda")
    want = saved
    assert all(torch.equal(p, q) for p, q in zip(ps, want))
    for now, was in zip(state, before):
        assert all(torch.equal(a, b) for a, b in zip(now, was))


# ------------------------------------------------------------------------------ layouts, errors
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_layouts_and_dtypes(device):
    """channels_last / transposed / strided tensors and fp32+bf16 lists in one call."""
    w = torch.randn(4, 3, 5, 5, device=device).to(memory_format=torch.channels_last)
    g = torch.randn(4, 3, 5, 5, device=device)  # contiguous: a different layout from w
    t = torch.randn(6, 9, device=device).t()
    tg = torch.randn(9, 6, device=device)
    h = torch.randn(33, device=device, dtype=torch.bfloat16)
    hg = torch.randn(33, device=device, dtype=torch.bfloat16)
    ps, gs = [w, t, h], [g, tg, hg]
    ref = clones(ps)
    backups, ref_backups = poisoned(ps), poisoned(ps)
    scale = torch.tensor([0.1, 0.2, 0.3], device=device)
    sk.perturb_(ps, gs, backups, scale, backend="cuda")
    sk.perturb_(ref, gs, ref_backups, scale, backend="eager")
    for a, b in zip(ps, ref):
        close(a, b, a.dtype, alike=True)
    assert ps[0].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(a, b) for a, b in zip(backups, ref_backups))


def test_bad_inputs_are_clear_errors():
    ops = torch.ops.sam_kernels_C
    a = torch.randn(4)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.restore_([a.double()], [a.double()])
    with pytest.raises(RuntimeError, match="one dtype per tensor index"):
        ops.restore_([a], [a.half()])
    with pytest.raises(RuntimeError, match="shape"):
        ops.restore_([a], [torch.randn(5)])
    with pytest.raises(RuntimeError, match="expected 1"):
        ops.restore_([a], [a, a])
    with pytest.raises(RuntimeError, match="scale must be 0-d or have 2 entries"):
        ops.perturb_(
            [a, a.clone()], [a, a], [a.clone(), a.clone()], torch.ones(3), False, 0.0, True
        )
    # float64 never reaches the extension: the chooser routes it to eager
    d = [torch.randn(5, dtype=torch.float64)]
    assert sk.grad_norm(d, backend="cuda").dtype == torch.float64


def test_opcheck_and_compile():
    """Schemas, fake impls and torch.compile tracing of the custom ops (CPU)."""
    ops = torch.ops.sam_kernels_C
    ps = [torch.randn(5), torch.randn(3, 2)]
    gs = [torch.randn(5), torch.randn(3, 2)]
    bk = [torch.empty(5), torch.empty(3, 2)]
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.grad_norm, (gs, ps, 0.0), test_utils=tests)
    for save in (True, False):
        torch.library.opcheck(
            ops.perturb_, (ps, gs, bk, torch.tensor(0.1), False, 0.0, save), test_utils=tests
        )
    torch.library.opcheck(ops.restore_, (ps, bk), test_utils=tests)
    torch.library.opcheck(
        ops.sgd_step_,
        (ps, gs, None, [torch.zeros(5), torch.zeros(3, 2)], [torch.zeros(()), torch.zeros(())],
         bk, None, 0.1, 0.9, 0.0, False, 0.0, False, torch.tensor(1.0)),
        test_utils=tests,
    )  # fmt: skip
    torch.library.opcheck(
        ops.aesam_stats_,
        (gs, torch.zeros(2), 0.9, 0.0),
        test_utils=("test_schema", "test_faketensor"),
    )

    def fn(ps, gs, bk):
        n = ops.grad_norm(gs, [], 0.0)
        ops.perturb_(ps, gs, bk, 0.05 / (n + 1e-12), False, 0.0, True)
        ops.restore_(ps, bk)
        return n

    want = fn(clones(ps), gs, clones(bk))
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(clones(ps), gs, clones(bk))
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------ whole optimizer
class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8) * 0.4)
        self.b1 = nn.Parameter(torch.zeros(16))
        self.w2t = nn.Parameter((torch.randn(16, 3) * 0.4).t())  # non-contiguous
        self.b2 = nn.Parameter(torch.zeros(3))
        self.empty = nn.Parameter(torch.randn(0, 4))

    def forward(self, x):
        h = torch.tanh(x @ self.w1.t() + self.b1)
        return h @ self.w2t.t() + self.b2 + self.empty.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_step_of_a_combination_is_the_step_of_its_value(device, k, amsgrad):
    """fp32: the AdamW step given ``k`` gradient terms writes the bits of the step given their
    combination formed first by the extension's ``lincomb_`` (the kernel combines a block ahead
    into a buffer: the same value), from backups, over odd sizes (tails of the blocks)."""
    sizes = [1, 127, 128, 129, 1000, 4099]
    hp = dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, amsgrad=amsgrad, maximize=False)
    terms = [make(sizes, torch.float32, device) for _ in range(k)]
    coefs = torch.randn(k, len(sizes), device=device)
    combined = [torch.empty_like(t) for t in terms[0]]
    sk.lincomb_(combined, terms, coefs, backend="cuda")
    backups = make(sizes, torch.float32, device)
    out = []
    for grad in (LinComb(tuple(terms), coefs), combined):
        ps = [torch.full_like(b, NAN) for b in backups]
        st = _adamw_state(ps, dict(amsgrad=amsgrad), device)
        for _ in range(2):
            sk.adamw_step_(ps, grad, *st, backups=backups, lr=1e-2, backend="cuda", **hp)
        out.append(ps + [t for lst in st[:3] for t in lst])
    for i, (a, b) in enumerate(zip(*out)):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_optimizer_10_steps_vs_eager(device, base, adaptive):
    from python_api import SAM

    torch.manual_seed(0)
    model = SmallNet().to(device)
    ref = copy.deepcopy(model)
    if base == "sgd":
        cls, hp = torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        cls, hp = torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)
    opts = [
        SAM(m.parameters(), cls, rho=0.5 if adaptive else 0.05, adaptive=adaptive, backend=b, **hp)
        for m, b in ((model, "cuda"), (ref, "eager"))
    ]
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(32, 8, generator=g).to(device)
        y = torch.randint(0, 3, (32,), generator=g).to(device)
        for m, o in zip((model, ref), opts):

            def closure(m=m):
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                return loss

            o.zero_grad()
            o.step(closure)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


try:  # the table of every optimizer class (tests/_optim_table.py)
    import _optim_table as _common

    OPT_NAMES = [n for n in _common.NAMES if n not in _common.RANDOM]
except Exception:  # pragma: no cover - that module is absent or broken
    _common, OPT_NAMES = None, []


@pytest.mark.skipif(_common is None, reason="tests/_optim_table.py not importable")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", OPT_NAMES)
def test_every_optimizer_cuda_backend_vs_eager(device, name, base):
    """Each class of the set (noise-free ones) over 10 steps: extension vs eager."""
    data = [(x.to(device), y.to(device)) for x, y in _common.batches(10)]
    torch.manual_seed(5)
    m_e = _common.Net().to(device)
    m_e.bn.eval()  # as in test_triton_matches_eager: keeps AdamW's sign-noise steps out
    m_x = copy.deepcopy(m_e)
    o_e = _common.build(name, base, m_e, backend="eager")
    o_x = _common.build(name, base, m_x, backend="cuda")
    _common.run_steps(name, m_e, o_e, data)
    _common.run_steps(name, m_x, o_x, data)
    for (n, p), q in zip(m_e.named_parameters(), m_x.parameters()):
        err = (p - q).abs().max().item() if p.numel() else 0.0
        assert err < 1e-4, (n, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["FrobSAM", "TraceSAM", "DetSAM"])
def test_noise_optimizers_run_on_the_extension(device, name):
    """Frob/Trace/Det-SAM draw their noise in the extension: finite, reproducible from seed."""
    if _common is None:
        pytest.skip("tests/_optim_table.py not importable")
    data = [(x.to(device), y.to(device)) for x, y in _common.batches(4)]
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        m = _common.Net().to(device)
        o = _common.build(name, "sgd", m, backend="cuda", seed=123)
        _common.run_steps(name, m, o, data)
        runs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*runs):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ GPU: vs Triton
def _triton_ok():
    return torch.cuda.is_available() and sk.available("triton", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EXT, reason=NO_CUDA_WHY)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_vs_triton(dtype):
    if not _triton_ok():
        pytest.skip("Triton backend unavailable")
    dev = "cuda"
    sizes = [17, 0, 4097, 1, 1 << 20, 65539]
    gs, ps = make(sizes, dtype, dev), make(sizes, dtype, dev)
    a = sk.grad_norm(gs, backend="cuda")
    b = sk.grad_norm(gs, backend="triton")
    assert abs(a.item() - b.item()) <= 1e-5 * b.item()
    outs = {}
    for be in ("cuda", "triton"):
        p = clones(ps)
        bk = poisoned(ps)
        sk.perturb_(p, gs, bk, torch.tensor(0.3, device=dev), adaptive=True, backend=be)
        m, v, vm, steps = _adamw_state(ps, dict(amsgrad=True), dev)
        sk.adamw_step_(
            p, gs, m, v, vm, steps, backups=bk, lr=1e-2, amsgrad=True,
            ok=torch.tensor(1.0, device=dev), backend=be,
        )  # fmt: skip
        bufs, st2 = _sgd_state(ps, dict(momentum=0.9), dev)
        sk.sgd_step_(p, gs, bufs, st2, lr=0.1, momentum=0.9, nesterov=True, backend=be)
        outs[be] = (p, m, v, bufs)
    for xs, ys in zip(outs["cuda"], outs["triton"]):
        all_close(xs, ys, dtype, tol_mul=4.0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EXT, reason=NO_CUDA_WHY)
@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_cuda_noise_equals_cpu_noise(kind):
    """The CPU and CUDA builds share the noise contract (ops_math.h): the same noise, bit for bit
    (the CUDA code uses the _rn intrinsics, the C++ build -ffp-contract=off), and eager's."""
    sizes = [17, 4097, 65539, 0, 3]
    out = {}
    for dev in ("cpu", "cuda"):
        ps = [torch.zeros(n, device=dev) for n in sizes]
        bk = [torch.zeros(n, device=dev) for n in sizes]
        sk.noise_perturb_(
            ps, bk, torch.tensor(1.0, device=dev), kind=kind, half_cube_len=0.2,
            save_backup=False, seed=torch.tensor(99, device=dev),
            offset=torch.tensor(5, device=dev), backend="cuda",
        )  # fmt: skip
        out[dev] = [p.cpu() for p in ps]
    eager = [torch.zeros(n) for n in sizes]
    sk.noise_perturb_(
        eager, [torch.zeros(n) for n in sizes], torch.tensor(1.0), kind=kind, half_cube_len=0.2,
        save_backup=False, seed=torch.tensor(99), offset=torch.tensor(5), backend="eager",
    )  # fmt: skip
    for a, b, e in zip(out["cpu"], out["cuda"], eager):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert torch.equal(a.view(torch.int32), e.view(torch.int32))


def test_scalar_glue_ops_take_one_device_with_their_kernels():
    """The glue ops (finite_and, ascent_scale, count_step_) run on CPU tensors, and on CUDA
    tensors of one device where the build has their CUDA kernels; otherwise the binding
    declines (the chooser then runs the next backend) instead of failing in the dispatcher."""
    from sam_kernels._backend import Declined

    cpu, meta = torch.tensor(1.0), torch.tensor(1.0, device="meta")
    assert float(EXT.finite_and_ext(None, [cpu, torch.tensor(float("inf"))])) == 0.0
    with pytest.raises(Declined, match="one device"):
        EXT.finite_and_ext(None, [cpu, meta])
    with pytest.raises(Declined, match="no kernel there"):
        EXT.ascent_scale_ext(meta, torch.ones(3, device="meta"), 1.0, False)
    with pytest.raises(Declined, match="no kernel there"):
        EXT.count_step_ext(torch.zeros(2, device="meta"), meta)
    if HAS_CUDA_EXT:  # the CUDA kernels, where built (bit-identity: test_declared_ops)
        ok = EXT.finite_and_ext(None, [torch.tensor(2.0, device="cuda")])
        assert ok.device.type == "cuda" and float(ok) == 1.0
