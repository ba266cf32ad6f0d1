"""``sam_kernels.filter_noise_perturb_``: R-SAM's filter-wise noise with its backup, one call.

- the eager reference against the spec's formula written here in plain torch (``noise=`` given;
  without it, the documented streams: ``torch.randn(p.shape)`` per tensor, in order, or with a
  ``seed`` the counter stream of ``noise_perturb_``);
- the fused backends (the Triton kernels, the extension's C++ op on CPU tensors) against the
  eager reference fed the same ``z``: the counter stream of
  ``sk.noise_perturb_`` (same seed and offset, zero "params", scale 1, as R-SAM's per-tensor
  draw takes it); backups bit for bit, every output element written (outputs start as NaN);
  ``z`` itself bit for bit on both backends (rows of norm 1, sigma 1: the deltas are ``z``);
  the row norms may round differently (eager's ``vector_norm`` in the weights' precision, the
  kernel's fp64 sum), so the scaled values are compared with a tolerance;
- shapes (empty, one element, 0-d, 1-d, odd sizes, transposed, strided, channels-last, lists
  mixing them), dtypes (fp32, bf16, fp16), sigma as a float, a list or a tensor, bad inputs;
- R-SAM's draw through the op: the same step as the per-tensor draw, and a fixed number of
  launches (and of other ops) whatever the number of parameters;
- the extension: rows over several of its chunks, a result independent of the thread count.

The Triton tests run in the interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
conftest.py when there is no GPU) and unchanged on a CUDA device; they are skipped where the
Triton backend cannot run. The interpreter runs one block per program sized to the largest
tensor, so a variant shrinks the blocks (``small_blocks``) to run tensors over several chunks
(rows starting inside a chunk) and the row norms over several blocks, as on a GPU.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from _helpers import like, unit_rows
from torch.utils._python_dispatch import TorchDispatchMode

import sam_kernels as sk
from python_api.rsam import RSAM

DEVICE = (
    torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.is_available()
    else torch.device("cpu")
)
HAS_TRITON = sk.available("triton", DEVICE)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton backend cannot run here")
# the extension's op is a CPU kernel (on CUDA tensors it declines: Triton's runs)
HAS_EXT = DEVICE.type == "cpu" and sk.available("ext", DEVICE)
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="the extension is not built (CPU kernels)")
FUSED = (["triton"] if HAS_TRITON else []) + (["ext"] if HAS_EXT else [])

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
EPS_1D = 1e-16

# (shape, layout): "c" contiguous, "t" a transposed view (dense, rows not outermost), "s" a
# strided view (not dense), "cl" channels-last (dense, rows outermost)
CASES = {
    "empty": [((0,), "c"), ((0, 5), "c"), ((3, 0), "c")],
    "one": [((1,), "c")],
    "one_2d": [((1, 1), "c")],
    "scalar": [((), "c")],
    "vector": [((17,), "c")],
    "long_vector": [((200,), "c")],
    "conv": [((7, 3, 3, 3), "c")],
    "matrix": [((5, 13), "c")],
    "long_rows": [((3, 150), "c")],
    "transposed": [((13, 5), "t")],
    "strided": [((4, 9), "s")],
    "channels_last": [((6, 3, 4, 5), "cl")],
}
CASES["mixed"] = [
    ((7, 3, 3, 3), "c"),
    ((0,), "c"),
    ((), "c"),
    ((6, 3, 4, 5), "cl"),
    ((17,), "c"),
    ((13, 5), "t"),
    ((1,), "c"),
    ((5, 13), "c"),
    ((4, 9), "s"),
    ((3, 0), "c"),
    ((3, 150), "c"),
]
SIGMAS = ["float", "list", "tensor_0d", "tensor_1d"]


# ------------------------------------------------------------------------------ helpers
def make(items, dtype=torch.float32, scale=1.0):
    out = []
    for shape, layout in items:
        if layout == "t":
            t = (torch.randn(shape[::-1], device=DEVICE) * scale).to(dtype).t()
            assert not t.is_contiguous()
        elif layout == "s":
            base = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE) * scale
            t = base.to(dtype)[..., ::2]
            assert not t.is_contiguous()
        elif layout == "cl":
            t = (torch.randn(shape, device=DEVICE) * scale).to(dtype)
            t = t.contiguous(memory_format=torch.channels_last)
            assert not t.is_contiguous()
        else:
            t = (torch.randn(shape, device=DEVICE) * scale).to(dtype)
        out.append(t)
    return out


def clone(ts):
    return [t.clone() for t in ts]


def sigma_of(kind, n):
    vals = [0.01 * (i + 2) for i in range(n)]
    if kind == "float":
        return 0.03, [0.03] * n
    if kind == "list":
        return vals, vals
    if kind == "tensor_0d":
        return torch.tensor(0.04, device=DEVICE), [0.04] * n
    assert kind == "tensor_1d"
    return torch.tensor(vals, device=DEVICE), vals


def spec_scale(w):
    """The spec's ``s(w)`` in float64: per-output-unit norm over dims 1.. for ndim > 1 (shaped
    to broadcast), ``||w|| + 1e-16`` for 0-d and 1-d tensors."""
    w = w.double()
    if w.dim() > 1:
        s = (w * w).flatten(1).sum(dim=1).sqrt()
        return s.reshape(-1, *([1] * (w.dim() - 1)))
    return (w * w).sum().sqrt() + EPS_1D


def spec_result(w, z, sigmas):
    """``(b, d, p)`` of the spec in float64: ``b = w``, ``d = sigma z s(w)``, ``p = w + d``."""
    b = [wi.double() for wi in w]
    d = [s * zi.double() * spec_scale(wi) for wi, zi, s in zip(w, z, sigmas)]
    p = [bi + di for bi, di in zip(b, d)]
    return b, d, p


def counter_z(w, seed, offset, backend="triton"):
    """``z`` of the counter stream for ``w``: ``noise_perturb_`` on fp32 zeros with scale 1
    (``p = 0 + 1 * eps`` exactly), the draw R-SAM's per-tensor path takes. Element order: memory
    order for tensors whose rows are outermost (contiguous, channels-last: zeros of the same
    layout), logical order for other layouts (contiguous zeros)."""
    z = []
    for t in w:
        rows_outermost = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
        if rows_outermost:
            z.append(torch.zeros_like(t, dtype=torch.float32))
        else:
            z.append(torch.zeros(t.shape, dtype=torch.float32, device=DEVICE))
    sk.noise_perturb_(
        z,
        [torch.zeros_like(t) for t in z],
        torch.ones((), device=DEVICE),
        kind="normal",
        save_backup=False,
        seed=torch.tensor(seed, device=DEVICE),
        offset=torch.tensor(offset, device=DEVICE),
        backend=backend,
    )
    return z


def run(w, sigma, backend, **kw):
    """The op on copies of ``w`` with NaN-filled backups/deltas; ``(b, d, p)``."""
    p, b, d = clone(w), like(w), like(w)
    sk.filter_noise_perturb_(p, b, d, sigma, backend=backend, **kw)
    for name, lst in (("backups", b), ("deltas", d), ("params", p)):
        for i, t in enumerate(lst):
            assert not torch.isnan(t).any(), f"{name}[{i}] has unwritten (NaN) elements"
    return b, d, p


def assert_close_lists(actual, expected, dtype, what):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, (what, i)
        torch.testing.assert_close(
            a.double(), e.double(), **TOL[dtype], msg=lambda m, i=i: f"{what}[{i}]: {m}"
        )


def assert_exact(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, (what, i)
        assert torch.equal(a, e), f"{what}[{i}] is not bit for bit"


@pytest.fixture(params=[False, True], ids=["one_block", "small_blocks"])
def small_blocks(request, monkeypatch):
    """Interpreter: 64-element blocks and chunks, so tensors span several programs and rows
    start inside a chunk (on a GPU the blocks are fixed; the variant changes nothing there)."""
    if request.param:
        if not HAS_TRITON:
            pytest.skip("the Triton backend cannot run here")
        from sam_kernels.triton import _launch, filter_noise

        monkeypatch.setattr(_launch, "INTERP_MAX_BLOCK", 64)
        monkeypatch.setattr(filter_noise, "INTERP_MAX_BLOCK", 64)
        _launch.clear_cache()
    yield request.param


# ------------------------------------------------------------------------------ eager reference
@pytest.mark.parametrize("sigma_kind", SIGMAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_matches_the_formula(case, dtype, sigma_kind):
    w = make(CASES[case], dtype)
    z = [torch.randn(t.shape, device=DEVICE) for t in w]
    sigma, sigmas = sigma_of(sigma_kind, len(w))
    b, d, p = run(w, sigma, "eager", noise=z)
    eb, ed, ep = spec_result(w, z, sigmas)
    assert_exact(b, w, "backups")
    assert_close_lists(d, ed, dtype, "deltas")
    assert_close_lists(p, ep, dtype, "params")
    assert all(t.dtype == dtype for t in b + d + p)


def test_eager_draws_randn_per_tensor_in_order():
    """Without ``noise``: ``torch.randn(p.shape)`` per tensor, in list order, from the global
    generator (the reference code's stream; R-SAM's eager draw)."""
    w = make(CASES["mixed"])
    torch.manual_seed(123)
    b, d, p = run(w, 0.05, "eager")
    torch.manual_seed(123)
    z = [torch.randn(t.shape, device=DEVICE) for t in w]
    _, ed, ep = spec_result(w, z, [0.05] * len(w))
    assert_exact(b, w, "backups")
    assert_close_lists(d, ed, torch.float32, "deltas")
    assert_close_lists(p, ep, torch.float32, "params")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_with_a_seed_takes_the_counter_stream(case, dtype):
    """Given a seed, the eager reference's ``z`` is ``noise_perturb_``'s counter stream (its
    eager form, :mod:`sam_kernels.ops.philox`), in the kernels' element order."""
    w = make(CASES[case], dtype)
    sigma, sigmas = sigma_of("list", len(w))
    z = counter_z(w, 21, 1000, backend="eager")
    seed, off = torch.tensor(21, device=DEVICE), torch.tensor(1000, device=DEVICE)
    b, d, p = run(w, sigma, "eager", seed=seed, offset=off)
    _, ed, ep = run(w, sigma, "eager", noise=z)
    assert_exact(b, w, "backups")
    assert_exact(d, ed, "deltas vs the noise hook")
    assert_exact(p, ep, "params vs the noise hook")
    _, fd, fp = spec_result(w, z, sigmas)
    assert_close_lists(d, fd, dtype, "deltas vs formula")
    assert_close_lists(p, fp, dtype, "params vs formula")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_and_eager_agree_given_the_same_seed(dtype, backend):
    w = make(CASES["mixed"], dtype)
    sigma, _ = sigma_of("tensor_1d", len(w))
    kw = dict(seed=torch.tensor(8, device=DEVICE), offset=torch.tensor(40, device=DEVICE))
    tb, td, tp = run(w, sigma, backend, **kw)
    eb, ed, ep = run(w, sigma, "eager", **kw)
    assert_exact(tb, eb, "backups")
    assert_close_lists(td, ed, dtype, "deltas")
    assert_close_lists(tp, ep, dtype, "params")


