"""The constants and small helpers of the optimizer's ``state_dict`` format (described in
:mod:`python_api._state`): the key and version of the algorithm's scalars, the fused bases'
state and group keys, :class:`StateDictError`, parameter numbering and the hook tables.

Separate because saving (:mod:`python_api._state`), validated loading
(:mod:`python_api._state_load`) and the sharded checkpoint (:mod:`python_api._sharded_checkpoint`)
all read them; this module imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch

#: key of the algorithm's scalars in ``param_groups[0]``
FORMAT_KEY = "sam_state"
#: version of the format (0: the release that wrote ``{"sam", "base", "extra"}``)
FORMAT_VERSION = 1

#: per-parameter state keys of the bases whose step the wrapper runs itself; ``shaped``: the
#: ones shaped like the parameter
_BASE_STATE = {
    "sgd": {"momentum_buffer", "step"},
    "adamw": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
}
_SHAPED = {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
#: hyper-parameters the fused base steps read (a dict without them is another base's)
_BASE_GROUP_KEYS = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
}
_BASE_NAME = {"sgd": "torch.optim.SGD", "adamw": "torch.optim.AdamW"}


class StateDictError(ValueError):
    """A ``state_dict`` that does not fit this optimizer (nothing was changed)."""


def class_name(opt: Any) -> str:
    return type(opt).__qualname__


def _param_order(groups: list[dict]) -> list[torch.Tensor]:
    return list(chain.from_iterable(g["params"] for g in groups))


def _param_index(groups: list[dict]) -> dict[int, int]:
    """``id(p) -> index`` exactly as ``torch.optim.Optimizer.state_dict`` numbers them."""
    index: dict[int, int] = {}
    start = 0
    for g in groups:
        for i, p in enumerate(g["params"], start):
            index.setdefault(id(p), i)
        start += len(g["params"])
    return index


def _hooks(opt: Any, name: str) -> list[Callable]:
    return list(opt.__dict__.get(name, {}).values())
