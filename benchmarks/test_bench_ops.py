"""pytest-benchmark view of the op microbenchmarks (not part of the normal test run).

    python -m pytest benchmarks/ --benchmark-only                # CUDA if present, else CPU
    python -m pytest benchmarks/ --benchmark-only -k sgd_step --benchmark-columns=median

On CUDA the tensor list is ResNet-50's (161 tensors, 25.6M parameters), on the CPU the tiny
10-tensor list. Each round synchronises the device; ``extra_info`` holds the bytes the op moves by
definition and the GB/s at the median. ``python -m benchmarks.run`` is the reference run (CUDA
events, L2 flush, input rotation, copy-bandwidth baseline); this file is for quick A/B checks.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks.common import implemented
from benchmarks.ops import DTYPES, LOOP, OPS, SPEC, fused_call, make_inputs
from benchmarks.shapes import model_shapes, numel, shape_sets

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PROVIDERS = ("loop", "eager", "triton", "ext")


def _shapes():
    if CUDA:
        return model_shapes("resnet50")[0]
    return shape_sets(smoke=True, quick=False)["tiny10"][0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", [s.name for s in OPS])
def test_op(benchmark, op: str, provider: str, dtype: str) -> None:
    import sam_kernels as sk

    spec = SPEC[op]
    if provider in ("triton", "ext"):
        if not sk.available(provider, DEVICE):
            pytest.skip(f"{provider} backend unavailable on {DEVICE}")
        if not implemented(spec.registry, provider):
            pytest.skip(f"{provider} backend has no {spec.registry}")
    if not CUDA and dtype == "bf16":
        pytest.skip("bf16 timings on the CPU say nothing")
    shapes = _shapes()
    sets = [make_inputs(op, shapes, DTYPES[dtype], DEVICE) for _ in range(2)]
    turn = itertools.cycle(sets)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    fn = LOOP[op] if provider == "loop" else (lambda d: fused_call(op, d, provider))

    def run() -> None:
        fn(next(turn))
        sync()

    run()  # compilation, first allocations
    benchmark.pedantic(run, rounds=20 if CUDA else 10, warmup_rounds=3, iterations=1)
    nbytes = spec.elems * (torch.finfo(DTYPES[dtype]).bits // 8) * numel(shapes)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {"bytes": nbytes, "gbps": nbytes / median / 1e9, "io": spec.io, "device": str(DEVICE)}
    )
