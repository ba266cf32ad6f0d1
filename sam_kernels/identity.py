"""Identity checks over Python containers: "is this still the very object the plan holds?".

The step plans (``python_api/_plans.py``, ``python_api/_step_plan.py``) check before each half
of a step that the optimizer's state still holds the tensors and dicts they were built on (a
user's edit, a ``load_state_dict`` or a reset of a parameter's state must not leave a plan
writing into tensors the optimizer no longer holds): about 800 pointer compares per step over
ResNet-50's 161 parameters. In Python that took ~35 us of a ~0.19 ms step, so the loops are in
C (``csrc/py_identity.cpp``, the module ``sam_kernels._identity``, built with the extension).
Without it, or for containers of another kind than it reads, the Python versions below give
the result; they define it. Under ``torch.compile`` tracing the Python versions run too
(dynamo reads identity on the objects it tracks; a C builtin would break its graph).

Every function compares by identity only (``is``), never by ``==``: a tensor's ``__eq__`` is
element-wise, and two equal-valued tensors are still two tensors.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from itertools import chain, repeat

import torch

try:  # built by setup.py next to the op library; absent in a tree built without it
    from sam_kernels import _identity as _c
except ImportError:
    _c = None


_tracing = torch.compiler.is_compiling


def _py_same_values(mapping: Mapping, held: Sequence) -> bool:
    return len(mapping) == len(held) and all(map(operator.is_, mapping.values(), held))


def _py_same_entries(dicts: Sequence[dict], keys: str | Sequence[str], values: Sequence) -> bool:
    ks = repeat(keys) if isinstance(keys, str) else keys
    return len(dicts) == len(values) and all(map(operator.is_, map(dict.get, dicts, ks), values))


def _py_same_group_params(groups: Sequence[dict], watch: Sequence) -> bool:
    ps = list(chain.from_iterable(g["params"] for g in groups))
    return len(ps) == len(watch) and all(map(operator.is_, ps, watch))


def same_values(mapping: Mapping, held: Sequence) -> bool:
    """``mapping``'s values are exactly the objects of ``held``, in order (none replaced,
    deleted or added)."""
    if _c is not None and not _tracing():
        r = _c.same_values(mapping, held)
        if r is not None:
            return r
    return _py_same_values(mapping, held)


def same_entries(dicts: Sequence[dict], keys: str | Sequence[str], values: Sequence) -> bool:
    """``dicts[i].get(keys[i]) is values[i]`` for every ``i`` (``keys`` one key for all, or
    one per dict); a missing key reads as None, as ``dict.get`` does."""
    if _c is not None and not _tracing():
        r = _c.same_entries(dicts, keys, values)
        if r is not None:
            return r
    return _py_same_entries(dicts, keys, values)


def same_group_params(groups: Sequence[dict], watch: Sequence) -> bool:
    """The ``"params"`` lists of ``groups``, one after another, are exactly ``watch``."""
    if _c is not None and not _tracing():
        r = _c.same_group_params(groups, watch)
        if r is not None:
            return r
    return _py_same_group_params(groups, watch)


def compiled() -> bool:
    """Whether the C loops are loaded (else every check runs as Python)."""
    return _c is not None


__all__ = ["compiled", "same_entries", "same_group_params", "same_values"]
