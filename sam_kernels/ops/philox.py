"""The counter-based noise stream of the noise ops, in plain torch tensor ops.

The one noise contract of ``noise_perturb_`` (and of R-SAM's ``filter_noise_perturb_``): the
eager backend computes it here with int32/int64/float32 tensor ops on any device (no host read,
no loop over elements, no Triton), the Triton kernels with :mod:`sam_kernels.triton.noise`, the
compiled extension (CPU and CUDA) with ``csrc/ops_math.h``; all three give the same bits for
the same ``(seed, offset)``, for both kinds.

Contract. Element ``j`` (0-based) of the concatenated list (tensors in list order), with the
int64 seed ``s`` and offset ``o``, all words uint32 and arithmetic mod ``2**32`` unless said::

    k          = o + j                               (int64, wrapping)
    counter    = (lo32(k), hi32(k), 0, 0)
    key        = (lo32(s), hi32(s))                  (two's complement bits of s)
    x0..x3     = Philox4x32-10(counter, key)         (Salmon et al., SC 2011; Random123)

    one round: (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0,  lo(B c2),  hi(A c0) ^ c3 ^ k1,  lo(A c0))
               (k0, k1) <- (k0 + W0, k1 + W1)         A = 0xD2511F53, B = 0xCD9E8D57,
                                                      W0 = 0x9E3779B9, W1 = 0xBB67AE85
               (hi, lo: the high and low 32-bit words of the 64-bit product; 10 rounds, the
               key bumped after each)

    f(x)       = float32(v) * SCALE,  v = x if x < 2**31 else 2**32 - 1 - x,
                 SCALE = 0x1.fffffep-32 (float32(4.6566127342e-10))
                 (Triton's uint_to_uniform_float: v in [0, 2**31 - 1], int -> float32 rounded
                 to nearest even, one float32 product; f(x) in [0, 1), never 1)
    uniform:   eps = f(x0) * float32(2a) - float32(a)       (two float32 roundings)
    normal:    u1  = max(float32(1e-7), f(x0)),  u2 = f(x1)
               eps = sqrt_rn(-2 * log_f32(u1)) * cos2pi_f32(u2)     (Box-Muller, cosine branch)

Lanes ``x2`` and ``x3`` are unused (the words of ``tl.randint4x``; the normal kind keeps the
first value of the Box-Muller pair, as ``tl.randn`` does).

``log_f32`` and ``cos2pi_f32`` are this project's own float32 functions (below), not a math
library's: every step is an exactly rounded IEEE float32 operation (``+ - *``, division,
``sqrt_rn`` correctly rounded), an exact int32 operation on the float's bits, an exact
int <-> float conversion, a comparison or a select, in the one order written here, never fused
into a multiply-add. So every backend computes the same bits: torch ops (each op one rounding),
Triton launched with ``enable_fp_fusion=False`` (``div_rn``/``sqrt_rn``), C++ compiled with
``-ffp-contract=off`` and CUDA with ``__fadd_rn``/``__fmul_rn``/``__fdiv_rn``/``__fsqrt_rn``.
No intermediate is subnormal (so flushing them, as some GPU modes do, changes nothing)::

    log_f32(u), u in [1e-7, 1)   (fdlibm's logf reduction, Taylor coefficients)
        i = bits(u);  e = (i >> 23) - 127;  m = float((i & 0x7FFFFF) | 0x3F800000)   (m in [1, 2))
        if m > SQRT2:  m = m * 0.5;  e = e + 1                    (m in (0.707, 1.414], exact)
        f = m - 1   (exact);  s = f / (f + 2);  z = s * s
        R = z * (LG1 + z * (LG2 + z * (LG3 + z * (LG4 + z * LG5))))      (LGk = float32(2/(2k+1)))
        h = 0.5 * f * f;  k = float(e)
        log = k * LN2_HI - ((h - (s * (h + R) + k * LN2_LO)) - f)
              (LN2_HI = 0x1.62e3p-1 has 17 significant bits: k * LN2_HI is exact for |e| <= 23)

    cos2pi_f32(u) = cos(2 pi u), u in [0, 1)
        q = int(u * 4 + 0.5)  (truncation; 0..4);  f = u - float(q) * 0.25   (exact, |f| <= 1/8)
        x = f * TWO_PI;  xl = f * TWO_PI_LO;  z = x * x   (TWO_PI + TWO_PI_LO: 2 pi within 2**-47)
        c = 1 + z * (-C2 + z * (C4 + z * (-C6 + z * (C8 + z * -C10))))     (Cn = float32(1/n!))
        s = x + (xl + x * (z * (-S3 + z * (S5 + z * (-S7 + z * S9)))))    (Sn = float32(1/n!))
        cos2pi = c * 1, s * -1, c * -1, s * 1  for  q & 3 = 0, 1, 2, 3
                 (negation as a product by -1: exact, zeros included; Triton's unary minus is
                 0 - x, which gives +0 for +0)

Accuracy, checked against float64 over every float32 input of the domain: ``log_f32`` within
0.83 ulp of ``log``, ``cos2pi_f32`` within 1.65 ulps of ``cos(2 pi u)`` (the rounding of
``x``); see tests/ops/test_noise_contract.py, which checks a sample (with the distribution of the
normal values) on every run.

Element order inside a tensor: memory order when the parameter and its backup are dense with
identical strides (the kernels then run on them in place), the logical (row-major) order
otherwise; the two coincide for contiguous tensors.

32-bit products are formed from 16-bit halves so that every intermediate stays below ``2**49``
in int64 (as :mod:`sam_kernels.ops.counter_rng` does).
"""

