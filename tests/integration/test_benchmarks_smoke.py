"""The benchmark's smoke mode runs end to end (tiny sizes, CPU), so the scripts cannot rot.

Failures of individual benchmark items (a backend under construction) are recorded in
results.json and are not failures here: this test checks the machinery and the output files.
The report's GPU-only columns are exercised on synthetic results.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNGS = ("ops_bandwidth.png", "optimizer_step.png", "training.png")
# ~60 s on a 2-core machine, of which ~30 s are the compiled peer's cold torch.compile (the
# inductor cache makes later runs faster); the limit leaves room for a loaded machine
SMOKE_LIMIT_S = 200  # the smoke budget (140 s) plus start-up, on a loaded machine


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
        timeout=SMOKE_LIMIT_S,
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
                    "## Dispatched aten ops", "## Training step throughput",
                    "## Host overhead: one step over 161 one-element fp32 CPU tensors",
                    "## CPU step: resnet50[:"):  # fmt: skip
        assert heading in md
    assert wall < SMOKE_LIMIT_S


def test_smoke_json_keys(smoke) -> None:
    _, r, _ = smoke
    for key in ("meta", "copy", "ops", "ops_summary", "optimizer_step", "dispatch_counts",
                "training", "host_overhead", "cpu_step", "failures", "skipped"):  # fmt: skip
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


def _host_rows(r: dict, kind: str) -> dict[str, list[dict]]:
    """Rows per base of a host / cpu section; every item ran (no error, no budget skip)."""
    items = {it["base"]: it for it in r[kind]}
    assert set(items) == {"SGD", "AdamW"}, list(items)
    out = {}
    for base, it in items.items():
        assert _ok(it), it
        assert it["threads"] >= 1 and it["n_tensors"] >= 1
        out[base] = it["rows"]
    return out


def _check_rows(rows: list[dict], modes: tuple[str, ...], counted: bool) -> None:
    by = {(x["label"], x["mode"]): x for x in rows}
    labels = {x["label"] for x in rows}
    assert ("torch fused", "step()") in by and ("torch foreach", "step()") in by
    for mode in modes:
        assert ("davda54", mode) in by
        ours = [x for x in rows if x["family"] == "ours" and x["mode"] == mode]
        assert ours and any(x["backend"] == "eager" for x in ours), rows
        assert sum(bool(x.get("default")) for x in ours) <= 1
    # a peer is timed, or recorded as not installed / with its compile error
    assert "pytorch_optimizer" in labels and "compiled" in labels
    for x in rows:
        if x["label"] == "pytorch_optimizer" and "median_ms" not in x:
            assert x.get("skipped") == "not installed" or "error" in x, x
        if x["label"] == "compiled" and "median_ms" not in x:
            assert "error" in x or "skipped" in x, x
    # the torch steps, ours (the backends that run on CPU tensors) and davda54 always run;
    # their numbers are sane
    for x in rows:
        if x.get("skipped"):  # Triton: only its interpreter runs on CPU tensors
            assert x["label"] in ("ours triton", "compiled", "pytorch_optimizer"), x
        elif x["family"] in ("torch", "ours") or x["label"] == "davda54":
            assert "error" not in x, x
            assert math.isfinite(x["median_ms"]) and x["median_ms"] > 0 and x["reps"] >= 3
            assert x["p20_ms"] <= x["median_ms"] <= x["p80_ms"]
            assert math.isfinite(x["x_fused_sgd"]) and x["x_fused_sgd"] > 0
            if counted:
                assert isinstance(x["aten_ops"], int) and x["aten_ops"] >= 1
                assert isinstance(x["host_reads"], int) and x["host_reads"] >= 0
    assert by[("torch fused", "step()")]["x_fused_base"] == 1.0


def test_smoke_host_overhead(smoke) -> None:
    out, r, _ = smoke
    rows = _host_rows(r, "host_overhead")
    for rs in rows.values():
        _check_rows(rs, ("first+second", "step(closure)"), counted=True)
    assert all(it["n_tensors"] == 161 for it in r["host_overhead"])
    sgd = {(x["label"], x["mode"]): x for x in rows["SGD"]}
    assert sgd[("torch fused", "step()")]["x_fused_sgd"] == 1.0
    # the per-parameter loop dispatches per tensor: more ops than tensors
    assert sgd[("davda54", "step(closure)")]["aten_ops"] > 161
    targets = [t for it in r["host_overhead"] for t in it["targets"]]
    assert targets and all(isinstance(t["met"], bool) for t in targets)
    md = open(os.path.join(out, "results.md")).read()
    assert "| base | row | mode | ms per step (median) |" in md and "aten ops per step" in md


def test_smoke_cpu_step(smoke) -> None:
    _, r, _ = smoke
    for rs in _host_rows(r, "cpu_step").values():
        _check_rows(rs, ("step(closure)",), counted=False)
    assert all(it["numel"] > 10_000 for it in r["cpu_step"])


def _synthetic_gpu_results() -> dict:
    """Results shaped like a GPU run: fused providers, floors, kernels, graphs, ratios."""
    ops = []
    for prov, ms in (("loop", 3.0), ("eager", 1.0), ("triton", 0.2), ("ext", 0.25)):
        ops.append(
            {"key": f"sgd_step/resnet50/fp32/{prov}", "op": "sgd_step", "shape": "resnet50",
             "dtype": "fp32", "provider": prov, "median_ms": ms, "bytes": 5.1e8,
             "gbps": 5.1e8 / (ms * 1e-3) / 1e9}
        )  # fmt: skip
    ops.append(
        {"key": "restore/resnet50/fp32/ext", "op": "restore", "shape": "resnet50",
         "dtype": "fp32", "provider": "ext", "error": "RuntimeError: boom"}
    )  # fmt: skip
    return {
        "meta": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
                 "date": "2026-11-22", "elapsed_s": 300.0,
                 "sections": {"ops": {"status": "ok", "wall_s": 100, "restarts": 0}}},
        "copy": [{"key": "copy_bandwidth", "gbps": 3000.0, "median_ms": 0.7,
                  "tensor_bytes": 2**30}],
        "backends": [{"eager": {"available": True}, "triton": {"available": True},
                      "ext": {"available": False, "why": "not built"}}],
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
