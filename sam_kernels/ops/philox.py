"""The counter-based noise stream of ``noise_perturb_``, in plain torch tensor ops.

This is the stream the Triton kernel generates with ``tl.rand`` / ``tl.randn`` (Triton 3.x,
``triton/language/random.py``), reproduced with int64/float32 tensor ops on any device (bit
for bit but for the last bits of ``log``/``sqrt``/``cos`` in the normal kind, see below): no
host read, no loop over elements, no Triton. The eager backend uses it when
``noise_perturb_`` is given a ``seed``, so the same ``(seed, offset)`` gives the same noise there
as on the fused backends.

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

    f(x)       = float32(v) * float32(4.6566127342e-10),  v = x if x < 2**31 else 2**32 - 1 - x
                 (Triton's uint_to_uniform_float: v in [0, 2**31 - 1], int -> float32 rounded
                 to nearest even, one float32 product; f(x) in [0, 1), never 1)
    uniform:   eps = f(x0) * float32(2a) - float32(a)       (two float32 roundings)
    normal:    u1  = max(float32(1e-7), f(x0)),  u2 = f(x1)
               eps = sqrt(-2 * log(u1)) * cos(float32(2 pi) * u2)
                                                      (Box-Muller, cosine branch only; every
                                                      operation's result rounded to float32)

Lanes ``x2`` and ``x3`` are unused (Triton's ``tl.randn`` keeps only the first value of the pair).

Element order inside a tensor: memory order when the parameter and its backup are dense with
identical strides (the Triton kernel then runs on them in place), the logical (row-major) order
otherwise; the two coincide for contiguous tensors.

Agreement with other implementations: the Philox words and ``f(x)`` are integer and exactly
rounded float32 operations, so they are bit-identical everywhere; so is the uniform ``eps``
where the two float32 operations are not fused (the CPU, Triton's interpreter; a GPU compiler
contracts them into one FMA: a difference of at most one rounding, below ``ulp(a)``). The
normal ``eps`` goes through ``log``, ``sqrt`` and ``cos``, whose last bits depend on the math
library. Here each is rounded correctly to float32 (evaluated in float64 and rounded once), so
the eager stream is the same on every device with float64; Triton's interpreter uses numpy's
float32 functions (its ``log`` up to 3 ulps off: the normal ``eps`` then differ by up to 5
float32 ulps, in about a quarter of the elements), compiled Triton libdevice's ``logf``/``cosf``
and ``sqrt.approx.ftz``.

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
#: float32 constants of Triton's conversion and Box-Muller transform
UNIFORM_SCALE = 4.6566127342e-10
NORMAL_U_MIN = 1.0e-7
TWO_PI = 6.283185307179586
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


def _words(seed: torch.Tensor, offset: torch.Tensor, start: int, n: int, lanes: int):
    """The first ``lanes`` Philox words of elements ``start .. start + n - 1``."""
    k = torch.arange(start, start + n, dtype=torch.int64, device=seed.device).add_(offset)
    zero = torch.zeros((), dtype=torch.int64, device=seed.device)
    key = (seed & M32, (seed >> 32) & M32)  # >> is arithmetic: the bits of the two's complement
    x = philox4x32_10((k & M32, (k >> 32) & M32, zero, zero), key)
    return x[:lanes]


def _rounded(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` rounded correctly to float32 (but in about one case in ``2**28``): evaluated in
    float64 and rounded once. ATen's float32 ``log``/``cos``/``sqrt`` are not correctly rounded
    on the CPU (SLEEF: up to 1 ulp, ``sqrt`` too) and differ between devices. Devices without
    float64 (MPS) use their float32 functions."""
    if x.device.type == "mps":
        return fn(x)
    return fn(x.double()).float()


def _normal_from(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    # op for op as tl.randn: u1 clamped, theta, radius, radius * cos; the products are float32
    # (exact roundings everywhere), log/sqrt/cos correctly rounded to float32
    u1 = uint_to_uniform_float(x0).clamp_min_(NORMAL_U_MIN)
    th = uint_to_uniform_float(x1).mul_(TWO_PI)
    r = _rounded(torch.sqrt, _rounded(torch.log, u1).mul_(-2.0))
    return r.mul_(_rounded(torch.cos, th))


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
    """``tl.randn(seed, offset + arange(n))``: float32 ``[n]``, standard normal."""
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
    seed = int64_scalar(seed, device, "seed")
    offset = int64_scalar(0 if offset is None else offset, device, "offset")
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