from __future__ import annotations

import torch

from sam_kernels.ops._common import is_dense as _is_dense

M32 = 0xFFFFFFFF
#: Philox4x32 round multipliers (A: counter word 0, B: counter word 2) and Weyl key increments
PHILOX_A, PHILOX_B = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
#: float32 constants of the contract, as hex (the same literals as csrc/ops_math.h): Triton's
#: uniform conversion, the normal kind's lower clamp of u1, and log_f32 / cos2pi_f32's constants
UNIFORM_SCALE = float.fromhex("0x1.fffffep-32")  # float32(4.6566127342e-10)
NORMAL_U_MIN = float.fromhex("0x1.ad7f2ap-24")  # float32(1e-7)
SQRT2 = float.fromhex("0x1.6a09e6p+0")
LN2_HI = float.fromhex("0x1.62e3p-1")
LN2_LO = float.fromhex("0x1.2fefa4p-17")
#: 2/3, 2/5, 2/7, 2/9, 2/11
LOG_COEFS = tuple(
    float.fromhex(h) for h in ("0x1.555556p-1", "0x1.99999ap-2", "0x1.24924ap-2", "0x1.c71c72p-3",
                               "0x1.745d18p-3")
)  # fmt: skip
TWO_PI = float.fromhex("0x1.921fb6p+2")
TWO_PI_LO = float.fromhex("-0x1.777a5cp-23")
#: 1/2!, 1/4!, 1/6!, 1/8!, 1/10!
COS_COEFS = tuple(
    float.fromhex(h) for h in ("0x1p-1", "0x1.555556p-5", "0x1.6c16c2p-10", "0x1.a01a02p-16",
                               "0x1.27e4fcp-22")
)  # fmt: skip
#: 1/3!, 1/5!, 1/7!, 1/9!
SIN_COEFS = tuple(
    float.fromhex(h) for h in ("0x1.555556p-3", "0x1.111112p-7", "0x1.a01a02p-13", "0x1.71de3ap-19")
)
#: elements generated per block on the CPU (int64 temporaries of 512 KiB stay in cache: 2.5x
#: faster than 2**20) and on other devices (fewer launches; about 60 bytes per element)
CPU_BLOCK = 1 << 16
BLOCK = 1 << 22

NOISE_KINDS = ("normal", "uniform")


def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi32(x * m), lo32(x * m))`` for ``0 <= x, m < 2**32``, all intermediates ``< 2**49``.

    ``x * m = 2**16 t + lo16(p)`` with ``p = x * lo16(m)`` and ``t = (p >> 16) + x * hi16(m)``
    (both below ``2**49``); so ``hi32 = t >> 16`` and ``lo32 = lo16(t) << 16 | lo16(p)``.
    """
    p = x * (m & 0xFFFF)
    t = (x * (m >> 16)).add_(p >> 16)
    lo = (t & 0xFFFF).bitwise_left_shift_(16).bitwise_or_(p.bitwise_and_(0xFFFF))
    return t.bitwise_right_shift_(16), lo


def philox4x32_10(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of int64 tensors holding uint32 words (broadcast together).

    Returns the four output words as int64 tensors with values in ``[0, 2**32)`` (new tensors:
    the inputs are not written).
    """
    # one shape for the four words (views), so that every product below has it
    c0, c1, c2, c3 = torch.broadcast_tensors(*counter)
    k0, k1 = key
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & M32
            k1 = (k1 + PHILOX_W1) & M32
        hi_b, lo_b = _mulhilo(c2, PHILOX_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_A)
        # the products are fresh tensors: the xors go into them, the inputs stay untouched
        hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        hi_a.bitwise_xor_(c3).bitwise_xor_(k1)
        c0, c1, c2, c3 = hi_b, lo_b, hi_a, lo_a
    return c0, c1, c2, c3


