"""Parameter-shape lists the op and optimizer-step benchmarks run on.

The lists come from torchvision's models (built on the ``meta`` device: no memory, no weights)
when torchvision is importable, else from the architecture written out below, which gives the
same shapes in the same order (ResNet-50: 161 tensors, 25,557,032 parameters; ViT-B/16: 152
tensors, 86,567,656 parameters).
"""

from __future__ import annotations

import math

Shape = tuple[int, ...]

FLAT_NUMEL = 100_000_000


def _resnet50_written() -> list[Shape]:
    """torchvision ``resnet50()`` parameter shapes, in ``model.parameters()`` order."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = planes * 4
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(out, planes, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


def _vit_b16_written() -> list[Shape]:
    """torchvision ``vit_b_16()`` parameter shapes, in ``model.parameters()`` order."""
    d, mlp, seq = 768, 3072, 197
    shapes: list[Shape] = [(1, 1, d), (d, 3, 16, 16), (d,), (1, seq, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,)]
        shapes += [(mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [(d,), (d,), (1000, d), (1000,)]
    return shapes


def _from_torchvision(name: str) -> list[Shape] | None:
    try:
        import torch
        import torchvision

        with torch.device("meta"):
            model = getattr(torchvision.models, name)()
        return [tuple(p.shape) for p in model.parameters()]
    except Exception:  # torchvision missing or an API change: use the written list
        return None


def model_shapes(name: str) -> tuple[list[Shape], str]:
    """``(shapes, source)`` for ``"resnet50"`` or ``"vit_b_16"``."""
    written = {"resnet50": _resnet50_written, "vit_b_16": _vit_b16_written}[name]
    shapes = _from_torchvision(name)
    if shapes:
        return shapes, "torchvision"
    return written(), "written"


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def shape_sets(smoke: bool, quick: bool) -> dict[str, tuple[list[Shape], str]]:
    """The tensor lists to benchmark: name -> (shapes, source)."""
    if smoke:
        # tiny: a 10-tensor "model" and one flat tensor, for the CPU smoke run
        small = [(32, 16, 3, 3), (32,), (32,), (64, 32, 3, 3), (64,), (64,)]
        small += [(128, 64), (128,), (10, 128), (10,)]
        return {"tiny10": (small, "written"), "flat64k": ([(65_536,)], "written")}
    out = {"resnet50": model_shapes("resnet50")}
    if not quick:
        out["vit_b_16"] = model_shapes("vit_b_16")
        out["flat100M"] = ([(FLAT_NUMEL,)], "written")
    return out
