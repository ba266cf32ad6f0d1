"""What the gloo tests (test_ddp, test_clipping_dist, test_gsam_ddp) share, in the workers and
in the single-process references they are compared with: the small model, its two groups, the
batches and each rank's shard, the optimizer-table classes built over them, an FSDP2-sharded
model, SAM under ``SAMDDPStep``, and the per-replica gradients of m-sharpness by hand. Also the
in-process one-rank group whose all-reduces the CR-SAM and Frob/Trace/Det-SAM tests count."""

from __future__ import annotations

import contextlib

import torch
from _gloo import WORLD
from _models import loss_fn
from torch import nn

HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RHOS = (0.05, 0.1)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def groups(model: nn.Module, rhos=RHOS) -> list[dict]:
    return [
        {"params": list(model[0].parameters()), "rho": rhos[0]},
        {"params": list(model[2].parameters()), "rho": rhos[1]},
    ]


def batch(step: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def shard(x, y, rank: int):
    k = x.shape[0] // WORLD
    return x[rank * k : (rank + 1) * k], y[rank * k : (rank + 1) * k]


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------- the optimizer table
def table_opt(name, params, base=torch.optim.SGD, **extra):
    """The optimizer-table class ``name`` (tests/_optim_table.py) over ``base``, with the
    table's test arguments, :data:`HP` and ``extra``."""
    from _optim_table import SPECS, opt_class

    return opt_class(name)(params, base, **{**SPECS[name][2], **HP, **extra})


def table_closure(name, model, x, y, hook=None):
    """The closure the table class ``name`` expects."""
    from _optim_table import make_closure

    return make_closure(name, model, x, y, hook)


# ----------------------------------------------------------------- in the workers
def fsdp2_model(mesh) -> nn.Module:
    """:func:`make_model` with both linear layers and the whole model under ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def ddp_sam(mode: str, **extra):
    """``(DDP model, SAM over its groups with HP and extra, SAMDDPStep in mode)``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from python_api import SAM
    from python_api.distributed import SAMDDPStep

    model = DDP(make_model())
    opt = SAM(groups(model.module), torch.optim.SGD, **HP, **extra)
    return model, opt, SAMDDPStep(model, opt, mode=mode)


# ----------------------------------------------------------------- single-process references
def m_sharpness_grads(model, params, x, y, rho_of) -> list[torch.Tensor]:
    """m-sharpness by hand: each rank's shard ascends by its own gradient (``rho_of``: per
    parameter), the gradients at the ``WORLD`` perturbed points summed (weights restored)."""
    w = [p.detach().clone() for p in params]
    g_sum = [torch.zeros_like(p) for p in params]
    for r in range(WORLD):
        xr, yr = shard(x, y, r)
        g0 = torch.autograd.grad(loss_fn(model, xr, yr), params)
        norm = torch.sqrt(sum((g * g).sum() for g in g0))
        with torch.no_grad():
            for p, wi, gi, rho in zip(params, w, g0, rho_of):
                p.copy_(wi + rho / (norm + 1e-12) * gi)
        g1 = torch.autograd.grad(loss_fn(model, xr, yr), params)
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
        g_sum = [a + b for a, b in zip(g_sum, g1)]
    return g_sum


# ----------------------------------------------------------------- in process
@contextlib.contextmanager
def all_reduces_counted(distributed: bool):
    """The tensors given to ``torch.distributed.all_reduce`` inside (the yielded list);
    ``distributed``: inside a one-rank gloo process group (in process, on a HashStore)."""
    import torch.distributed as dist

    if distributed:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    real = dist.all_reduce
    calls = []
    dist.all_reduce = lambda t, **kw: (calls.append(t), real(t, **kw))[1]
    try:
        yield calls
    finally:
        dist.all_reduce = real
        if distributed:
            dist.destroy_process_group()
