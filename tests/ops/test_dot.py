"""``sam_kernels.dot``: the fused global inner product ``sum_i <a_i, b_i>`` (issue 17, for GSAM).

Every backend against an fp64 reference ``sum((a_i.double() * b_i.double()).sum())``, with the
error measured relative to ``sum |a_i b_i|`` (the scale of a sum's rounding, whatever its
cancellation). Both backends form the products in fp64 (exact for fp32/bf16/fp16 inputs) and
sum in fp64, so the bound is :data:`RTOL` = 1e-12 (the observed errors are ~1e-16) for every
input dtype; products of elements up to the fp32 maximum (overflowing fp32) stay finite and
accurate. Triton runs in its interpreter on the CPU here: sizes stay at 64K elements per call or
below, except the eager-only test of tensors split into pieces and the extension's tests of
tensors over several of its chunks. The extension (``"ext"``, its former name ``"cuda"``) runs
``dot`` on CPU tensors (on CUDA tensors it declines: Triton's kernels run).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _helpers import HostReads

import sam_kernels as sk

DEVICE = (
    torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.is_available()
    else torch.device("cpu")
)
BACKENDS = [b for b in ("eager", "triton", "cuda") if sk.available(b, DEVICE)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: relative to sum |a_i b_i|: fp64 products and sums on every backend and input dtype
RTOL = 1e-12


def ref_dot(a, b) -> tuple[float, float]:
    """(fp64 inner product, fp64 sum of |a_i b_i|)."""
    dot = torch.zeros((), dtype=torch.float64)
    mag = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        p = x.detach().cpu().double() * y.detach().cpu().double()
        dot += p.sum()
        mag += p.abs().sum()
    return float(dot), float(mag)


def rel_err(got: torch.Tensor, a, b) -> float:
    want, mag = ref_dot(a, b)
    value = float(got)
    assert value == value and abs(value) != float("inf"), f"not finite: {value}"
    if mag == 0.0:
        assert value == 0.0
        return 0.0
    return abs(value - want) / mag


def rand(shape, dtype, gen, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in another layout: transposed or a strided slice."""
    if kind == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == "strided":
        base = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        base[..., ::2] = t
        return base[..., ::2]
    return t


CASES = {
    "empty_list": [],
    "empty_tensor": [(0,)],
    "one": [(1,)],
    "odd_1031": [(1031,)],
    "odd_4097": [(4097,)],
    "several": [(3, 5), (1031,), (0,), (17, 241), (1,), (64, 64), (7, 0, 3)],
    "many_small": [(i % 13 + 1,) for i in range(200)],
}


def check(backend, a, b, what=""):
    got = sk.dot(a, b, backend=backend)
    assert got.dtype == torch.float64 and got.dim() == 0, what
    if a:
        assert got.device == a[0].device, what
    err = rel_err(got, a, b)
    assert err < RTOL, f"{what}: relative error {err:.3g}"
    return err


