"""The host / cpu sections' peers compute SAM, and their rows and report hold up (no timing).

The compiled peer's functions are checked run eagerly (``compile=False``: the same code that
torch.compile is given) against the davda54-style loop; pytorch_optimizer's SAM (when installed)
against the same loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import host, report
from benchmarks.optimizer_step import LoopSAM, base_optimizer

SHAPES = [(4, 3), (5,), (2, 2, 3)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(k: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _run_sam(opt, params, steps: int = 3) -> list[torch.Tensor]:
    for k in range(steps):
        for p, g in zip(params, _grads(2 * k)):
            p.grad = g
        opt.first_step()
        for p, g in zip(params, _grads(2 * k + 1)):
            p.grad = g
        opt.second_step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("base", ["SGD", "AdamW"])
def test_compiled_peer_is_sam(base: str) -> None:
    cls, kw = base_optimizer(base)
    ref_p = _params()
    ref = _run_sam(LoopSAM(ref_p, cls, rho=host.RHO, **kw), ref_p)
    ps = _params()
    got = _run_sam(host.CompiledForeachSAM(ps, base, compile=False), ps)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["SGD", "AdamW"])
def test_pytorch_optimizer_peer_is_sam(base: str) -> None:
    po = pytest.importorskip("pytorch_optimizer")
    cls, kw = base_optimizer(base)
    ref_p = _params()
    ref = _run_sam(LoopSAM(ref_p, cls, rho=host.RHO, **kw), ref_p)
    ps = _params()
    got = _run_sam(po.SAM(ps, cls, rho=host.RHO, foreach=True, **kw), ps)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _rows(monkeypatch, compiled) -> list[dict]:
    monkeypatch.setattr(host, "peer_version", lambda dist: None)  # the peer "not installed"
    params = host.make_params([(1,)] * 5)
    res = host.run_base(
        params, "SGD", ("first+second", "step(closure)"), ("t", "SGD"), compiled, 1, 2, 2, True
    )
    assert res["n_tensors"] == 5 and res["pytorch_optimizer"] == "not installed"
    return res["rows"]


def test_rows_and_missing_peer(monkeypatch) -> None:
    rows = _rows(monkeypatch, "turned off for the test")
    by = {(r["label"], r["mode"]): r for r in rows}
    assert by[("pytorch_optimizer", "-")]["skipped"] == "not installed"
    assert by[("compiled", "-")]["skipped"] == "turned off for the test"
    fused = by[("torch fused", "step()")]
    assert fused["aten_ops"] >= 1 and isinstance(fused["aten_ops"], int)
    for mode in ("first+second", "step(closure)"):
        assert ("davda54", mode) in by
        ours = [r for r in rows if r["family"] == "ours" and r["mode"] == mode]
        assert ours, rows
    for r in rows:
        if "median_ms" in r:
            assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and r["reps"] == 4
            assert isinstance(r["aten_ops"], int) and isinstance(r["host_reads"], int)


def test_compile_failure_is_the_rows_error(monkeypatch) -> None:
    def boom(params, base, key):
        raise RuntimeError("inductor says no")

    monkeypatch.setattr(host, "compiled_peer", boom)
    rows = _rows(monkeypatch, True)
    err = [r for r in rows if r["label"] == "compiled"]
    assert len(err) == 1 and "inductor says no" in err[0]["error"]


def test_report_host_tables() -> None:
    def item(base: str, fused: float, ours: float, kind: str) -> dict:
        rows = [
            {"label": "torch fused", "family": "torch", "base": base, "mode": "step()",
             "median_ms": fused, "p20_ms": fused, "p80_ms": fused, "aten_ops": 3,
             "host_reads": 0},
            {"label": "ours eager (default)", "family": "ours", "base": base,
             "mode": "step(closure)", "median_ms": ours, "aten_ops": 50, "host_reads": 0,
             "default": True, "backend": "eager"},
            {"label": "pytorch_optimizer", "family": "peer", "base": base,
             "mode": "step(closure)", "median_ms": 2 * fused, "version": "4.1.0",
             "foreach": True},
            {"label": "compiled", "family": "peer", "base": base, "mode": "-",
             "error": "RuntimeError: no compiler"},
        ]  # fmt: skip
        return {"key": f"{kind}/{base}", "base": base, "rows": rows, "threads": 1,
                "n_tensors": 161, "numel": 161, "shapes": "161 x 1 element"}  # fmt: skip

    results = {
        "meta": {"device": "cpu"},
        "host_overhead": [item("SGD", 0.2, 1.0, "host"), item("AdamW", 0.5, 1.5, "host")],
        # over AdamW: 55 ms is 1.83x torch's fused AdamW step (met), 2.75x its fused SGD step
        "cpu_step": [item("SGD", 20.0, 30.0, "cpu"), item("AdamW", 30.0, 55.0, "cpu")],
    }
    report.derive(results)
    sgd, adamw = results["host_overhead"]
    assert sgd["rows"][1]["x_fused_sgd"] == pytest.approx(5.0)
    assert adamw["rows"][1]["x_fused_sgd"] == pytest.approx(7.5)
    assert adamw["rows"][1]["x_fused_base"] == pytest.approx(3.0)
    assert [t["met"] for t in sgd["targets"]] == [False]
    cpu_t = results["cpu_step"][0]["targets"]
    assert [t["met"] for t in cpu_t] == [True, True]  # 30 ms < 40 ms; x1.5 <= x2.5
    cpu_adamw = results["cpu_step"][1]["targets"]
    assert [t["met"] for t in cpu_adamw] == [True, True]  # 55 ms < 60 ms; x1.83 <= x2.5
    assert cpu_adamw[1]["value"] == "x1.83" and "fused AdamW" in cpu_adamw[1]["target"]
    md = report.markdown(results)
    assert "## Host overhead" in md and "## CPU step" in md and "no compiler" in md
    text = report.summary_text(results)
    assert "host overhead" in text and "CPU step" in text
