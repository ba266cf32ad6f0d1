"""Sharded parameters (FSDP2 ``fully_shard``): SAM on local shards, with a global norm.

Under FSDP2 every rank holds one shard of each parameter (a ``DTensor`` whose local tensor
is a slice of the flat storage) and, after the backward, the reduce-scattered (averaged) shard
of its gradient. SAM needs only elementwise work plus one global reduction, so it runs on the
local shards with no all-gather:

.. code-block:: text

    ||g||^2 = sum_r sum_i ||g_(i,r)||^2           (g_(i,r): rank r's shard of tensor i)
    n       = sqrt(all_reduce_sum(sum_i ||g_(i,r)||^2))      -> sharded_grad_norm
    e_(i,r) = rho / (n + 1e-12) * T(p_(i,r))^2 * g_(i,r)     (local; ASAM's T = |p| + eta)
    backup, perturb, restore, base step: on the local shards (exact copies, no gather)

This is the global step of :mod:`python_api.distributed` (FSDP averages the gradients over
the ranks), so it equals single-process training on the whole batch.

Usage::

    for layer in net.layers:
        fully_shard(layer)
    fully_shard(net)
    shards = LocalShards(net)                       # plain tensors sharing the shards' storage
    opt = SAM(shards.param_groups(), torch.optim.SGD, lr=0.1, momentum=0.9)
    step = FSDP2SAMStep(net, opt, shards)
    for x, y in loader:
        def closure():
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss
        loss = step(closure)

``shards.param_groups(groups)`` maps parameter groups written over the model's parameters
(e.g. :func:`python_api.recipes.param_groups_no_decay`) onto the local shards. The optimizer's
state (momentum, Adam moments) is sharded like the parameters; a checkpoint holds this rank's
shard (save one per rank).

Defined for algorithms whose only cross-tensor reduction is the global gradient norm and
whose other scalars are averaged losses or the same on every rank (``sharded_safe``: SAM,
ASAM, CR-SAM, AE-SAM, SS-SAM); :class:`FSDP2SAMStep` refuses the others with the reason:
per-tensor inner products (LookSAM, AE-LookSAM), noise drawn per element (Frob/Trace/Det-SAM:
each shard would draw its own stream, not one draw over the whole parameter), backward passes
run inside the step (ESAM). FSDP1 is not supported (use FSDP2 ``fully_shard``); per-replica
(m-sharpness) perturbation is not defined for sharded gradients, which exist only after the
reduce-scatter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import sam_kernels as sk
from python_api._base import SAMFamily
from python_api._hooks import StepHooks, _all_reduce_min, _distributed, installed

__all__ = ["FSDP2SAMStep", "LocalShards", "sharded_grad_norm"]


def sharded_grad_norm(
    grads: list[torch.Tensor],
    params: list[torch.Tensor] | None = None,
    *,
    eta: float = 0.0,
    group: Any = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Global L2 norm of gradients sharded over a process group.

    ``n = sqrt(all_reduce_sum(sum_i ||T_i * g_i||^2))`` with ``T_i = |p_i| + eta`` when
    ``params`` is given (ASAM), else 1. ``grads`` are this rank's shards (plain tensors or
    ``DTensor``s, whose local shards are used). One scalar all-reduce in fp32 (fp64 for fp64
    gradients), no host read; without an initialized process group it is the local norm.
    Every rank of the group must call it (a rank with no shard passes an empty list).
    """
    grads = [_local(g) for g in grads]
    if params is not None:
        params = [_local(p) for p in params]
    if grads:
        n = sk.grad_norm(grads, params, eta=eta, backend=backend)
    else:
        n = torch.zeros((), dtype=torch.float32)
    return _all_reduce_norm(n, group)