def test_eager_float64():
    w = make(CASES["mixed"], torch.float64)
    z = [torch.randn(t.shape, device=DEVICE, dtype=torch.float64) for t in w]
    b, d, p = run(w, [0.1] * len(w), None, noise=z)
    _, ed, ep = spec_result(w, z, [0.1] * len(w))
    assert_exact(b, w, "backups")
    for a, e in zip(d + p, ed + ep):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ Triton
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_eager(case, dtype, small_blocks):
    fused_matches_eager("triton", CASES[case], dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ext_matches_eager(case, dtype):
    fused_matches_eager("ext", CASES[case], dtype)


# rows over several of the extension's chunks (32768 elements): rows longer than a chunk (summed
# in pieces), rows starting inside a chunk, a 1-d tensor over several chunks, a transposed view
# run on a contiguous stand-in
EXT_LARGE = [((3, 40000), "c"), ((1000, 70), "c"), ((70001,), "c"), ((3, 5), "c"),
             ((300, 230), "t"), ((40, 16, 3, 30), "cl")]  # fmt: skip


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_ext_matches_eager_over_several_chunks(dtype):
    # sigma scaled down so that d stays at the weights' scale on rows of ~200 norm: p = w + d
    # is then compared at the tolerance the small cases meet (d is off by an ulp of its own
    # where the fp32 and fp64 row norms round apart)
    fused_matches_eager("ext", EXT_LARGE, dtype, sigma_scale=0.01)


@needs_ext
def test_ext_is_independent_of_the_thread_count():
    w = make(EXT_LARGE + CASES["mixed"])
    sigma, _ = sigma_of("list", len(w))
    kw = dict(seed=torch.tensor(17, device=DEVICE), offset=torch.tensor(5, device=DEVICE))
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(run(w, sigma, "ext", **kw))
    finally:
        torch.set_num_threads(threads)
    for b, d, p in outs[1:]:
        assert_exact(b, outs[0][0], "backups")
        assert_exact(d, outs[0][1], "deltas")
        assert_exact(p, outs[0][2], "params")


def fused_matches_eager(backend, items, dtype, sigma_scale=1.0):
    """``backend`` with a seed against the eager reference fed the same counter stream."""
    w = make(items, dtype)
    sigma, sigmas = sigma_of("list", len(w))
    sigma = sigmas = [s * sigma_scale for s in sigmas]
    seed, offset = 1234, 77
    z = counter_z(w, seed, offset)
    tb, td, tp = run(
        w,
        sigma,
        backend,
        seed=torch.tensor(seed, device=DEVICE),
        offset=torch.tensor(offset, device=DEVICE),
    )
    eb, ed, ep = run(w, sigma, "eager", noise=z)
    assert_exact(tb, w, f"{backend} backups")
    assert_exact(eb, w, "eager backups")
    assert_close_lists(td, ed, dtype, "deltas")
    assert_close_lists(tp, ep, dtype, "params")
    # and the spec's formula with that z
    _, fd, fp = spec_result(w, z, sigmas)
    assert_close_lists(td, fd, dtype, "deltas vs formula")
    assert_close_lists(tp, fp, dtype, "params vs formula")
    # the noise is there (random weights: every scale s(w) is positive)
    for i, t in enumerate(td):
        assert t.numel() == 0 or bool((t != 0).any()), f"deltas[{i}] is zero"


@pytest.mark.parametrize("dtype", DTYPES)
def test_z_is_the_counter_stream_bit_for_bit(dtype):
    """Rows of norm 1 and ``sigma = 1``: the deltas are ``z``, bit for bit the normal counter
    stream of ``noise_perturb_`` (its eager form) in the kernels' element order, on every
    backend (the Triton kernel and the eager reference share the noise contract: the same
    normal function, no FMA contraction), and ``p = w + z``."""
    items = CASES["mixed"]
    w = unit_rows(items, dtype, DEVICE)
    seed, offset = 31, 2**32 - 100  # the counter's low word wraps inside the list
    z = counter_z(w, seed, offset, backend="eager")
    kw = dict(seed=torch.tensor(seed, device=DEVICE), offset=torch.tensor(offset, device=DEVICE))
    outs = {}
    for backend in ["eager", *FUSED]:
        b, d, p = run(w, 1.0, backend, **kw)
        assert_exact(b, w, f"{backend} backups")
        assert_exact(d, [zi.to(dtype) for zi in z], f"{backend} deltas vs the counter stream")
        outs[backend] = p
    want = [(wi.float() + zi.to(dtype).float()).to(dtype) for wi, zi in zip(w, z)]
    for backend, p in outs.items():
        assert_exact(p, want, f"{backend} params")
    assert any(bool((zi != 0).any()) for zi in z)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("sigma_kind", SIGMAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_sigma_forms(dtype, sigma_kind, backend):
    w = make(CASES["mixed"], dtype)
    sigma, sigmas = sigma_of(sigma_kind, len(w))
    z = counter_z(w, 5, 0)
    tb, td, tp = run(w, sigma, backend, seed=torch.tensor(5, device=DEVICE))
    eb, ed, ep = run(w, sigma, "eager", noise=z)
    assert_exact(tb, w, "backups")
    assert_close_lists(td, ed, dtype, "deltas")
    assert_close_lists(tp, ep, dtype, "params")
    # the same values however sigma is given: a list of them, one tensor of them
    seed = torch.tensor(5, device=DEVICE)
    _, d2, p2 = run(w, list(sigmas), backend, seed=seed)
    _, d3, p3 = run(w, torch.tensor(sigmas, device=DEVICE), backend, seed=seed)
    assert_exact(d2, td, "deltas (list)")
    assert_exact(p3, tp, "params (tensor)")
    assert_exact(d3, td, "deltas (tensor)")


@needs_triton
@pytest.mark.parametrize("small", [False, True], ids=["one_block", "small_blocks"])
def test_triton_mixed_dtypes_in_one_list(small, monkeypatch):
    if small:
        from sam_kernels.triton import _launch, filter_noise

        monkeypatch.setattr(_launch, "INTERP_MAX_BLOCK", 64)
        monkeypatch.setattr(filter_noise, "INTERP_MAX_BLOCK", 64)
    mixed_dtypes_in_one_list("triton")


@needs_ext
def test_ext_mixed_dtypes_in_one_list():
    mixed_dtypes_in_one_list("ext")


def mixed_dtypes_in_one_list(backend):
    items = CASES["mixed"]
    w = [t for dt in DTYPES for t in make(items, dt)]
    sigma, _ = sigma_of("tensor_1d", len(w))
    z = counter_z(w, 9, 3)
    tb, td, tp = run(w, sigma, backend, seed=torch.tensor(9, device=DEVICE), offset=3)
    eb, ed, ep = run(w, sigma, "eager", noise=z)
    assert_exact(tb, w, "backups")
    for i, t in enumerate(w):
        torch.testing.assert_close(td[i], ed[i], **TOL[t.dtype], msg=f"deltas[{i}]")
        torch.testing.assert_close(tp[i], ep[i], **TOL[t.dtype], msg=f"params[{i}]")


@pytest.mark.parametrize("backend", FUSED)
def test_fused_stream_is_seeded_and_follows_the_offset(backend):
    w = make(CASES["mixed"])
    seed = torch.tensor(3, device=DEVICE)
    _, d1, _ = run(w, 0.1, backend, seed=seed, offset=torch.tensor(0, device=DEVICE))
    _, d2, _ = run(w, 0.1, backend, seed=seed)  # offset=None is 0
    assert_exact(d2, d1, "offset None vs 0")
    _, d3, _ = run(w, 0.1, backend, seed=seed, offset=torch.tensor(1, device=DEVICE))
    assert not torch.equal(d3[0], d1[0])
    _, d4, _ = run(w, 0.1, backend, seed=torch.tensor(4, device=DEVICE))
    assert not torch.equal(d4[0], d1[0])
    # seed=None: a seed from torch's CPU generator (replayed by seeding it)
    torch.manual_seed(0)
    _, d5, _ = run(w, 0.1, backend)
    torch.manual_seed(0)
    _, d6, _ = run(w, 0.1, backend)
    assert_exact(d6, d5, "seed None after the same manual_seed")
    # ... one draw from it: the same seed as Triton's and noise_perturb_'s
    torch.manual_seed(0)
    seed0 = torch.randint(0, 2**62, (), dtype=torch.int64)
    _, d7, _ = run(w, 0.1, backend, seed=seed0.to(DEVICE))
    assert_exact(d7, d5, "seed None vs the seed drawn from the same generator state")


@needs_triton
def test_triton_fallback_keeps_the_counter_stream(monkeypatch):
    """Inputs the kernels refuse (here: rows longer than a lowered limit) are declined and run
    on the eager reference (the chooser's fallback) with ``z`` from the same counter stream:
    the values do not change."""
    from sam_kernels import _backend
    from sam_kernels.triton import filter_noise

    w = make(CASES["mixed"])
    seed, off = torch.tensor(11, device=DEVICE), torch.tensor(5, device=DEVICE)
    _, d1, p1 = run(w, 0.07, "triton", seed=seed, offset=off)
    calls = []
    impls = _backend._REGISTRY["filter_noise_perturb"]
    eager = impls["eager"]
    monkeypatch.setattr(filter_noise, "MAX_ROWLEN", 8)
    monkeypatch.setitem(impls, "eager", lambda *a: calls.append(1) or eager(*a))
    monkeypatch.setattr(_backend, "_RESOLVED", {})  # the choices made before the patch
    _, d2, p2 = run(w, 0.07, "triton", seed=seed, offset=off)
    assert calls, "the fallback did not run"
    assert_close_lists(d2, d1, torch.float32, "deltas")
    assert_close_lists(p2, p1, torch.float32, "params")


@pytest.mark.parametrize("backend", ["eager", *FUSED])
def test_zero_weights_the_1d_guard(backend):
    """All-zero weights: ``s = 0 + 1e-16`` for 0-d and 1-d tensors (a tiny, non-zero noise),
    ``s = 0`` for the rows of a matrix (no noise)."""
    w = [torch.zeros(9, device=DEVICE), torch.zeros((), device=DEVICE)]
    w += [torch.zeros(3, 4, device=DEVICE)]
    fused = backend != "eager"
    z = counter_z(w, 2, 0) if fused else [torch.randn(t.shape, device=DEVICE) for t in w]
    kw = dict(seed=torch.tensor(2, device=DEVICE)) if fused else dict(noise=z)
    b, d, p = run(w, 0.5, backend, **kw)
    for i in range(2):
        torch.testing.assert_close(d[i], 0.5 * 1e-16 * z[i], rtol=1e-6, atol=0)
        assert_exact([p[i]], [d[i]], "p = 0 + d")
    assert bool((d[2] == 0).all()) and bool((p[2] == 0).all())


@pytest.mark.parametrize("backend", FUSED)
def test_fused_empty_list_and_all_empty_tensors(backend):
    sk.filter_noise_perturb_([], [], [], 0.1, backend=backend)
    w = make(CASES["empty"])
    b, d, p = run(w, 0.1, backend, seed=torch.tensor(1, device=DEVICE))
    assert [t.shape for t in p] == [t.shape for t in w]


# ------------------------------------------------------------------------------ bad inputs
BAD_BACKENDS = ["eager", *FUSED]


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_bad_inputs_are_refused_naming_the_argument(backend):
    w = make([((4, 3), "c"), ((5,), "c")])
    p, b, d = clone(w), like(w), like(w)
    seed = torch.tensor(1, device=DEVICE)

    def refused(match, *args, **kw):
        with pytest.raises(ValueError, match=match):
            sk.filter_noise_perturb_(*args, backend=backend, seed=seed, **kw)
        assert_exact(p, w, "params after a refused call")

    refused(r"sigma has 3 values, expected one per tensor \(2\)", p, b, d, [0.1, 0.2, 0.3])
    refused(r"sigma has 1 values", p, b, d, [0.1])
    refused(r"sigma .*shape \(3,\)", p, b, d, torch.tensor([0.1, 0.2, 0.3], device=DEVICE))
    refused(r"sigma .*shape \(2, 1\)", p, b, d, torch.ones(2, 1, device=DEVICE))
    refused(r"sigma must be a floating-point tensor", p, b, d, torch.tensor(1, device=DEVICE))
    refused(r"sigma must be a float", p, b, d, object())
    bad_b = [b[0], torch.empty(6, device=DEVICE)]
    refused(r"backups\[1\] has shape \(6,\), params\[1\] \(5,\)", p, bad_b, d, 0.1)
    bad_d = [torch.empty(3, 4, device=DEVICE), d[1]]
    refused(r"deltas\[0\] has shape \(3, 4\), params\[0\] \(4, 3\)", p, b, bad_d, 0.1)
    refused(r"backups has 1 tensors", p, b[:1], d, 0.1)
    refused(r"noise\[0\]", p, b, d, 0.1, noise=[torch.zeros(4, device=DEVICE), w[1]])
    refused(r"params\[0\] and deltas\[0\] alias", p, b, [p[0], d[1]], 0.1)


# ------------------------------------------------------------------------------ R-SAM's draw
def _net(layout):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3),
        torch.nn.BatchNorm2d(5),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(5 * 4 * 4, 3),
    ).to(DEVICE)
    if layout == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    return net


