"""Dispatched ops per step on the compiled extension (the CPU default) do not grow with the
number of parameter tensors (issue 14): GSAM's ``dot`` and R-SAM's ``filter_noise_perturb_``
are one extension op each, where their eager references dispatched ops per tensor, and R-SAM's
step-local delta scratch is one ``empty_like_list``.

Counted with the benchmark's own counter (``benchmarks.optimizer_step.dispatch_pair``: one step
after two warm-up steps, SGD base, 10 and 300 tensors of 8x8).
"""

from __future__ import annotations

import pytest

import sam_kernels as sk

pytestmark = pytest.mark.skipif(
    not sk.available("ext", "cpu"), reason="the compiled extension is not built"
)


def _pair(name):
    from benchmarks.optimizer_step import dispatch_pair

    return dispatch_pair(name, "ext", "SGD")


@pytest.mark.parametrize("name", ["GSAM", "R-SAM"])
def test_ops_per_step_do_not_grow(name):
    got = _pair(name)
    assert not got["grows"], got["growing_ops"]
    assert got["ops_10"] == got["ops_300"]