def _all_reduce_norm(n: torch.Tensor, group: Any) -> torch.Tensor:
    if not _distributed():
        return n
    import torch.distributed as dist

    sq = n.double() ** 2  # fp64: a squared norm above 3.4e38 must not overflow
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return sq.sqrt().to(n.dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    if to_local is None:
        return t
    with torch.no_grad():
        return to_local()


class LocalShards:
    """The local shards of a sharded model's parameters as plain tensors (shared storage).

    ``shards[p]`` (``p`` a model parameter) is a ``nn.Parameter`` (``requires_grad=False``)
    viewing the same memory as ``p``'s local shard: in-place updates by the optimizer are the
    updates of the sharded parameter, with no copy and no gather. Plain (unsharded) parameters
    map to themselves.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._by_id: dict[int, torch.Tensor] = {}
        for p in model.parameters():
            if not p.requires_grad:
                continue
            loc = _local(p)
            if loc is not p:
                loc = nn.Parameter(loc, requires_grad=False)
            self._pairs.append((p, loc))
            self._by_id[id(p)] = loc

    def __getitem__(self, p: torch.Tensor) -> torch.Tensor:
        return self._by_id[id(p)]

    def param_groups(self, groups: list[dict] | None = None) -> list[dict]:
        """Parameter groups over the local shards (default: one group of every shard)."""
        if groups is None:
            return [{"params": [loc for _, loc in self._pairs]}]
        out = []
        for g in groups:
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            out.append({**g, "params": [self[p] for p in ps]})
        return out

    @torch.no_grad()
    def move_grads(self) -> None:
        """``shard.grad = p.grad``'s local shard; ``p.grad = None`` (the next pass starts clean)."""
        for p, loc in self._pairs:
            if loc is p:
                continue
            g = p.grad
            if g is None:
                loc.grad = None
                continue
            gl = _local(g)
            if loc.grad is not None and loc.grad is not gl:
                loc.grad.add_(gl)  # accumulation across evaluations the caller asked for
            else:
                loc.grad = gl
            p.grad = None

    def zero_grad(self) -> None:
        for p, loc in self._pairs:
            p.grad = None
            loc.grad = None


class _ShardHook(StepHooks):
    """Installed as ``opt._dist`` for one step: global norm and the skip vote over the group."""

    #: the optimizer holds shards: a global scalar must come from :meth:`reduce_norm`
    sharded = True
    spans_ranks = True

    def __init__(self, group: Any) -> None:
        self.group = group

    def reduce_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return _all_reduce_norm(norm, self.group)

    def vote(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce_min(x, self.group) if _distributed() else x

    gate = vote  # the skip vote: a rank never steps while another skips


class FSDP2SAMStep:
    """One SAM step over an FSDP2 (``fully_shard``) model, on the local shards.

    Args:
        model: the sharded model the closure runs.
        optimizer: a SAM-family optimizer built over ``shards.param_groups(...)``.
        shards: the :class:`LocalShards` of ``model``.
        process_group: the group the parameters are sharded over (default group if None).

    ``step(closure, **kw)`` clears the gradients, runs ``optimizer.step`` with each closure
    evaluation followed by moving the sharded gradients onto the local shards, the norm
    all-reduced over the group and the skip decision agreed by every rank.
    """

    def __init__(
        self, model: nn.Module, optimizer: Any, shards: LocalShards, *, process_group: Any = None
    ) -> None:
        if not isinstance(optimizer, SAMFamily):
            raise TypeError(f"optimizer must be a SAMFamily optimizer, got {type(optimizer)}")
        if not optimizer.sharded_safe:
            name = type(optimizer).__name__
            raise ValueError(
                f"{name} is not supported on FSDP2 local shards: {optimizer._sharded_refusal}. "
                "Supported there: SAM, ASAM, CRSAM, AESAM, SSSAM"
            )
        mine = {id(loc) for _, loc in shards._pairs}
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in mine:
                    raise ValueError(
                        "the optimizer must be built over shards.param_groups(...) (the local "
                        "shards), not over the model's sharded parameters"
                    )
        self.model, self.optimizer, self.shards = model, optimizer, shards
        self._hook = _ShardHook(process_group)

    def __call__(self, closure: Any, **step_kwargs: Any) -> Any:
        opt = self.optimizer
        if opt._dist is not None:
            raise RuntimeError("a distributed step helper is already running on this optimizer")
        self.shards.zero_grad()

        def local_closure():
            loss = closure()
            self.shards.move_grads()
            return loss

        with installed(opt, "_dist", self._hook):
            return opt.step(local_closure, **step_kwargs)
