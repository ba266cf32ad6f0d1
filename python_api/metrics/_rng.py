"""Random numbers: the local generator behind probes and start vectors, and the sandbox that
makes every pass over the data see the same global random state.

Probes are drawn on the CPU from a local ``torch.Generator`` and then moved, so the same seed
gives the same probes on every device. The data pass runs with the global generators reseeded
from the same seed and restored afterwards, so a shuffling loader, augmentation or dropout see
the same numbers on every pass (the loss is one fixed function of the weights) and the caller's
random state is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


def local_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded from ``seed``; also the place where ``seed`` is validated."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


@contextlib.contextmanager
def rng_sandbox(seed: int, device: torch.device) -> Iterator[None]:
    """Run with the global generators reseeded from ``seed`` and restore them afterwards."""
    cuda: list[int] = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


def rademacher(like: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """Entries +-1 with probability 1/2 each, drawn on the CPU from ``gen`` (device-independent)."""
    out = []
    for p in like:
        r = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8)
        out.append(r.to(device=p.device, dtype=p.dtype).mul_(2).sub_(1))
    return out


def gaussian(like: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """Standard normal entries drawn on the CPU from ``gen`` (device-independent)."""
    out = []
    for p in like:
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        out.append(torch.randn(p.shape, generator=gen, dtype=dt).to(device=p.device, dtype=p.dtype))
    return out
