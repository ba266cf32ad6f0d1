"""One counter-based noise contract (issue 14, item 1): ``noise_perturb_`` with a ``seed``.

The same ``(seed, offset)`` gives the same noise, bit for bit, on the eager backend
(:mod:`sam_kernels.ops.philox`, torch ops), the Triton kernels (:mod:`sam_kernels.triton.noise`)
and the compiled extension (csrc/ops_math.h, CPU and CUDA), for both kinds:

- the Philox words against Random123's published Philox4x32-10 vectors, the extension's Philox
  hook and Triton's ``randint4x``/``rand``;
- the contract's float32 ``log_f32`` / ``cos2pi_f32`` (and the uniform conversion and the normal
  transform) of the three implementations on one sample, bit for bit, and against float64
  (ulp bounds; every float32 input was checked once, see philox.py); the distribution of the
  normal and uniform values;
- the whole op on every backend that runs on a device: sizes, seeds and offsets (the counter's
  low word wrapping, negative seeds and offsets), dtypes, per-tensor scales, the backup written
  or read, layouts (memory order of dense tensors used in place, logical order of others);
- the default (no seed) stays the reference code's global-generator stream.

Exactness: every step of the contract is an integer operation or an exactly rounded float32
operation, none contracted into an FMA (Triton launches the noise kernels with
``enable_fp_fusion=False``, the CUDA code uses the ``_rn`` intrinsics, the C++ build
``-ffp-contract=off``), so the comparisons are ``torch.equal`` everywhere, on a GPU as on the
CPU (where Triton runs in its interpreter).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _helpers import INT_VIEW, HostReads, bits

import sam_kernels as sk
from sam_kernels.ops import philox as P

M32 = P.M32
TDEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
HAS_TRITON = sk.available("triton", TDEV)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton backend cannot run here")
if HAS_TRITON:
    import triton
    import triton.language as tl

    from sam_kernels.triton import noise as N

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        from sam_kernels import cuda_ext as EXT
    except ImportError:
        EXT = None
needs_ext = pytest.mark.skipif(EXT is None, reason="compiled extension not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZE_LISTS = [[], [0], [1], [17], [3, 0, 5, 1, 33], [4097], [7] * 12]
#: (seed, offset): plain; negative seed (two's complement key) with the low counter word
#: wrapping into the high one inside the call; a seed above 2**32 with a negative offset
SEEDS = [(1234, 0), (-5, 2**32 - 7), (2**45 + 11, -20)]
#: accuracy against float64: every float32 input measured once (philox.py: 0.83 and 1.65 ulps),
#: the normal eps over 16M draws (3.2 ulps)
LOG_ULPS, COS_ULPS, NORMAL_ULPS = 1.0, 2.0, 4.0


def fused_backends(device) -> list[str]:
    """The fused backends that run on ``device`` here (each compared with eager)."""
    return [b for b in ("triton", "ext") if sk.available(b, device)]


def devices_with_a_fused_backend() -> list[str]:
    return [d for d in DEVICES if fused_backends(d)]


RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def ordered(x: torch.Tensor) -> torch.Tensor:
    """The float bits as integers in the order of the values (+0 and -0 both 0)."""
    i = x.contiguous().view(INT_VIEW[x.dtype]).long()
    sign = 1 << (8 * x.element_size() - 1)
    return torch.where(i < 0, -(i + sign), i)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-dtype tensors."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return 0
    return int((ordered(a) - ordered(b)).abs().max())


def t64(x: int, device=TDEV) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int64, device=device)


def eps_of(backend, sizes, kind, seed, offset, a=1.0, dtype=torch.float32, device=TDEV):
    """The generated eps: params start at 0, scale 1, backups read (p = 0 + 1 * eps)."""
    ps = [torch.zeros(n, dtype=dtype, device=device) for n in sizes]
    bs = [torch.zeros(n, dtype=dtype, device=device) for n in sizes]
    sk.noise_perturb_(
        ps, bs, torch.ones((), device=device), kind=kind, half_cube_len=a, save_backup=False,
        seed=t64(seed, device), offset=t64(offset, device), backend=backend,
    )  # fmt: skip
    return ps


def words(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The eager Philox words of int64 counters ``k`` (counter ``(lo(k), hi(k), 0, 0)``)."""
    s = t64(seed, counters.device)
    zero = torch.zeros_like(counters)
    return P.philox4x32_10(
        (counters & M32, (counters >> 32) & M32, zero, zero), (s & M32, (s >> 32) & M32)
    )