def uint_to_uniform_float(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` of uint32 words (int64 tensor): float32 in ``[0, 1)``.

    The word is read as an int32 ``i`` and folded to ``i`` or ``-i - 1`` (``2**32 - 1 - x`` for
    ``x >= 2**31``), converted to float32 (nearest even) and multiplied by the float32 constant
    ``4.6566127342e-10``, the largest with ``(2**31 - 1) * scale < 1`` after rounding.
    """
    v = torch.where(x >= 2**31, M32 - x, x).to(torch.float32)
    # a 0-d float32 tensor: the product is float32 x float32 whatever the scalar rules
    return v.mul_(torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device))


def int64_scalar(x: torch.Tensor | int, device: torch.device, what: str) -> torch.Tensor:
    """``x`` as a 0-d int64 tensor on ``device`` (copied without a host read if needed)."""
    if isinstance(x, int) and not isinstance(x, bool):
        x = torch.tensor(x, dtype=torch.int64)  # a host value anyway
    if not isinstance(x, torch.Tensor) or x.numel() != 1:
        raise TypeError(f"{what} must be an int or a 1-element integer tensor")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"{what} must be an integer tensor, got {x.dtype}")
    if x.device != device:
        x = x.to(device, non_blocking=True)
    return x.to(torch.int64).reshape(())


def stream_scalars(
    seed: torch.Tensor | int | None, offset: torch.Tensor | int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A call's ``(seed, offset)`` as 0-d int64 tensors on ``device`` (:func:`int64_scalar`),
    ``offset=None`` meaning 0. ``seed=None`` (the fused backends' default) draws a fresh seed
    from torch's global CPU generator: no device read; the backends call this only once they
    take the call, so a declined call leaves the generator as it was."""
    if seed is None:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    offset = 0 if offset is None else offset
    return int64_scalar(seed, device, "seed"), int64_scalar(offset, device, "offset")


def _words(seed: torch.Tensor, offset: torch.Tensor, start: int, n: int, lanes: int):
    """The first ``lanes`` Philox words of elements ``start .. start + n - 1``."""
    k = torch.arange(start, start + n, dtype=torch.int64, device=seed.device).add_(offset)
    zero = torch.zeros((), dtype=torch.int64, device=seed.device)
    key = (seed & M32, (seed >> 32) & M32)  # >> is arithmetic: the bits of the two's complement
    x = philox4x32_10((k & M32, (k >> 32) & M32, zero, zero), key)
    return x[:lanes]


def log_f32(u: torch.Tensor) -> torch.Tensor:
    """The contract's ``log_f32`` of float32 ``u`` in ``[1e-7, 1)`` (a new float32 tensor).

    Torch ops only, each one exactly rounded float32 (or exact int32) operation: the same bits on
    every device, and as the Triton and extension kernels compute them.
    """
    i = u.contiguous().view(torch.int32)
    e = (i >> 23).sub_(127)
    m = ((i & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > SQRT2
    m = torch.where(big, m * 0.5, m)  # exact
    k = e.add_(big.to(torch.int32)).to(torch.float32)
    f = m.sub_(1.0)  # exact (Sterbenz)
    s = f / (f + 2.0)
    z = s * s
    lg1, lg2, lg3, lg4, lg5 = LOG_COEFS
    r = (z * lg5).add_(lg4).mul_(z).add_(lg3).mul_(z).add_(lg2).mul_(z).add_(lg1).mul_(z)
    h = (f * 0.5).mul_(f)
    # k * LN2_HI - ((h - (s * (h + R) + k * LN2_LO)) - f)
    t = s.mul_(r.add_(h)).add_(k * LN2_LO)
    t = h.sub_(t).sub_(f)
    return k.mul_(LN2_HI).sub_(t)


def cos2pi_f32(u: torch.Tensor) -> torch.Tensor:
    """The contract's ``cos2pi_f32``: ``cos(2 pi u)`` of float32 ``u`` in ``[0, 1)`` (a new
    float32 tensor)."""
    q = (u * 4.0).add_(0.5).to(torch.int32)  # truncation: 0 .. 4
    f = u - q.to(torch.float32).mul_(0.25)  # exact
    x = f * TWO_PI
    xl = f.mul_(TWO_PI_LO)
    z = x * x
    c2, c4, c6, c8, c10 = COS_COEFS
    c = (z * -c10).add_(c8).mul_(z).sub_(c6).mul_(z).add_(c4).mul_(z).sub_(c2).mul_(z).add_(1.0)
    s3, s5, s7, s9 = SIN_COEFS
    p = (z * s9).sub_(s7).mul_(z).add_(s5).mul_(z).sub_(s3).mul_(z)
    s = xl.add_(p.mul_(x)).add_(x)  # x + (xl + x * p): addition commutes, the roundings stay
    # quadrant q: c, -s, -c, s; the sign as a product by -1 or 1 (an exact negation, zeros
    # included: Triton's unary minus is 0 - x, which makes -(+0) +0)
    sign = torch.where((q + 1) & 2 == 0, 1.0, -1.0)
    return torch.where(q & 1 == 0, c, s).mul_(sign)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """float32 ``sqrt`` rounded correctly: evaluated in float64 and rounded once (exact for
    ``sqrt``: 53 >= 2 * 24 + 2 bits). ATen's float32 ``sqrt`` is not correctly rounded on every
    CPU path. Devices without float64 (MPS) use their float32 ``sqrt``."""
    if x.device.type == "mps":
        return torch.sqrt(x)
    return torch.sqrt(x.double()).float()


def normal_from_uniform(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """``sqrt_rn(-2 log_f32(max(1e-7, u1))) * cos2pi_f32(u2)`` (float32; ``u1`` is not written)."""
    lg = log_f32(u1.clamp_min(NORMAL_U_MIN))
    return sqrt_rn(lg.mul_(-2.0)).mul_(cos2pi_f32(u2))


def _normal_from(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return normal_from_uniform(uint_to_uniform_float(x0), uint_to_uniform_float(x1))


def _generate(seed, offset, n, block_fn, device) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32, device=device)
    # fixed-size blocks: the temporaries stay bounded (the loop runs over blocks, not tensors)
    block = CPU_BLOCK if device.type == "cpu" else BLOCK
    for start in range(0, n, block):
        m = min(block, n - start)
        out[start : start + m] = block_fn(start, m)
    return out


def uniform(seed: torch.Tensor, offset: torch.Tensor, n: int) -> torch.Tensor:
    """``tl.rand(seed, offset + arange(n))``: float32 ``[n]`` in ``[0, 1)`` on ``seed``'s device.

    ``seed``, ``offset``: 0-d int64 tensors on one device (see :func:`int64_scalar`).
    """
    return _generate(
        seed,
        offset,
        n,
        lambda s, m: uint_to_uniform_float(_words(seed, offset, s, m, 1)[0]),
        seed.device,
    )


def normal(seed: torch.Tensor, offset: torch.Tensor, n: int) -> torch.Tensor:
    """The normal ``eps`` of counters ``offset + arange(n)``: float32 ``[n]``, standard normal
    (the contract: Box-Muller of the first two Philox words, ``log_f32`` and ``cos2pi_f32``)."""
    return _generate(
        seed, offset, n, lambda s, m: _normal_from(*_words(seed, offset, s, m, 2)), seed.device
    )


def noise(
    seed: torch.Tensor, offset: torch.Tensor, n: int, kind: str, half_cube_len: float = 1.0
) -> torch.Tensor:
    """``eps`` of the noise op for elements ``0 .. n-1``: float32 ``[n]`` (see the contract)."""
    if kind == "normal":
        return normal(seed, offset, n)
    if kind != "uniform":
        raise ValueError(f"kind={kind!r}; expected one of {NOISE_KINDS}")
    a = float(half_cube_len)
    u = uniform(seed, offset, n)
    # float32(2a) and float32(a), as the kernel receives them; two roundings, as it computes
    two_a = torch.tensor(2.0 * a, dtype=torch.float32, device=u.device)
    return u.mul_(two_a).sub_(torch.tensor(a, dtype=torch.float32, device=u.device))


def memory_order(param: torch.Tensor, backup: torch.Tensor) -> bool:
    """Whether the elements of ``param`` take their counters in memory order (else logical).

    Memory order where the fused kernel runs on the tensors in place: both dense with equal
    strides (and not both contiguous, where the orders coincide anyway).
    """
    if param.numel() <= 1 or (param.is_contiguous() and backup.is_contiguous()):
        return False
    return param.stride() == backup.stride() and _is_dense(param) and _is_dense(backup)


def list_noise(
    params: list[torch.Tensor],
    backups: list[torch.Tensor],
    seed: torch.Tensor | int,
    offset: torch.Tensor | int | None,
    kind: str,
    half_cube_len: float = 1.0,
) -> list[torch.Tensor]:
    """``eps`` for each tensor of ``params`` (float32, their shapes), counters continuing across
    the list: one generation over the total element count, then views of it per tensor."""
    device = params[0].device
    seed, offset = stream_scalars(seed, offset, device)
    numels = [p.numel() for p in params]
    flat = noise(seed, offset, sum(numels), kind, half_cube_len)
    out, start = [], 0
    # views only (metadata): the ops that compute stay a fixed number per call
    for p, b, m in zip(params, backups, numels):
        if memory_order(p, b):
            # element at memory position q of p takes flat[start + q]: p's strides over the block
            out.append(flat.as_strided(p.shape, p.stride(), start))
        else:
            out.append(flat[start : start + m].view(p.shape))
        start += m
    return out