# ------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_fp64_reference(backend, dtype, case):
    gen = torch.Generator().manual_seed(3)
    a = [rand(s, dtype, gen) for s in CASES[case]]
    b = [rand(s, dtype, gen) for s in CASES[case]]
    check(backend, a, b, f"{backend} {dtype} {case}")
    if not a:  # no device: a CPU zero, whatever the backend
        got = sk.dot(a, b, backend=backend)
        assert float(got) == 0.0 and got.device.type == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kinds",
    [("transposed", "contig"), ("strided", "strided"), ("contig", "strided"),
     ("transposed", "transposed")],
)  # fmt: skip
def test_non_contiguous(backend, dtype, kinds):
    gen = torch.Generator().manual_seed(4)
    shapes = [(33, 31), (1, 7), (65, 63), (2, 1)]
    a = [layout(rand(s, dtype, gen), kinds[0]) for s in shapes]
    b = [layout(rand(s, dtype, gen), kinds[1]) for s in shapes]
    if "strided" in kinds:
        assert not all(t.is_contiguous() for t in a + b)
    before = [t.clone() for t in a + b]
    check(backend, a, b, f"{backend} {dtype} {kinds}")
    assert all(torch.equal(x, y) for x, y in zip(a + b, before))  # inputs untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    gen = torch.Generator().manual_seed(5)
    shapes = [(1031,), (17, 33), (5,)]
    a = [rand(s, dt, gen) for s, dt in zip(shapes, DTYPES)]
    b = [rand(s, dt, gen) for s, dt in zip(shapes, [torch.bfloat16, torch.float32, torch.float16])]
    check(backend, a, b, f"{backend} mixed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_runs_on_eager(backend):
    gen = torch.Generator().manual_seed(6)
    a = [rand((1031,), torch.float64, gen), rand((4, 5), torch.float64, gen)]
    b = [rand((1031,), torch.float64, gen), rand((4, 5), torch.float64, gen)]
    assert sk.runs_on("dot", a + b, backend) == "eager"
    check(backend, a, b, f"{backend} fp64")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("big", [1e19, 1e25, 3e38])
def test_products_beyond_fp32_range(backend, dtype, big):
    # |a_i b_i| from ~1e38 to ~1e77: every product overflows fp32, none overflows fp64
    gen = torch.Generator().manual_seed(7)
    shapes = [(1,), (1031,), (4097,), (3, 5)]
    a, b = [], []
    for s in shapes:
        mag = (0.5 + 0.5 * torch.rand(s, generator=gen, dtype=torch.float64)) * big
        sign = torch.randint(0, 2, s, generator=gen).double() * 2 - 1
        a.append((mag * sign).clamp(-3.4e38, 3.4e38).to(dtype).to(DEVICE))
        b.append((mag.flip(-1) * sign.roll(1, -1)).clamp(-3.4e38, 3.4e38).to(dtype).to(DEVICE))
    assert all(torch.isfinite(t).all() for t in a + b)
    check(backend, a, b, f"{backend} {dtype} {big:g}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_values(backend):
    # products below fp32's smallest subnormal (~1.4e-45): exact in fp64, lost in fp32
    a = [torch.full((1031,), 1e-30, device=DEVICE)]
    b = [torch.full((1031,), -2e-30, device=DEVICE)]
    check(backend, a, b, f"{backend} tiny")
    assert float(sk.dot(a, b, backend=backend)) < 0.0


def test_eager_splits_large_tensors(monkeypatch):
    # tensors above PIECE elements are split into views and batched (BATCH): same result
    dot_mod = importlib.import_module("sam_kernels.ops.dot")  # (sk.ops.dot is the function)
    monkeypatch.setattr(dot_mod, "PIECE", 1000)
    monkeypatch.setattr(dot_mod, "BATCH", 2500)
    gen = torch.Generator().manual_seed(8)
    shapes = [(4097,), (10,), (33, 97), (1000,), (1001,), (0,)]
    a = [rand(s, torch.float32, gen) for s in shapes]
    b = [layout(rand(s, torch.float32, gen), "strided") for s in shapes]
    check("eager", a, b, "eager pieces")


# ------------------------------------------------------------------------ non-finite
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("partner", [1.0, 0.0, "inf"])
def test_non_finite_inputs_give_non_finite(backend, bad, partner):
    gen = torch.Generator().manual_seed(9)
    a = [rand((1031,), torch.float32, gen), rand((17, 5), torch.float32, gen)]
    b = [rand((1031,), torch.float32, gen), rand((17, 5), torch.float32, gen)]
    a[1][3, 2] = bad
    b[1][3, 2] = float("inf") if partner == "inf" else partner
    got = sk.dot(a, b, backend=backend)
    assert got.dtype == torch.float64
    assert not torch.isfinite(got), (backend, bad, partner, float(got))


# ------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_backends_agree(backend):
    gen = torch.Generator().manual_seed(10)
    shapes = [(4097,), (17, 241), (1031,), (3,)]
    a = [rand(s, torch.float32, gen) for s in shapes]
    b = [rand(s, torch.float32, gen) for s in shapes]
    first = sk.dot(a, b, backend=backend)
    for _ in range(3):
        assert torch.equal(sk.dot(a, b, backend=backend), first)
    # symmetric in its arguments up to the fp64 summation
    assert abs(float(sk.dot(b, a, backend=backend)) - float(first)) <= 1e-12 * ref_dot(a, b)[1]
    other = sk.dot(a, b, backend="eager")
    assert abs(float(other) - float(first)) <= 2 * RTOL * ref_dot(a, b)[1]


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_names_the_argument(backend):
    x = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match=r"b has 1 tensors, expected 2 \(as a\)"):
        sk.dot([x, x], [x], backend=backend)
    with pytest.raises(ValueError, match=r"b\[1\] has shape \(3, 1\) but a\[1\] has shape \(3,\)"):
        sk.dot([x, x], [x, x.view(3, 1)], backend=backend)
    with pytest.raises(ValueError, match=r"b\[0\] has shape \(4,\)"):
        sk.dot([x], [torch.ones(4, device=DEVICE)], backend=backend)
    meta = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match=r"b\[1\] is on meta but a\[0\]"):
        sk.dot([x, x], [x, meta], backend=backend)
    with pytest.raises(ValueError, match=r"a\[1\] is on meta"):
        sk.dot([x, meta], [x, x], backend=backend)


