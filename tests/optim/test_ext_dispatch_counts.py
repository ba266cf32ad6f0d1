"""Dispatched ops per step on the compiled extension (the CPU default) do not grow with the
number of parameter tensors (issue 14): GSAM's ``dot`` and R-SAM's ``filter_noise_perturb_``
are one extension op each, where their eager references dispatched ops per tensor.

Counted with the benchmark's own counter (``benchmarks.optimizer_step.dispatch_pair``: one step
after two warm-up steps, SGD base, 10 and 300 tensors of 8x8). R-SAM's delta is step-local
scratch, one ``empty_like`` per tensor on every backend (an allocation, no kernel: the
optimizer's choice, not the op's), so its count is compared without it.
"""

from __future__ import annotations

import pytest

import sam_kernels as sk

pytestmark = pytest.mark.skipif(
    not sk.available("ext", "cpu"), reason="the compiled extension is not built"
)

#: per-tensor allocations of step-local scratch (no kernel), left out of R-SAM's comparison
SCRATCH = {"empty_like": 1}


def _pair(name):
    from benchmarks.optimizer_step import dispatch_pair

    return dispatch_pair(name, "ext", "SGD")


def test_gsam_ops_per_step_do_not_grow():
    got = _pair("GSAM")
    assert not got["grows"], got["growing_ops"]
    assert got["ops_10"] == got["ops_300"]


def test_rsam_ops_per_step_do_not_grow_but_for_its_scratch():
    got = _pair("R-SAM")
    # the only op that grows is the delta scratch's allocation, one per tensor
    assert set(got["growing_ops"]) <= set(SCRATCH), got["growing_ops"]
    for op, per_tensor in SCRATCH.items():
        small, large = got["growing_ops"].get(op, [0, 0])
        assert large - small == per_tensor * (300 - 10), (op, small, large)
    grown = sum(large - small for small, large in got["growing_ops"].values())
    assert got["ops_300"] - grown == got["ops_10"]
    # and no per-tensor norm or scaling is left (the eager reference's ops)
    assert "linalg_vector_norm" not in got["growing_ops"]