def assert_bits(got, want, what):
    """Same dtypes, shapes and bits (not only equal values: -0.0 is not 0.0)."""
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}[{i}]"
        if not torch.equal(bits(g), bits(w)):
            raise AssertionError(f"{what}[{i}]: {ulps(g, w)} ulps apart (bit for bit expected)")


# ------------------------------------------------------------------------------ Philox words
def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (kat_vectors), as int64 tensors."""
    for ctr, key, want in RANDOM123_KAT:
        got = P.philox4x32_10(tuple(map(torch.tensor, ctr)), tuple(map(torch.tensor, key)))
        assert [int(w) for w in got] == list(want)


@needs_ext
def test_philox_matches_the_extension_hook():
    """Random counters and keys (and the extreme words): the same uint32 words as csrc's
    ``philox4x32_10``, the Philox of the extension's CPU and CUDA kernels."""
    g = torch.Generator().manual_seed(14)
    ctrs = torch.randint(0, 2**32, (200, 4), generator=g, dtype=torch.int64)
    keys = torch.randint(0, 2**32, (200, 2), generator=g, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2**31 - 1, 2**31, M32])
    ctrs[:5] = edges[:, None]
    keys[:5] = edges.flip(0)[:, None]
    got = torch.stack(P.philox4x32_10(ctrs.unbind(1), keys.unbind(1)), 1)
    for c, k, w in zip(ctrs.tolist(), keys.tolist(), got.tolist()):
        assert EXT.philox4x32_10(c, k) == w, (c, k)


@needs_triton
def test_philox_and_uniform_match_triton_words():
    """Triton's own ``randint4x`` words and ``rand`` floats at counters ``offset + j`` (int64,
    crossing 2**32 and negative), against the eager words and conversion."""

    @triton.jit
    def kernel(out_w, out_u, seed_ptr, offset_ptr, n, BLOCK: tl.constexpr):
        # seed and offset loaded as int64, as the noise kernel does (a small int argument
        # would be an int32, and an int32 counter has no high word)
        seed = tl.load(seed_ptr)
        j = tl.arange(0, BLOCK)
        m = j < n
        c = tl.load(offset_ptr) + j
        w0, w1, w2, w3 = tl.randint4x(seed, c)
        tl.store(out_w + 4 * j, w0.to(tl.int64), mask=m)
        tl.store(out_w + 4 * j + 1, w1.to(tl.int64), mask=m)
        tl.store(out_w + 4 * j + 2, w2.to(tl.int64), mask=m)
        tl.store(out_w + 4 * j + 3, w3.to(tl.int64), mask=m)
        tl.store(out_u + j, tl.rand(seed, c), mask=m)

    n = 1000
    for seed, offset in [(0, 0), (-1, 2**32 - 500), (2**40 + 3, -300), (2**62, 2**35)]:
        out_w = torch.empty(n, 4, dtype=torch.int64, device=TDEV)
        out_u = torch.empty(n, dtype=torch.float32, device=TDEV)
        kernel[(1,)](out_w, out_u, t64(seed), t64(offset), n, BLOCK=1024)
        # the kernel's words as unsigned 32-bit values (its int64 store zero-extends)
        k = offset + torch.arange(n, dtype=torch.int64, device=TDEV)
        want = torch.stack(words(seed, k), 1)
        assert torch.equal(out_w & M32, want), (seed, offset)
        u = P.uint_to_uniform_float(want[:, 0])
        assert torch.equal(out_u, u), (seed, offset)