def _per_tensor(opt):
    """R-SAM's draw through ``noise_perturb_`` and per-tensor scaling (the draw before the
    fused op; still the path of a backend without it)."""

    def draw(groups, noisy, backups):
        sigmas = [float(g["sigma"]) for g, ps in groups for _ in ps]
        return opt._draw_per_tensor(noisy, backups, opt._scratch(noisy), sigmas)

    return draw


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=g).to(DEVICE)
    y = torch.randint(0, 3, (8,), generator=g).to(DEVICE)
    return x, y


def _closure(net, x, y):
    def closure():
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_rsam_fused_draw_equals_the_per_tensor_draw(layout, backend):
    net = _net(layout)
    twin = copy.deepcopy(net)
    kw = dict(rho=0.05, sigma=0.05, seed=7, backend=backend, lr=0.1, momentum=0.9)
    opt = RSAM(net.parameters(), torch.optim.SGD, **kw)
    ref = RSAM(twin.parameters(), torch.optim.SGD, **kw)
    ref._draw = _per_tensor(ref)

    # one draw each way, on the same weights and the same (seed, offset)
    drawn = []
    with torch.no_grad():
        for o in (opt, ref):
            groups = o._noisy()
            noisy = [p for _, ps in groups for p in ps]
            w = [p.detach().clone() for p in noisy]
            delta = o._draw(groups, noisy, o._backups(noisy))
            o._live.clear()
            drawn.append((delta, [p.detach().clone() for p in noisy]))
            assert_exact(o._backups(noisy), w, "backups")
            o._restore(noisy)
            assert_exact([p.detach() for p in noisy], w, "restored weights")
    (d1, p1), (d2, p2) = drawn
    assert all(bool(d.abs().max() > 0) for d in d1)
    assert_close_lists(d1, d2, torch.float32, "delta")
    assert_close_lists(p1, p2, torch.float32, "w + delta")

    # whole steps: the same weights, offsets and BN statistics
    calls = []
    fused = sk.filter_noise_perturb_
    x, y = _data()
    for _ in range(3):
        for o, m in ((opt, net), (ref, twin)):
            o.zero_grad()
            sk.filter_noise_perturb_ = lambda *a, **k: calls.append(1) or fused(*a, **k)
            try:
                o.step(_closure(m, x, y))
            finally:
                sk.filter_noise_perturb_ = fused
    assert len(calls) == 3, "the fused draw did not run once per step of the fused optimizer"
    assert torch.equal(opt._noise_offset, ref._noise_offset)
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), name


