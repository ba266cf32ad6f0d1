"""Test configuration shared by every test module (tests/ops, tests/optim, tests/integration).

The shared helper modules (``tests/_*.py``) are imported by name (``from _helpers import ...``)
from every folder: this directory is put on ``sys.path`` here, the one way they are found
(the gloo workers get it through ``PYTHONPATH``, see _gloo.py).

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, so it is set here, before
any kernel module is imported: without a GPU, Triton kernels run in the interpreter on CPU
tensors. With a GPU the same tests run on it unchanged.
"""

import os
import sys

HELPERS = os.path.dirname(os.path.abspath(__file__))
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The tests use tiny tensors: one intra-op thread avoids OpenMP barrier waits that made them
# ~10x slower on a busy 2-core machine.
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


# Fresh random inputs on every run, reproducible from the seed printed in the header:
# SAM_TEST_SEED=<n> pytest ... reruns a failure with the same inputs.
SESSION_SEED = int(os.environ.get("SAM_TEST_SEED", int.from_bytes(os.urandom(3), "little")))


def pytest_report_header(config):
    return f"sam-kernels test seed: SAM_TEST_SEED={SESSION_SEED}"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed the global generators per test from the session seed and the test's name."""
    import zlib

    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield
