"""``torch.distributed.checkpoint`` of an optimizer over FSDP2 local shards
(:class:`python_api.LocalShards`): a module view of the local-shard parameters under the sharded
model's names, which DCP maps the optimizer's state by (the format is ``python_api._state``'s).
"""

from __future__ import annotations

from typing import Any

import torch

from python_api._state_format import _SHAPED, _param_order


class _ShardView(torch.nn.Module):
    """A module whose parameters are the optimizer's local-shard parameters, under the
    sharded model's names (what ``torch.distributed.checkpoint`` maps state by)."""


def _view_module(shards: Any) -> tuple[torch.nn.Module, dict[int, torch.Tensor]]:
    root = _ShardView()
    dtensor_of: dict[int, torch.Tensor] = {}
    for fqn, p in shards.model.named_parameters():
        if not p.requires_grad:
            continue
        loc = shards[p]
        mod = root
        *path, leaf = fqn.split(".")
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, _ShardView())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, loc)
        if loc is not p:
            dtensor_of[id(loc)] = p
    return root, dtensor_of


class sharded_checkpoint:  # noqa: N801 - used as a context manager, like torch's helpers
    """``torch.distributed.checkpoint`` for an optimizer built over FSDP2 local shards.

    The optimizer steps plain tensors that view the local shards
    (:class:`python_api.sharded.LocalShards`), which DCP cannot map to the model's names, and
    a plain per-rank tensor would be saved once for all ranks. Inside the context, ``module``
    holds the shards under the model's names, and the optimizer's ``state_dict`` gives its
    per-parameter tensors as ``DTensor``s placed like their parameters (so ``dcp.save`` writes
    every rank's shard and ``dcp.load`` reshards); ``load_state_dict`` takes them back::

        with sharded_checkpoint(shards, opt) as view:
            osd = get_optimizer_state_dict(view, opt)
            dcp.save({"optim": osd}, checkpoint_id=path)
        ...
        with sharded_checkpoint(shards, opt) as view:
            osd = get_optimizer_state_dict(view, opt)   # the template (DCP creates state)
            dcp.load({"optim": osd}, checkpoint_id=path)
            set_optimizer_state_dict(view, opt, osd)
    """

    def __init__(self, shards: Any, opt: Any) -> None:
        self.shards, self.opt = shards, opt
        self.module, self._dtensor_of = _view_module(shards)

    def __enter__(self) -> torch.nn.Module:
        from torch.distributed.tensor import DTensor

        opt, of = self.opt, self._dtensor_of
        params = _param_order(opt.param_groups)
        shaped = _SHAPED | set(type(opt)._param_state_keys)

        def to_dtensor(_opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
            index = {i: p for i, p in enumerate(params)}
            for i, st in sd["state"].items():
                p = index.get(i)
                d = of.get(id(p)) if p is not None else None
                if d is None:
                    continue
                for k, v in list(st.items()):
                    if k in shaped and isinstance(v, torch.Tensor) and v.shape == p.shape:
                        st[k] = DTensor.from_local(
                            v,
                            d.device_mesh,
                            d.placements,
                            run_check=False,
                            shape=d.shape,
                            stride=d.stride(),
                        )
            return sd

        def to_local(_opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
            sd = dict(sd)
            sd["state"] = {
                i: {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in st.items()}
                for i, st in sd["state"].items()
            }
            return sd

        # the shards train (DCP keeps state only of parameters that require grad)
        self._flags = [(p, p.requires_grad) for p in params]
        for p, _ in self._flags:
            p.requires_grad_(True)
        self._handles = [
            opt.register_state_dict_post_hook(to_dtensor),
            opt.register_load_state_dict_pre_hook(to_local),
        ]
        return self.module

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        for p, flag in self._flags:
            p.requires_grad_(flag)
            p.grad = None
