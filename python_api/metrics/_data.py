"""What the metrics accept as data, and the handling of one batch.

``data`` is one ``(inputs, targets)`` pair or an iterable of them; inputs and targets may be
nested tuples, lists or mappings of tensors. These helpers tell the two forms apart, find the
batch size, move a batch to the computation's device and cut a batch into single examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

LossFn = Callable[[Any, Any], Tensor]
Batch = tuple[Any, Any]
Data = Batch | Iterable[Batch]
DeviceLike = torch.device | str | None


def is_single_batch(data: Any) -> bool:
    """One ``(inputs, targets)`` pair (targets a tensor), as opposed to an iterable of pairs."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor in a nested tuple/list/mapping; other leaves kept."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for v in obj:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def batch_size(inputs: Any, targets: Any) -> int:
    """Leading dimension of the first tensor of the targets, else of the inputs."""
    for t in (_first_tensor(targets), _first_tensor(inputs)):
        if t is not None and t.dim() >= 1:
            return int(t.shape[0])
    raise ValueError("data: cannot tell the batch size (no tensor with a batch dimension)")


def examples(batches: Iterable[tuple[Any, Any, int]]) -> Iterator[tuple[Any, Any]]:
    """Each example of each ``(inputs, targets, n)`` batch as a batch of one, in data order.

    Lazy on purpose: a consumer that stops early pulls no further batch, so a shuffling loader
    or dropout draws exactly the random numbers of the examples that were measured.
    """
    for inputs, targets, n in batches:
        for i in range(n):
            pick = lambda t, i=i: t[i : i + 1]
            yield map_tensors(inputs, pick), map_tensors(targets, pick)