def test_uniform_conversion_range():
    """``f`` maps every word into [0, 1): the extreme words give 0 and the largest value < 1."""
    x = torch.tensor([0, M32, 2**31 - 1, 2**31, 1, M32 - 1])
    f = P.uint_to_uniform_float(x)
    assert f[0] == 0 and f[1] == 0  # 0 and 2**32 - 1 fold to the same integer, 0
    assert f[2] == f[3] and f[2] < 1.0 and f[2] > 1.0 - 2**-23
    assert f[4] == f[5] and f[4] > 0
    assert f.dtype == torch.float32
    if EXT is not None:  # the extension's conversion of the same words (and of random ones)
        r = torch.randint(0, 2**32, (5000,), generator=torch.Generator().manual_seed(2))
        words_ = torch.cat([x, r])
        assert torch.equal(EXT.noise_math("uniform", words_), P.uint_to_uniform_float(words_))


# ------------------------------------------------------------------------------ eager vs Triton
# ------------------------------------------------------------------------------ the backends
@pytest.mark.parametrize("device", devices_with_a_fused_backend())
@pytest.mark.parametrize("seed_offset", SEEDS, ids=["plain", "wrap", "big-seed-neg-offset"])
@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=lambda s: "x".join(map(str, s)) or "none")
@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_backends_generate_the_same_eps(kind, sizes, seed_offset, device):
    """eps (params 0, scale 1, backups read: p = 0 + 1 * eps) of every fused backend on the
    device, bit for bit the eager stream's, and that stream is the contract's formula applied to
    the eager Philox words."""
    seed, offset = seed_offset
    a = 0.37
    eag = eps_of("eager", sizes, kind, seed, offset, a, device=device)
    assert len(eag) == len(sizes)
    for backend in fused_backends(device):
        got = eps_of(backend, sizes, kind, seed, offset, a, device=device)
        assert_bits(got, eag, f"{backend} {kind} eps")
    if sum(sizes):
        k = offset + torch.arange(sum(sizes), dtype=torch.int64, device=device)
        x0, x1 = words(seed, k)[:2]
        u1, u2 = P.uint_to_uniform_float(x0), P.uint_to_uniform_float(x1)
        if kind == "normal":
            want = P.normal_from_uniform(u1, u2)
        else:
            want = u1 * torch.tensor(2 * a, device=device) - torch.tensor(a, device=device)
        assert_bits([torch.cat(eag)], [want + 0.0], "the formula")  # 0 + eps: -0 -> +0


def _params(dtype, device, layouts=True):
    """Mixed shapes (empty, one element, odd) and, with ``layouts``, a transposed (dense,
    memory order) tensor and a strided view (logical order) with their backups."""
    g = torch.Generator().manual_seed(3)
    ps = [torch.randn(s, generator=g).to(dtype) for s in [(3, 5), (0,), (1,), (7,), (4, 3, 2)]]
    bs = [torch.randn(p.shape, generator=g).to(dtype) for p in ps]
    if layouts:
        ps.append(torch.randn(6, 4, generator=g).to(dtype).t())
        bs.append(torch.randn(6, 4, generator=g).to(dtype).t())  # the same strides
        ps.append(torch.randn(9, 2, generator=g).to(dtype)[:, 0])
        bs.append(torch.randn(9, generator=g).to(dtype))
    return [p.to(device) for p in ps], [b.to(device) for b in bs]


