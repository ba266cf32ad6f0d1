"""Hugging Face accelerate with SAM.

``accelerator.prepare`` wraps the SAM optimizer in an ``AcceleratedOptimizer`` whose
``step(closure)`` forwards the closure to ``SAM.step``; the closure calls
``accelerator.backward(loss)``. Under ``accelerate launch`` (multi-GPU DDP) the prepared model
all-reduces every backward: the global mode of ``python_api.distributed`` (for per-replica
m-sharpness build ``SAMDDPStep(model, optimizer.optimizer, mode="per_replica")`` on the
prepared model). ``mixed_precision="bf16"`` works as it is. With ``mixed_precision="fp16"``
accelerate steps through ``scaler.step(optimizer)``, which cannot see the perturbed pass's
gradients; step the wrapped optimizer with its scaler instead (``--fp16`` below)::

    optimizer.optimizer.step(closure, scaler=accelerator.scaler); accelerator.scaler.update()

    python examples/accelerate_loop.py --steps 5          (needs `pip install accelerate`)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from python_api import SAM  # noqa: E402


def make_closure(accelerator, model, x, y, seen: list):
    """Forward, ``accelerator.backward`` (scaled under fp16), loss kept in ``seen``."""

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        seen.append(loss.detach())
        return loss

    return closure


def main(argv: list[str] | None = None) -> list[float]:
    from accelerate import Accelerator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = ap.parse_args(argv)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64 * args.steps, 10, generator=g)
    y = (x @ torch.randn(10, 4, generator=g)).argmax(dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scaler = accelerator.scaler  # a GradScaler only with mixed_precision="fp16"
    losses = []
    for xb, yb in loader:
        seen: list[torch.Tensor] = []
        closure = make_closure(accelerator, model, xb, yb, seen)
        optimizer.zero_grad()
        if scaler is None:
            optimizer.step(closure)  # AcceleratedOptimizer.step returns None
        else:
            optimizer.optimizer.step(closure, scaler=scaler)
            scaler.update()
        losses.append(float(seen[0]))  # L(w), the first evaluation
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
