"""The step plans' identity checks (sam_kernels/identity.py, csrc/py_identity.cpp).

The C loops and the Python versions give the same answer on every case, the answer the plans
need: identity, never equality (two equal-valued tensors are two tensors), and a length change
is a change. Where the C module is not built, the Python cases still run.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import pytest
import torch

from sam_kernels import identity

IMPLS = ["python"] + (["c"] if identity.compiled() else [])


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(identity, "_c", None)
    else:
        assert identity._c is not None
    return request.param


def _tensors(n):
    return [torch.full((2,), float(i)) for i in range(n)]


def test_the_c_module_is_built_with_the_extension():
    # setup.py builds it with the op library: where one is there, so is the other
    from sam_kernels import step_plan

    if step_plan.available("cpu"):
        assert identity.compiled()


@pytest.mark.parametrize("n", [0, 1, 7])
def test_same_values(impl, n):
    ts = _tensors(n)
    for kind in (dict, OrderedDict, lambda items: defaultdict(dict, items)):
        m = kind({i: t for i, t in enumerate(ts)})
        assert identity.same_values(m, list(ts)) is True
        if n:
            # equal values, another tensor: a change
            other = list(ts)
            other[-1] = ts[-1].clone()
            assert identity.same_values(m, other) is False
            m2 = kind({i: t for i, t in enumerate(ts)})
            m2[0] = ts[0].clone()
            assert identity.same_values(m2, list(ts)) is False
            # order matters: the held list is in insertion order
            if n > 1:
                assert identity.same_values(m, list(reversed(ts))) is False
        # a value added or removed
        assert identity.same_values(m, list(ts) + [torch.zeros(1)]) is False
        if n:
            assert identity.same_values(m, list(ts)[:-1]) is False


def test_same_values_follows_the_mappings_own_order(impl):
    # an OrderedDict reordered in place: its values() order, not its storage's
    ts = _tensors(3)
    m = OrderedDict((i, t) for i, t in enumerate(ts))
    m.move_to_end(0)
    assert identity.same_values(m, [ts[1], ts[2], ts[0]]) is True
    assert identity.same_values(m, list(ts)) is False


def test_same_values_other_kinds_fall_back(impl):
    ts = _tensors(3)
    m = {i: t for i, t in enumerate(ts)}
    assert identity.same_values(m, tuple(ts)) is True  # a tuple held: the Python version
    assert identity.same_values(m, tuple(ts[:2])) is False


@pytest.mark.parametrize("n", [0, 1, 5])
def test_same_entries(impl, n):
    ts = _tensors(n)
    dicts = [{"momentum_buffer": t, "step": torch.tensor(1.0)} for t in ts]
    keys = ["momentum_buffer"] * n
    assert identity.same_entries(dicts, keys, list(ts)) is True
    assert identity.same_entries(dicts, "momentum_buffer", list(ts)) is True
    if n:
        dicts[-1]["momentum_buffer"] = ts[-1].clone()  # the same values, another tensor
        assert identity.same_entries(dicts, keys, list(ts)) is False
        assert identity.same_entries(dicts, "momentum_buffer", list(ts)) is False
        del dicts[-1]["momentum_buffer"]  # missing reads as None
        assert identity.same_entries(dicts, keys, list(ts)) is False
        assert identity.same_entries(dicts, keys, list(ts)[:-1] + [None]) is True
        # one key per dict
        mixed = [{"a": ts[0]}, {"b": ts[0]}]
        assert identity.same_entries(mixed, ["a", "b"], [ts[0], ts[0]]) is True
        assert identity.same_entries(mixed, ["a", "a"], [ts[0], ts[0]]) is False


def test_same_entries_keys_as_a_tuple(impl):
    # one key per dict, as a list would be (the C loop leaves a tuple to the Python version)
    a, b = torch.zeros(1), torch.ones(1)
    dicts = [{"x": a}, {"y": b}]
    assert identity.same_entries(dicts, ("x", "y"), [a, b]) is True
    assert identity.same_entries(dicts, ("y", "x"), [a, b]) is False


def test_same_entries_unhashable_key_raises(impl):
    with pytest.raises(TypeError):
        identity.same_entries([{"a": 1}], [["a"]], [1])


def test_same_group_params(impl):
    ps = _tensors(5)
    groups = [{"params": ps[:2]}, {"params": ps[2:]}, {"params": []}]
    assert identity.same_group_params(groups, list(ps)) is True
    assert identity.same_group_params(groups, list(ps)[:-1]) is False
    assert identity.same_group_params(groups, list(ps) + [ps[0]]) is False
    swapped = [{"params": ps[2:]}, {"params": ps[:2]}]
    assert identity.same_group_params(swapped, list(ps)) is False
    groups[1]["params"][0] = ps[2].clone()
    assert identity.same_group_params(groups, list(ps)) is False
    assert identity.same_group_params([], []) is True
    # a tuple of parameters in a group: the Python version reads it
    assert identity.same_group_params([{"params": tuple(ps)}], list(ps)) is True
