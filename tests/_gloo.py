"""Two gloo processes on the CPU (127.0.0.1 only), shared by the distributed tests.

A test module runs itself as a script in each worker (``python tests/<folder>/test_x.py
--worker RANK PORT OUT``, with the repository and tests/ on ``PYTHONPATH``); each worker runs
the module's scenarios in order and saves their results, so one launch serves every test of the
module. A scenario that raises records its traceback (the tests fail with it) and the others
still run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

HELPERS = Path(__file__).resolve().parent  # tests/: the shared helper modules
ROOT = HELPERS.parent
WORLD = 2


def is_worker_call(argv: list[str]) -> bool:
    """``argv`` is a worker's command line (see :func:`launch`)."""
    return len(argv) == 5 and argv[1] == "--worker"


def worker_main(argv: list[str], scenarios: dict[str, Callable[[int], object]]) -> None:
    """Run every scenario on this rank, then save ``{name: result}`` as ``rank<r>.pt``."""
    import torch.distributed as dist

    rank, port, out_dir = int(argv[2]), int(argv[3]), argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    results = {}
    for name, fn in scenarios.items():
        try:
            results[name] = fn(rank)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, out: Path, timeout_s: float = 240.0) -> list[dict]:
    """Run ``script`` as :data:`WORLD` gloo workers; the per-rank results (or a test failure).

    Skips when torch.distributed with gloo is not available. A port taken between probe and
    bind is retried once with another.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    env = dict(os.environ)
    # the repository (python_api, sam_kernels) and tests/ (the helpers the script imports)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HELPERS), env.get("PYTHONPATH", "")])
    env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    env["OMP_NUM_THREADS"] = "1"
    last = ""
    for _ in range(2):
        port = _free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, script, "--worker", str(r), str(port), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(WORLD)
        ]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout_s)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail(f"the {WORLD}-process gloo run timed out (a rank waits for another)")
        files = [out / f"rank{r}.pt" for r in range(WORLD)]
        if all(f.exists() for f in files):
            return [torch.load(f, weights_only=False) for f in files]
        last = "\n".join(logs)
    pytest.fail(f"the {WORLD}-process gloo run failed:\n{last[-4000:]}")


def results_of(results: list[dict], name: str) -> list[dict]:
    """Scenario ``name``'s result on every rank; fails the test with a rank's traceback."""
    out = []
    for r in results:
        res = r[name]
        if "error" in res:
            pytest.fail(f"scenario {name} failed on a rank:\n{res['error']}")
        out.append(res)
    return out
