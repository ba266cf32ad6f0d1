"""DistributedDataParallel with SAM: global or per-replica (m-sharpness) perturbation.

    torchrun --nproc-per-node 8 examples/ddp_sam.py --mode per_replica      (GPUs, NCCL)
    python examples/ddp_sam.py --nprocs 2 --mode global                     (CPU, gloo)

``--mode global``: plain DDP; every backward all-reduces, so the step equals single-process SAM
on the whole global batch. ``--mode per_replica``: the first pass (forward and backward) runs
under ``model.no_sync()`` and each replica perturbs with its own gradient; the second pass
all-reduces. ``SAMDDPStep`` does both and makes every replica agree on non-finite skips. Use
``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` if the global mode must see whole-batch BN
statistics.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from python_api import SAM  # noqa: E402
from python_api.distributed import SAMDDPStep  # noqa: E402


def make_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Forward through the DDP wrapper and backward at the current weights; returns the loss."""

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def train(rank: int, world: int, args: argparse.Namespace) -> list[float]:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    torch.manual_seed(0)  # the same initial weights on every replica (DDP also broadcasts)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    model = DDP(model, device_ids=[device.index] if cuda else None)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=args.rho)
    step = SAMDDPStep(model, opt, mode=args.mode)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 4, generator=g)
    losses = []
    for _ in range(args.steps):
        x = torch.randn(args.batch * world, 10, generator=g)  # the global batch ...
        y = (x @ w).argmax(dim=1)
        x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)  # ... its shard
        loss = step(make_closure(model, x, y))  # zero_grad + SAM step in the chosen mode
        losses.append(float(loss))
    if rank == 0:
        print(f"{args.mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f} (rank 0's shard)")
    return losses


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        train(rank, world, args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["global", "per_replica"], default="global")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="per replica")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--nprocs", type=int, default=2, help="CPU processes when not under torchrun")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() and not args.cpu else "gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    args.cpu = True
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.nprocs, port, args), nprocs=args.nprocs)


if __name__ == "__main__":
    main()