class _OpCount(TorchDispatchMode):
    """Counts the ATen ops dispatched outside Triton launches (those of the interpreter's own
    work are not the draw's), leaving out allocations (step-local scratch, one per tensor on
    any path; no kernel) and views."""

    FREE = ("empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "view", "alias")

    def __init__(self, launching):
        super().__init__()
        self.launching = launching
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.launching[0] and name not in self.FREE and not func.is_view:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """A Triton kernel whose launches are counted (``kernel[grid](...)``)."""

    def __init__(self, kernel, log, launching, name):
        self.kernel, self.log, self.launching, self.name = kernel, log, launching, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(self.name)
            self.launching[0] = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.launching[0] = False

        return run


def _count_draw(net, path, monkeypatch):
    """(Triton launches, other ATen ops) of one R-SAM draw on ``net`` (``path``: "fused" or
    "per_tensor"), tables rebuilt (cold cache) so that every draw does the same work."""
    from sam_kernels.triton import _launch, filter_noise, perturb

    log, launching = [], [False]
    for mod, name in (
        (filter_noise, "_row_coef_kernel"),
        (filter_noise, "_filter_noise_kernel"),
        (perturb, "_noise_kernel"),
    ):
        kernel = getattr(mod, name)
        kernel = getattr(kernel, "kernel", kernel)
        monkeypatch.setattr(mod, name, _CountedKernel(kernel, log, launching, name))
    opt = RSAM(net.parameters(), torch.optim.SGD, lr=0.1, sigma=0.01, seed=1, backend="triton")
    draw = opt._draw if path == "fused" else _per_tensor(opt)
    groups = opt._noisy()
    noisy = [p for _, ps in groups for p in ps]
    with torch.no_grad():
        backups = opt._backups(noisy)
        _launch.clear_cache()
        with _OpCount(launching) as mode:
            draw(groups, noisy, backups)
        opt._restore(noisy)
    return collections.Counter(log), mode.ops


def _mlp(k, dtype=torch.float32):
    return torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(k)]).to(DEVICE, dtype)


