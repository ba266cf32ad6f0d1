"""The per-tensor bookkeeping ops (issue 14): ``empty_like_list`` allocates what
``torch.empty_like(preserve_format)`` does, ``zero_unless_`` writes what ``sanitize_`` does (bit
for bit), on every backend here, over channels-last, transposed, non-contiguous and bf16
tensors; each is one dispatched op per list on the extension."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import DispatchedOps

import sam_kernels as sk


def _backends() -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [b for b in ("eager", "ext") if sk.available(b, "cpu")]


def _tensors() -> list[torch.Tensor]:
    torch.manual_seed(0)
    nan_inf = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1.5])
    return [
        torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
        torch.randn(6, 5).t(),  # transposed (dense, permuted)
        torch.randn(5, 12)[:, ::2],  # not dense
        torch.randn(7, dtype=torch.bfloat16),
        torch.randn(0),
        nan_inf,
    ]


@pytest.mark.parametrize("backend", _backends())
def test_empty_like_list_allocates_like_empty_like(backend):
    ts = _tensors()
    out = sk.empty_like_list(ts, backend=backend)
    ref = [torch.empty_like(t, memory_format=torch.preserve_format) for t in ts]
    assert [(o.shape, o.stride(), o.dtype) for o in out] == [
        (r.shape, r.stride(), r.dtype) for r in ref
    ]
    assert len({o.data_ptr() for o in out if o.numel()}) == sum(1 for o in out if o.numel())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("flag", [0.0, 1.0])
def test_zero_unless_is_sanitize_bit_for_bit(backend, flag):
    ok = torch.tensor(flag)
    ts, ref = _tensors(), _tensors()
    sk.zero_unless_(ts, ok, backend=backend)
    sk.sanitize_(ref, ok)
    for t, r in zip(ts, ref):
        assert torch.equal(t.contiguous().reshape(-1).view(torch.uint8),
                           r.contiguous().reshape(-1).view(torch.uint8))  # fmt: skip


@pytest.mark.skipif(not sk.available("ext", "cpu"), reason="the compiled extension is not built")
def test_one_op_per_list_on_the_extension():
    ts, ok = _tensors(), torch.tensor(0.0)
    with DispatchedOps() as seen:
        sk.empty_like_list(ts, backend="ext")
        sk.zero_unless_(ts, ok, backend="ext")
    assert len(seen.ops) == 2, seen.ops