def test_exported():
    assert "dot" in sk.__all__ and sk.dot is sk.ops.dot
    assert sk.has_implementation("dot", "eager")
    if sk.available("triton", DEVICE):
        assert sk.has_implementation("dot", "triton")
    if sk.available("ext", DEVICE):
        # the compiled extension's dot is a CPU kernel: on CUDA tensors it declines, and the
        # chooser runs Triton's (when it can run), else the eager reference
        x = [torch.ones(3, device=DEVICE)]
        assert sk.has_implementation("dot", "ext")
        assert sk.runs_on("dot", x, "ext") == "ext"
        if DEVICE.type == "cpu":
            assert sk.runs_on("dot", x) == "ext"  # the CPU default
        else:
            got = sk.dot(x, x, backend="ext")
            assert float(got) == 3.0 and got.device == DEVICE


# ------------------------------------------------------------------------ the extension on CPU
HAS_EXT_CPU = sk.available("ext", "cpu")
needs_ext = pytest.mark.skipif(not HAS_EXT_CPU, reason="the extension is not built")
#: over several of the extension's chunks (32768 elements; up to 4 summed side by side), dtypes
#: mixed across the list and within pairs
EXT_LARGE = [((70001,), torch.float32, torch.float32), ((3, 40000), torch.bfloat16, None),
             ((5,), torch.float16, None), ((300, 230), torch.float32, torch.bfloat16),
             ((0,), torch.float32, None), ((131072,), torch.float16, torch.float16)]  # fmt: skip


def ext_large(gen, transposed=False):
    a, b = [], []
    for shape, da, db in EXT_LARGE:
        a.append(rand(shape, da, gen).cpu())
        y = rand(shape, db or da, gen).cpu()
        b.append(layout(y, "transposed") if transposed else y)
    return a, b


@needs_ext
@pytest.mark.parametrize("transposed", [False, True])
def test_ext_over_several_chunks(transposed):
    gen = torch.Generator().manual_seed(12)
    a, b = ext_large(gen, transposed)
    assert sk.runs_on("dot", a + b) == "ext"
    got = sk.dot(a, b, backend="ext")
    assert got.dtype == torch.float64 and got.dim() == 0 and got.device.type == "cpu"
    assert rel_err(got, a, b) < RTOL
    eager = sk.dot(a, b, backend="eager")
    assert abs(float(got) - float(eager)) <= 2 * RTOL * ref_dot(a, b)[1]


@needs_ext
def test_ext_is_independent_of_the_thread_count():
    gen = torch.Generator().manual_seed(13)
    a, b = ext_large(gen)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(sk.dot(a, b, backend="ext"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, got[0]) for g in got[1:])


@needs_ext
def test_ext_is_one_op():
    """One dispatched op per call (the extension's), whatever the number of tensors."""
    from _helpers import DispatchedOps

    for n in (10, 300):
        x = [torch.randn(7) for _ in range(n)]
        with DispatchedOps() as spy:
            sk.dot(x, x, backend="ext")
        assert spy.ops == ["sam_kernels_C.dot.default"], spy.ops


# ------------------------------------------------------------------------ host reads
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_reads(backend):
    gen = torch.Generator().manual_seed(11)
    shapes = [(4097,), (17, 241), (0,), (5,)]
    a = [rand(s, torch.float32, gen) for s in shapes]
    b = [rand(s, torch.float32, gen) for s in shapes]
    sk.dot(a, b, backend=backend)  # tables built
    with HostReads() as spy:
        got = sk.dot(a, b, backend=backend)
    assert len(spy.ops) >= 1
    assert spy.reads == 0, f"{spy.reads} host reads"
    assert got.device == DEVICE