@needs_triton
def test_rsam_draw_issues_a_fixed_number_of_launches(monkeypatch):
    small, large = _mlp(2), _mlp(12)  # 4 and 24 parameter tensors
    l_small, ops_small = _count_draw(small, "fused", monkeypatch)
    l_large, ops_large = _count_draw(large, "fused", monkeypatch)
    # one dtype group: a row-norm launch and the elementwise one, whatever the tensor count
    assert l_small == l_large == {"_row_coef_kernel": 1, "_filter_noise_kernel": 1}
    assert ops_small == ops_large, (ops_small, ops_large)
    assert not {"linalg_vector_norm", "mul", "mul_", "add"} & set(ops_large)
    # the per-tensor draw (the count would catch it): one norm and scaling per tensor
    _, per_small = _count_draw(small, "per_tensor", monkeypatch)
    _, per_large = _count_draw(large, "per_tensor", monkeypatch)
    assert per_large["linalg_vector_norm"] == 24 and per_small["linalg_vector_norm"] == 4
    assert sum(per_large.values()) > sum(per_small.values())
    # a second dtype: two more launches
    mixed = torch.nn.Sequential(_mlp(2), _mlp(3, torch.bfloat16))
    l_mixed, _ = _count_draw(mixed, "fused", monkeypatch)
    assert l_mixed == {"_row_coef_kernel": 2, "_filter_noise_kernel": 2}
