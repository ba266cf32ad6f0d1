"""The benchmark's smoke mode runs end to end (tiny sizes, CPU), so the scripts cannot rot.

Failures of individual benchmark items (a backend under construction) are recorded in
results.json and are not failures here: this test checks the machinery and the output files.
The report's GPU-only columns are exercised on synthetic results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNGS = ("ops_bandwidth.png", "optimizer_step.png", "training.png")


def _ok(row: dict) -> bool:
    return "error" not in row and "skipped" not in row


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict, float]:
    out = str(tmp_path_factory.mktemp("bench") / "results")
    env = dict(os.environ)
    env.pop("SAM_KERNELS_BACKEND", None)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", out],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=85,
    )
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as fh:
        results = json.load(fh)
    return out, results, wall


def test_smoke_files(smoke) -> None:
    out, results, wall = smoke
    files = sorted(os.listdir(out))
    assert {"results.json", "results.md", *PNGS} <= set(files), files
    assert len(files) <= 6
    assert sum(os.path.getsize(os.path.join(out, f)) for f in files) < 2 * 2**20
    for name in PNGS:
        with open(os.path.join(out, name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(os.path.join(out, "results.md")).read()
    for heading in ("# sam-kernels benchmark", "## Fused ops", "## Optimizer step",
                    "## Dispatched aten ops", "## Training step throughput"):  # fmt: skip
        assert heading in md
    assert wall < 85


def test_smoke_json_keys(smoke) -> None:
    _, r, _ = smoke
    for key in ("meta", "copy", "ops", "ops_summary", "optimizer_step", "dispatch_counts",
                "training", "failures", "skipped"):  # fmt: skip
        assert key in r, key
    meta = r["meta"]
    for key in ("device", "torch", "triton", "date", "elapsed_s", "sections", "config"):
        assert key in meta, key
    assert meta["config"]["smoke"] is True and meta["device_type"] == "cpu"
    assert all(s["status"].startswith("ok") for s in meta["sections"].values()), meta["sections"]
    copies = [c for c in r["copy"] if _ok(c)]
    assert copies and copies[0]["gbps"] > 0


def test_smoke_ops(smoke) -> None:
    _, r, _ = smoke
    # the loop references and the eager backend never fail (time-budget skips are allowed)
    rows = [x for x in r["ops"] if x["provider"] in ("loop", "eager")]
    assert rows
    assert not [x["key"] for x in rows if "error" in x]
    done = [x for x in rows if _ok(x)]
    assert done, "no op was timed"
    for x in done:
        assert x["median_ms"] > 0 and x["bytes"] > 0 and x["gbps"] > 0 and "pct_copy" in x
    ops = {x["op"] for x in done}
    assert {"grad_norm", "perturb", "sgd_step"} <= ops


def test_smoke_optimizer_and_dispatch(smoke) -> None:
    _, r, _ = smoke
    sam = [x for x in r["optimizer_step"] if x["optimizer"] == "SAM" and x["backend"] == "eager"]
    assert sam and _ok(sam[0]), sam
    assert sam[0]["step_ms"] > 0 and sam[0]["floor_bytes"] > 0
    disp = {(x["optimizer"], x["base"], x["backend"]): x for x in r["dispatch_counts"]}
    row = disp[("SAM", "SGD", "eager")]
    assert _ok(row), row
    # reported, not asserted equal: the lead reads the numbers in results.md
    assert isinstance(row["ops_10"], int) and isinstance(row["ops_300"], int)
    assert row["ops_10"] > 0 and "growing_ops" in row
    ref = disp[("SAM", "SGD", "davda54")]
    assert ref["ops_300"] > ref["ops_10"]  # the per-parameter loop does grow


def test_smoke_training(smoke) -> None:
    _, r, _ = smoke
    base = [x for x in r["training"] if x["optimizer"] == "base"]
    assert base and _ok(base[0]) and base[0]["img_per_s"] > 0
    sam = [x for x in r["training"] if x["optimizer"] == "SAM" and _ok(x)]
    assert sam and sam[0]["ratio_to_base"] > 0 and sam[0]["ideal_ratio"] == 2.0


def _synthetic_gpu_results() -> dict:
    """Results shaped like a GPU run: fused providers, floors, kernels, graphs, ratios."""
    ops = []
    for prov, ms in (("loop", 3.0), ("eager", 1.0), ("triton", 0.2), ("cuda", 0.25)):
        ops.append(
            {"key": f"sgd_step/resnet50/fp32/{prov}", "op": "sgd_step", "shape": "resnet50",
             "dtype": "fp32", "provider": prov, "median_ms": ms, "bytes": 5.1e8,
             "gbps": 5.1e8 / (ms * 1e-3) / 1e9}
        )  # fmt: skip
    ops.append(
        {"key": "restore/resnet50/fp32/cuda", "op": "restore", "shape": "resnet50",
         "dtype": "fp32", "provider": "cuda", "error": "RuntimeError: boom"}
    )  # fmt: skip
    return {
        "meta": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
                 "date": "2026-11-22", "elapsed_s": 300.0,
                 "sections": {"ops": {"status": "ok", "wall_s": 100, "restarts": 0}}},
        "copy": [{"key": "copy_bandwidth", "gbps": 3000.0, "median_ms": 0.7,
                  "tensor_bytes": 2**30}],
        "backends": [{"eager": {"available": True}, "triton": {"available": True},
                      "cuda": {"available": False, "why": "not built"}}],
        "ops": ops,
        "optimizer_step": [
            {"key": "s1", "shapes": "resnet50", "base": "SGD", "optimizer": "SAM",
             "backend": "triton", "step_ms": 0.5, "wall_median_ms": 0.6, "floor_ms": 0.4,
             "x_floor": 1.25, "kernels": 6, "host_syncs_per_step": 0.0, "item_calls": 0},
            {"key": "s2", "shapes": "resnet50", "base": "SGD", "optimizer": "AE-SAM",
             "backend": "eager", "step_ms": 2.0, "floor_ms": 0.3, "x_floor": 6.0,
             "sam_fraction": 0.4},
            {"key": "s3", "shapes": "resnet50", "base": "SGD", "optimizer": "CR-SAM",
             "backend": "triton", "skipped": "not available"},
        ],
        "graph_capture": [
            {"key": "g1", "optimizer": "SAM", "backend": "triton", "captured": True,
             "replay_ms": 0.3, "replay_changes_params": True},
            {"key": "g2", "optimizer": "AE-SAM", "backend": "triton", "captured": False,
             "error": "RuntimeError: operation not permitted when stream is capturing"},
        ],
        "dispatch_counts": [
            {"key": "d1", "optimizer": "SAM", "base": "SGD", "backend": "eager", "ops_10": 76,
             "ops_300": 76, "grows": False, "growing_ops": {}},
        ],
        "training": [
            {"key": "t1", "model": "resnet50", "optimizer": "base", "backend": "-",
             "batch": 128, "step_ms": 40.0, "img_per_s": 3200.0, "ideal_ratio": 1.0},
            {"key": "t2", "model": "resnet50", "optimizer": "SAM", "backend": "triton",
             "batch": 128, "step_ms": 84.0, "img_per_s": 1524.0, "ideal_ratio": 2.0},
            {"key": "t3", "model": "vit_b_16", "optimizer": "SAM", "backend": "eager",
             "error": "OutOfMemoryError"},
        ],
        "failures": [{"section": "ops", "key": "restore/resnet50/fp32/cuda", "error": "boom"}],
        "skipped": [{"section": "optim", "key": "s3", "reason": "not available"}],
    }  # fmt: skip


def test_report_gpu_columns(tmp_path) -> None:
    from benchmarks import report

    results = _synthetic_gpu_results()
    report.write_all(results, str(tmp_path))
    assert not results.get("report_errors"), results.get("report_errors")
    s = {x["op"]: x for x in results["ops_summary"]}["sgd_step"]
    assert s["best_fused"] == "triton"
    assert s["x_loop"] == pytest.approx(15.0) and s["x_eager"] == pytest.approx(5.0)
    assert s["best_fused_pct_copy"] == pytest.approx(85.0)
    assert s["meets_targets"] is False  # 85% < 90% of copy
    t2 = [x for x in results["training"] if x["key"] == "t2"][0]
    assert t2["ratio_to_base"] == pytest.approx(2.1)
    assert t2["within_2pct_of_ideal"] is False
    md = (tmp_path / "results.md").read_text()
    assert "CUDA graph capture" in md and "operation not permitted" in md
    for name in PNGS:
        assert (tmp_path / name).exists()
    text = report.summary_text(results)
    assert "SAM/triton" in text and "failures: 1" in text


def test_runner_survives_failures(tmp_path) -> None:
    """An item that raises, one that kills its process and one that hangs cost one item each."""
    out = str(tmp_path / "selftest")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--sections", "selftest",
         "--item-timeout-s", "3", "--out", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as fh:
        r = json.load(fh)
    rows = {x["key"]: x for x in r["selftest"]}
    assert rows["selftest/ok"]["value"] == 1 and rows["selftest/after"]["value"] == 2
    assert "planned failure" in rows["selftest/raise"]["error"]
    assert rows["selftest/skip"]["skipped"] == "planned skip"
    assert "exit code" in rows["selftest/crash"]["error"]
    assert "no progress" in rows["selftest/hang"]["error"]
    assert r["meta"]["sections"]["selftest"]["restarts"] == 2
    assert {f["key"] for f in r["failures"]} == {
        "selftest/raise", "selftest/crash", "selftest/hang",
    }  # fmt: skip
