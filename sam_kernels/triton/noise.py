"""The noise contract in Triton (:mod:`sam_kernels.ops.philox`): the ``eps`` of the noise kernels.

``normal_eps`` / ``uniform_eps`` give element ``c``'s value (``c`` the int64 counter
``offset + j``): Triton's Philox words (``tl.randint4x``: counter ``(lo32(c), hi32(c), 0, 0)``,
key ``(lo32(seed), hi32(seed))``) and conversion (``tl.uint_to_uniform_float``), then the
contract's own float32 ``log_f32`` and ``cos2pi_f32`` instead of ``tl.log``/``tl.cos`` (the
interpreter's numpy and the GPU's libdevice round their last bits differently from each other
and from the eager and extension backends).

Exactness needs every float32 operation rounded on its own: the kernels that use these are
launched with :data:`LAUNCH_OPTIONS` (``enable_fp_fusion=False``: no ``a * b + c`` contracted
into an FMA, by LLVM or ptxas), division is ``div_rn`` and the square root ``sqrt_rn`` (plain
``/`` and ``tl.sqrt`` are approximate on a GPU). The interpreter never fuses; it drops the
option. The product ``b + s * eps`` of the noise kernels is then two roundings too, as on eager.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sam_kernels.ops import philox as P
from sam_kernels.triton._launch import div, sqrt

#: launch options of every kernel that computes noise (``kernel[grid](..., **LAUNCH_OPTIONS)``)
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

# the contract's float32 constants (exact float32 values: Triton rounds nothing)
_U_MIN = tl.constexpr(P.NORMAL_U_MIN)
_SQRT2 = tl.constexpr(P.SQRT2)
_LN2_HI = tl.constexpr(P.LN2_HI)
_LN2_LO = tl.constexpr(P.LN2_LO)
_LG1 = tl.constexpr(P.LOG_COEFS[0])
_LG2 = tl.constexpr(P.LOG_COEFS[1])
_LG3 = tl.constexpr(P.LOG_COEFS[2])
_LG4 = tl.constexpr(P.LOG_COEFS[3])
_LG5 = tl.constexpr(P.LOG_COEFS[4])
_TWO_PI = tl.constexpr(P.TWO_PI)
_TWO_PI_LO = tl.constexpr(P.TWO_PI_LO)
_C2 = tl.constexpr(P.COS_COEFS[0])
_C4 = tl.constexpr(P.COS_COEFS[1])
_C6 = tl.constexpr(P.COS_COEFS[2])
_C8 = tl.constexpr(P.COS_COEFS[3])
_NEG_C10 = tl.constexpr(-P.COS_COEFS[4])
_S3 = tl.constexpr(P.SIN_COEFS[0])
_S5 = tl.constexpr(P.SIN_COEFS[1])
_S7 = tl.constexpr(P.SIN_COEFS[2])
_S9 = tl.constexpr(P.SIN_COEFS[3])


@triton.jit
def log_f32(u):
    """The contract's ``log_f32`` of fp32 ``u`` in ``[1e-7, 1)``."""
    i = u.to(tl.int32, bitcast=True)
    e = (i >> 23) - 127
    m = ((i & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    f = m - 1.0
    s = div(f, f + 2.0)
    z = s * s
    r = z * (_LG1 + z * (_LG2 + z * (_LG3 + z * (_LG4 + z * _LG5))))
    h = (f * 0.5) * f
    k = e.to(tl.float32)
    return k * _LN2_HI - ((h - (s * (h + r) + k * _LN2_LO)) - f)


@triton.jit
def cos2pi_f32(u):
    """The contract's ``cos2pi_f32``: ``cos(2 pi u)`` of fp32 ``u`` in ``[0, 1)``."""
    q = (u * 4.0 + 0.5).to(tl.int32)  # truncation
    f = u - q.to(tl.float32) * 0.25
    x = f * _TWO_PI
    xl = f * _TWO_PI_LO
    z = x * x
    c = 1.0 + z * (z * (z * (z * (z * _NEG_C10 + _C8) - _C6) + _C4) - _C2)
    s = x + (xl + x * (z * (z * (z * (z * _S9 - _S7) + _S5) - _S3)))
    # c, -s, -c, s by quadrant; negated as a product by -1 (Triton's unary minus is 0 - x, which
    # gives +0 for +0)
    sign = tl.where(((q + 1) & 2) == 0, 1.0, -1.0)
    return tl.where((q & 1) == 0, c, s) * sign


@triton.jit
def normal_from_uniform(u1, u2):
    """``sqrt_rn(-2 log_f32(max(1e-7, u1))) * cos2pi_f32(u2)``."""
    lg = log_f32(tl.maximum(u1, _U_MIN))
    return sqrt(lg * -2.0) * cos2pi_f32(u2)


@triton.jit
def normal_eps(seed, c):
    """The normal ``eps`` of counters ``c`` (int64) under ``seed`` (int64 scalar)."""
    x0, x1, _, _ = tl.randint4x(seed, c)
    return normal_from_uniform(tl.uint_to_uniform_float(x0), tl.uint_to_uniform_float(x1))


@triton.jit
def uniform_eps(seed, c, a, two_a):
    """The uniform ``eps = f(x0) * float32(2a) - float32(a)`` of counters ``c``."""
    return tl.rand(seed, c) * two_a - a
