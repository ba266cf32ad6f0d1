"""Counter-based uniform random numbers: a pure function of ``(seed, stream, counter, index)``.

The stochastic members of the SAM family (SS-SAM's coin, ESAM's stochastic weight perturbation)
draw from this instead of a stateful generator. The counter is the optimizer's count of applied
steps, a device tensor, so:

- a step skipped for a non-finite value (decided on the device, with no host read) leaves the
  stream exactly where it was: the next step draws what it would have drawn had the skipped step
  never happened (a stateful generator would have advanced);
- every rank given the same seed draws the same numbers (SS-SAM ranks must agree on whether
  a second pass runs, or they deadlock in the all-reduce);
- the whole generator state is ``(seed, counter)``: two integers in ``state_dict``.

The hash is 32-bit integer arithmetic (MurmurHash3's ``fmix32`` finaliser, chained over the
input words as in a sponge), written with int64 tensor ops whose intermediate values stay below
2**49, so it is bit-identical on every device and backend, and easy to reproduce elsewhere
(the test suite re-implements it in plain Python)::

    mix(x)       = fmix32(x):  x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13;
                               x *= 0xC2B2AE35; x ^= x >> 16          (all mod 2**32)
    absorb(h, w) = mix((h ^ w) + 0x9E3779B9 mod 2**32)
    h = 0
    for w in (seed_lo, seed_hi, stream, counter_lo, counter_hi, index):  h = absorb(h, w)
    u = (mix(h) >> 8) * 2**-24                                         (float32, in [0, 1))
"""

from __future__ import annotations

import math

import torch

from sam_kernels._backend import register, resolve

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x, m: int):
    """``x * m mod 2**32`` for ``0 <= x < 2**32`` without leaving int64 (ints or tensors)."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _M32


def _mix(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _absorb(h, w):
    return _mix(((h ^ w) + _GOLDEN) & _M32)


def uniform_threshold(prob: float) -> float:
    """``thr`` with ``u < thr`` iff ``u < prob`` (exactly, as real numbers) for every output ``u``.

    Outputs are multiples of ``2**-24``; so is ``thr = ceil(prob * 2**24) / 2**24``, exact in
    float32, so a Bernoulli(prob) draw ``u < thr`` on the device is exact whatever the float32
    rounding of ``prob``.
    """
    return math.ceil(prob * 2**24) / 2**24


def counter_uniform(
    seed: int,
    counter: torch.Tensor,
    index: int | torch.Tensor,
    *,
    stream: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Uniform numbers in ``[0, 1)`` as a pure function of ``(seed, stream, counter, index)``.

    Args:
        seed: a non-negative integer below ``2**64``.
        counter: a 0-d int64 tensor (on the device the result should live on); read on the
            device only (no host read).
        index: ``n`` (the indices ``0..n-1``) or an int64 tensor of indices (below ``2**32``).
        stream: a small integer separating independent uses of one seed.

    Returns:
        float32 tensor of shape ``[n]`` (or the shape of ``index``) on ``counter``'s device;
        multiples of ``2**-24``, so ``u < p`` is exact for ``p`` in {0, 1}.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not isinstance(stream, int) or not 0 <= stream <= _M32:
        raise ValueError(f"stream must be an integer in [0, 2**32), got {stream!r}")
    if counter.dim() != 0 or counter.dtype != torch.int64:
        raise ValueError("counter must be a 0-d int64 tensor")
    if isinstance(index, int):
        index = torch.arange(index, dtype=torch.int64, device=counter.device)
    elif index.dtype != torch.int64 or index.device != counter.device:
        raise ValueError("index must be an int64 tensor on the counter's device")
    return resolve("counter_uniform", counter.device, backend)(seed, stream, counter, index)


@register("counter_uniform", "eager")
def counter_uniform_eager(seed: int, stream: int, counter: torch.Tensor, index: torch.Tensor):
    # the words known on the host are absorbed with Python ints (same arithmetic)
    h = _absorb(_absorb(_absorb(0, seed & _M32), (seed >> 32) & _M32), stream)
    h = _absorb(counter & _M32, h)  # xor is symmetric: absorb(h, w) == absorb(w, h)
    h = _absorb(h, (counter >> 32) & _M32)
    h = _absorb(h, index & _M32)
    return (_mix(h) >> 8).to(torch.float32) * (2.0**-24)