@pytest.mark.parametrize("device", devices_with_a_fused_backend())
@pytest.mark.parametrize("save_backup", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_full_op_is_bit_identical(kind, dtype, save_backup, device):
    """The whole op (per-tensor scale, random backups, layouts, every dtype): params and backups
    of every fused backend bit for bit the eager backend's (``b + s * eps`` two roundings
    everywhere, then one to the dtype)."""
    ps, bs = _params(dtype, device)
    scale = torch.rand(len(ps), generator=torch.Generator().manual_seed(4)).to(device) + 0.5
    out = {}
    for backend in ["eager"] + fused_backends(device):
        p, b = [x.clone() for x in ps], [x.clone() for x in bs]
        sk.noise_perturb_(
            p, b, scale, kind=kind, half_cube_len=0.2, save_backup=save_backup,
            seed=t64(77, device), offset=t64(5, device), backend=backend,
        )  # fmt: skip
        out[backend] = (p, b)
    pe, be = out.pop("eager")
    for backend, (p, b) in out.items():
        assert_bits(b, be, f"{backend} backups")  # written bit for bit, or only read
        assert_bits(p, pe, f"{backend} params")
        # the noise is there
        assert any(not torch.equal(x, y) for x, y in zip(p, bs if save_backup else ps))


@pytest.mark.parametrize("device", devices_with_a_fused_backend())
@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_layouts_choose_the_element_order_alike(kind, device):
    """A permuted dense parameter with an equally strided backup takes its counters in memory
    order (the kernels run on it in place), with a contiguous backup in logical order (the
    launchers copy it): the same on every backend, and the two orders do differ."""
    base = torch.zeros(5, 6, 3, 4, device=device).to(memory_format=torch.channels_last)
    cases = {"memory": base, "logical": base.contiguous()}
    got = {}
    for name, b in cases.items():
        out = {}
        for backend in ["eager"] + fused_backends(device):
            p = base.clone(memory_format=torch.preserve_format)
            sk.noise_perturb_(
                [p], [b.clone(memory_format=torch.preserve_format)],
                torch.ones((), device=device), kind=kind, save_backup=False,
                seed=t64(8, device), offset=t64(0, device), backend=backend,
            )  # fmt: skip
            out[backend] = p
        for backend, p in out.items():
            assert_bits([p], [out["eager"]], f"{name} order, {backend}")
        got[name] = out["eager"]
    flat = P.noise(t64(8, device), t64(0, device), base.numel(), kind)
    assert torch.equal(got["logical"], flat.view(base.shape))
    assert torch.equal(got["memory"], flat.as_strided(base.shape, base.stride()))
    assert not torch.equal(got["memory"], got["logical"])


@needs_triton
def test_triton_fallback_draws_the_same_stream():
    """float64 parameters fall back from Triton to eager: the counter stream still (it used to
    switch to the global generator), the float32 values the kernel gives float32 parameters."""
    sizes = [33, 4, 0, 9]
    for kind in ("uniform", "normal"):
        want = eps_of("triton", sizes, kind, 21, 40, a=0.5)
        got = eps_of("triton", sizes, kind, 21, 40, a=0.5, dtype=torch.float64)
        assert_bits([g.float() for g in got], want, f"float64 fallback, {kind}")


# ------------------------------------------------------------------------------ the functions
def _domain_sample(lo: float, n: int, seed: int) -> torch.Tensor:
    """float32 values in ``[lo, 1)``: ``n`` uniform over the bit patterns (every binade alike),
    ``n`` of the values ``f(x)`` takes, and the edges (``lo``, the largest float below 1, the
    binade starts, mantissas around sqrt(2), the eighths where cos2pi_f32's quadrant changes)."""
    g = torch.Generator().manual_seed(seed)
    lo_bits = int(torch.tensor(lo, dtype=torch.float32).view(torch.int32))
    one_bits = int(torch.tensor(1.0).view(torch.int32))
    bits = torch.randint(lo_bits, one_bits, (n,), generator=g, dtype=torch.int64)
    by_bits = bits.to(torch.int32).view(torch.float32)
    words_ = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    drawn = P.uint_to_uniform_float(words_).clamp_min(lo)
    edges = [lo, 1.0 - 2**-24, 0.5, 0.25, 2**-10, P.SQRT2 / 2, P.SQRT2 / 4]
    edges += [k / 8 for k in range(8)]
    edge = torch.tensor(edges, dtype=torch.float32).clamp_min(lo)
    near = torch.cat(
        [torch.nextafter(edge, torch.zeros(())), torch.nextafter(edge, torch.ones(()))]
    )
    out = torch.cat([by_bits, drawn, edge, near])
    return out[(out >= lo) & (out < 1)]


def _ulps64(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|got - ref| in float32 ulps of the float64 reference value."""
    e = torch.floor(torch.log2(ref.abs().clamp_min(2.0**-126)))
    return (got.double() - ref).abs() / torch.exp2(e - 23)


def _cos2pi64(u: torch.Tensor) -> torch.Tensor:
    """cos(2 pi u) in float64 from the exact reduction u = q/4 + f (no cancellation near the
    zeros, where cos(2 pi u) in float64 would lose the bits the float32 function keeps)."""
    u = u.double()
    q = torch.round(4 * u)
    a = 2 * math.pi * (u - q / 4)
    r = q.long() & 3
    return torch.where(
        r == 0, a.cos(), torch.where(r == 1, -a.sin(), torch.where(r == 2, -a.cos(), a.sin()))
    )


def test_log_and_cos_against_float64():
    """``log_f32`` within 1 ulp of float64's log on [1e-7, 1), ``cos2pi_f32`` within 2 ulps of
    cos(2 pi u) on [0, 1) (measured over every float32 input: 0.83 and 1.65), the normal eps
    within 4 ulps of float64's Box-Muller of the same uniforms."""
    u = _domain_sample(P.NORMAL_U_MIN, 1 << 20, 1)
    err = _ulps64(P.log_f32(u), u.double().log())
    assert err.max() <= LOG_ULPS, f"log_f32: {err.max():.3f} ulps at u={u[err.argmax()]:.9g}"
    assert err.max() > 0.5  # not correctly rounded everywhere: the check can see an error
    v = _domain_sample(2**-40, 1 << 20, 2)
    v = torch.cat([torch.zeros(1), v])
    err = _ulps64(P.cos2pi_f32(v), _cos2pi64(v))
    assert err.max() <= COS_ULPS, f"cos2pi_f32: {err.max():.3f} ulps at u={v[err.argmax()]:.9g}"
    assert P.cos2pi_f32(torch.tensor([0.0, 0.25, 0.5, 0.75])).tolist() == [1.0, 0.0, -1.0, 0.0]
    # the normal transform as a whole (u1 clamped at 1e-7 in both)
    x0, x1 = words(3, torch.arange(1 << 20, dtype=torch.int64))[:2]
    u1, u2 = P.uint_to_uniform_float(x0), P.uint_to_uniform_float(x1)
    z = P.normal_from_uniform(u1, u2)
    ref = torch.sqrt(-2 * u1.clamp_min(P.NORMAL_U_MIN).double().log()) * _cos2pi64(u2)
    err = _ulps64(z, ref)
    assert err.max() <= NORMAL_ULPS, f"normal eps: {err.max():.3f} ulps"


@pytest.fixture(scope="module")
def function_kernel():
    """A Triton kernel applying the noise module's functions to a tensor (``FN``: 0 log_f32,
    1 cos2pi_f32, 2 normal_from_uniform), launched as the noise kernels are."""

    @triton.jit
    def kernel(x_ptr, y_ptr, out_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = j < n
        x = tl.load(x_ptr + j, mask=m, other=0.5)
        y = tl.load(y_ptr + j, mask=m, other=0.5)
        if FN == 0:
            r = N.log_f32(x)
        elif FN == 1:
            r = N.cos2pi_f32(x)
        else:
            r = N.normal_from_uniform(x, y)
        tl.store(out_ptr + j, r, mask=m)

    def run(fn: int, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(TDEV)
        y = x if y is None else y.to(TDEV)
        out = torch.empty_like(x)
        block = 1 << 16
        grid = (triton.cdiv(x.numel(), block),)
        kernel[grid](x, y, out, x.numel(), FN=fn, BLOCK=block, **N.LAUNCH_OPTIONS)
        return out.cpu()

    return run


@needs_triton
def test_the_functions_are_bit_identical_across_backends(function_kernel):
    """log_f32, cos2pi_f32 and the normal transform on one sample: eager (CPU, and the Triton
    device when it is another), the Triton kernel and the extension's C++, bit for bit."""
    u = _domain_sample(P.NORMAL_U_MIN, 1 << 16, 3)
    v = torch.cat([torch.zeros(1), _domain_sample(2**-40, 1 << 16, 4)])
    n = min(u.numel(), v.numel())
    u1, u2 = u[:n], v[:n]
    want = {
        "log": P.log_f32(u),
        "cos2pi": P.cos2pi_f32(v),
        "normal": P.normal_from_uniform(u1, u2),
    }
    got = {
        "log": function_kernel(0, u),
        "cos2pi": function_kernel(1, v),
        "normal": function_kernel(2, u1, u2),
    }
    if TDEV.type != "cpu":
        got["eager on the device"] = P.normal_from_uniform(u1.to(TDEV), u2.to(TDEV)).cpu()
        want["eager on the device"] = want["normal"]
    if EXT is not None:
        got["ext log"] = EXT.noise_math("log", u)
        got["ext cos2pi"] = EXT.noise_math("cos2pi", v)
        got["ext normal"] = EXT.noise_math("normal", u1, u2)
        for k in ("log", "cos2pi", "normal"):
            want[f"ext {k}"] = want[k]
    for name, g in got.items():
        assert_bits([g], [want[name]], name)


def test_normal_and_uniform_distributions():
    """2**20 draws of each kind (eager stream, one seed): moments, tails and a Kolmogorov-Smirnov
    distance to N(0, 1) / U[-a, a] (1% critical value 1.63 / sqrt(n))."""
    n = 1 << 20
    seed, offset = t64(2024, "cpu"), t64(-(1 << 19), "cpu")
    z = P.noise(seed, offset, n, "normal").double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    tail = (z.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    # the largest value Box-Muller can give: sqrt(-2 log(1e-7))
    assert z.abs().max() <= math.sqrt(-2 * math.log(P.NORMAL_U_MIN)) * (1 + 2**-20)
    zs = z.sort().values
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    cdf = torch.special.ndtr(zs)
    ks = torch.maximum((emp - cdf).abs(), (emp - 1 / n - cdf).abs()).max().item()
    assert ks < 1.63 / math.sqrt(n), ks
    a = 0.3
    x = P.noise(seed, offset, n, "uniform", a).double()
    assert x.min() >= -a and x.max() < a
    assert abs(x.mean().item()) < 5 * a / math.sqrt(3 * n)
    assert abs(x.var().item() / (a * a / 3) - 1) < 0.01
    xs = (x.sort().values + a) / (2 * a)
    ks = torch.maximum((emp - xs).abs(), (emp - 1 / n - xs).abs()).max().item()
    assert ks < 1.63 / math.sqrt(n), ks


# ------------------------------------------------------------------------------ eager stream
def test_counters_continue_across_tensors_and_offsets():
    """Element ``j`` of the concatenated list takes counter ``offset + j``: splitting the list
    differently, or moving the offset by ``d`` and the elements by ``d``, changes nothing;
    tensors of other dtypes in the list take their places in the same sequence."""
    for kind in ("uniform", "normal"):
        whole = eps_of("eager", [4097 + 17 + 3], kind, 7, 11, device="cpu")[0]
        parts = eps_of("eager", [4097, 0, 17, 1, 2], kind, 7, 11, device="cpu")
        assert torch.equal(torch.cat(parts), whole)
        later = eps_of("eager", [100], kind, 7, 11 + 4000, device="cpu")[0]
        assert torch.equal(later, whole[4000:4100])  # the offset advanced past 4000 elements
        assert not torch.equal(later, whole[:100])
        # mixed dtypes: each tensor is the float32 eps of its position, rounded once
        ps = [torch.zeros(n, dtype=d) for n, d in [(5, torch.bfloat16), (9, torch.float32)]]
        ps.append(torch.zeros(7, dtype=torch.float16))
        sk.noise_perturb_(
            ps, [torch.zeros_like(p) for p in ps], torch.ones(()), kind=kind, save_backup=False,
            seed=t64(7, "cpu"), offset=t64(11, "cpu"), backend="eager",
        )  # fmt: skip
        for p, w in zip(ps, whole[:21].split([5, 9, 7])):
            assert torch.equal(p, w.to(p.dtype))


def test_seed_and_offset_forms():
    """An int, a 0-d int64 tensor and a one-element int32 tensor are the same seed; no offset
    is offset 0; another seed or offset gives other numbers."""
    n = [50, 3]

    def draw(seed, offset):
        ps = [torch.zeros(m) for m in n]
        sk.noise_perturb_(
            ps, [torch.zeros(m) for m in n], torch.ones(()), save_backup=False, seed=seed,
            offset=offset, backend="eager",
        )  # fmt: skip
        return torch.cat(ps)

    ref = draw(torch.tensor(99), torch.tensor(0))
    assert torch.equal(draw(99, None), ref)
    assert torch.equal(draw(torch.tensor([99], dtype=torch.int32), 0), ref)
    assert not torch.equal(draw(100, 0), ref)
    assert not torch.equal(draw(99, 1), ref)
    with pytest.raises(TypeError):
        draw(torch.tensor(99.0), 0)


def test_the_default_stays_the_reference_stream():
    """Without a seed the eager backend draws from the global generator, per tensor (the
    reference code's stream); with one it neither reads nor advances the global generator."""
    ps = [torch.zeros(6), torch.zeros(2, 3)]
    bs = [torch.zeros_like(p) for p in ps]
    torch.manual_seed(5)
    sk.noise_perturb_(ps, bs, torch.ones(()), save_backup=False, backend="eager")
    torch.manual_seed(5)
    want = [torch.normal(0.0, 1.0, size=p.shape) for p in ps]
    for p, w in zip(ps, want):
        assert torch.equal(p, w)
    first = None
    for s in (1, 2):
        torch.manual_seed(s)  # the global generator does not matter
        before = torch.get_rng_state()
        sk.noise_perturb_(
            ps, bs, torch.ones(()), save_backup=False, seed=t64(3, "cpu"), backend="eager"
        )
        assert torch.equal(torch.get_rng_state(), before), "the counter stream advanced it"
        cat = torch.cat([p.flatten() for p in ps])
        first = cat if first is None else first
        assert torch.equal(cat, first)
    assert not torch.equal(first, torch.cat([w.flatten() for w in want]))


@pytest.mark.parametrize("device", DEVICES)
def test_no_host_read_and_a_fixed_op_count(device):
    """Seed and offset on the device: no host read; the ops that run do not grow with the number
    of tensors (views aside)."""
    views = {"aten.view", "aten.detach", "aten.slice", "aten.as_strided", "aten.split"}
    counts = []
    for sizes in ([40, 3], [4] * 10 + [3, 0, 40]):
        ps = [torch.zeros(n, device=device) for n in sizes]
        bs = [torch.zeros_like(p) for p in ps]
        seed, offset = t64(5, device), t64(9, device)
        for kind in ("normal", "uniform"):
            with HostReads() as spy:
                sk.noise_perturb_(
                    ps, bs, torch.ones((), device=device), kind=kind, seed=seed,
                    offset=offset, backend="eager",
                )  # fmt: skip
            assert spy.reads == 0, spy.found
            counts.append(spy.kernels(views))
    assert counts[:2] == counts[2:]


# ------------------------------------------------------------------------------ the extension
@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_extension_follows_the_contract(kind):
    """The extension's CPU kernels (and its CUDA ones where built) on lists crossing its chunks
    (32768 elements on the CPU) and threads: eager's values, bit for bit."""
    sizes = [5, 4097, 0, 33, 70001, 1]
    for device in [d for d in DEVICES if sk.available("ext", d)]:
        want = eps_of("eager", sizes, kind, 12, 2**32 - 40000, a=0.3, device=device)
        got = eps_of("ext", sizes, kind, 12, 2**32 - 40000, a=0.3, device=device)
        assert_bits(got, want, f"ext {kind} eps on {device}")
        # more threads than chunks or not: the same values
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            again = eps_of("ext", sizes, kind, 12, 2**32 - 40000, a=0.3, device=device)
        finally:
            torch.set_num_threads(threads)
        assert_bits(again, want, f"ext {kind} eps on {device}, 2 threads")
