"""Plain PyTorch training loop with SAM: the reference recipe.

Shows, on synthetic data (runs on the CPU in seconds):
- parameter groups without weight decay and without perturbation for norm layers and biases
  (:func:`python_api.recipes.param_groups_no_decay`);
- ``model=`` so that BN running statistics are updated only at the unperturbed weights;
- an LR scheduler on the SAM optimizer (the param groups are shared with the base optimizer);
- ``--amp fp16`` (GradScaler: every backward scaled, ``opt.step(closure, scaler=scaler)``,
  then ``scaler.update()``), ``--amp bf16`` (autocast only);
- ``--accum N``: N micro-batches per step inside the closure;
- ``--compile``: a ``torch.compile``'d model.

    python examples/plain_loop.py --steps 20 --amp bf16 --accum 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from python_api import SAM  # noqa: E402
from python_api.recipes import accumulate_closure, param_groups_no_decay  # noqa: E402


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 4),
    )  # fmt: skip


def synthetic_batches(steps: int, batch: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 4, generator=g)
    for _ in range(steps):
        x = torch.randn(batch, 10, generator=g)
        y = (x @ w).argmax(dim=1)
        yield x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = make_model().to(args.device)
    groups = param_groups_no_decay(model, weight_decay=5e-4, rho=args.rho)
    opt = SAM(groups, torch.optim.SGD, model=model, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    net = torch.compile(model) if args.compile else model
    scaler = torch.amp.GradScaler(args.device, enabled=args.amp == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)

    def loss_of(mb):
        ctx = torch.autocast(args.device, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            return nn.functional.cross_entropy(net(mb[0]), mb[1])

    losses = []
    for x, y in synthetic_batches(args.steps, args.batch, args.device):
        micro = list(zip(x.chunk(args.accum), y.chunk(args.accum)))
        closure = accumulate_closure(loss_of, micro, scaler=scaler)  # forward + backward
        opt.zero_grad()
        loss = opt.step(closure, scaler=scaler)  # L(w); the step is skipped on inf/NaN
        scaler.update()  # no-op when the scaler is disabled
        sched.step()
        losses.append(float(loss))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; skipped steps: {opt.skipped_steps}")
    return losses


if __name__ == "__main__":
    main()
