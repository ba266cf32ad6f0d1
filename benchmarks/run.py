"""The one command: ``python -m benchmarks.run`` (GPU) or ``python -m benchmarks.run --smoke``.

Sections (``--sections ops,optim,train,host,cpu``) each run in a child process under a share of the
wall-clock budget (``--budget-s``); time a section does not use passes to the next. A failing
item is recorded and the run goes on; a crashing child is restarted past the item that crashed.
Results go to ``benchmarks/results/<date>_<device-slug>/`` (or ``--results-root``/that name, or
exactly ``--out``): ``results.json``, ``results.md`` and PNG plots. ``--smoke`` runs tiny sizes
on the CPU and writes to a temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

SECTIONS = {
    "ops": "benchmarks.ops",
    "optim": "benchmarks.optimizer_step",
    "train": "benchmarks.training",
    "host": "benchmarks.host",  # host time of a step over 161 one-element CPU tensors
    "cpu": "benchmarks.host:plan_cpu",  # a CPU step over ResNet-50's shapes
    "selftest": "benchmarks._selftest",  # failure handling check, for the tests
}
# share of the budget per section (renormalised over the sections that remain)
SHARES = {"ops": 0.36, "optim": 0.26, "train": 0.38, "host": 0.1, "cpu": 0.12, "selftest": 0.2}
DEFAULT_SECTIONS = "ops,optim,train,host,cpu"
#: seconds added to the default budget by the host / cpu sections (full run, smoke); most of it
#: is the cold torch.compile of the compiled peer (25-55 s per function pair on a slow CPU). The
#: smoke's host share is sized for a loaded 2-core machine (the test suite runs beside other
#: work): at 40 s its AdamW rows were skipped for the budget there
EXTRA_BUDGET = {"host": (150.0, 70.0), "cpu": (200.0, 20.0)}
#: the no-progress limit of these sections' items is at least this (a compile writes nothing)
MIN_ITEM_TIMEOUT = {"host": 240.0, "cpu": 240.0}
RESULT_KINDS = (
    "copy",
    "backends",
    "ops",
    "optimizer_step",
    "dispatch_counts",
    "graph_capture",
    "training",
    "host_overhead",
    "cpu_step",
    "compile",
    "selftest",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (~1 min)")
    p.add_argument("--quick", action="store_true", help="fewer ops, shapes and optimizers")
    p.add_argument("--sections", default=DEFAULT_SECTIONS, help=f"comma list of {DEFAULT_SECTIONS}")
    p.add_argument("--out", help="write the results exactly into this folder")
    p.add_argument(
        "--results-root",
        help="write into <this>/<date>_<device-slug>/ (default benchmarks/results)",
    )
    p.add_argument("--budget-s", type=float, help="wall-clock budget of all sections")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available; --smoke: cpu)")
    p.add_argument("--dtypes", help="comma list of fp32,bf16")
    p.add_argument("--ops", help="comma list of op names (default all)")
    p.add_argument("--optimizers", help="comma list of optimizer names (default all)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads in the sections' processes (default: 1 with --smoke, else "
        "torch's default)",
    )
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd peer")
    p.add_argument("--note", help="a line for results.md (the machine, its load, ...)")
    p.add_argument("--keep-raw", action="store_true", help="keep the per-section JSON lines")
    p.add_argument(
        "--item-timeout-s",
        type=float,
        help="kill a section's process that writes nothing for this long (default 90; smoke 30)",
    )
    # child mode (internal)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--jsonl", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device:
        device = args.device
    elif args.smoke:
        device = "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg: dict[str, Any] = {
        "device": device,
        "smoke": bool(args.smoke),
        "quick": bool(args.quick),
        "dtypes": (args.dtypes or ("fp32" if args.quick or args.smoke else "fp32,bf16")).split(","),
        # the smoke keeps Triton out (its CPU interpreter is slow); "ext" is the compiled
        # extension, whose C++ ops also run on CPU tensors when it is built
        "providers": ["loop", "eager", "ext"] if args.smoke else ["loop", "eager", "triton", "ext"],
        "ops": args.ops.split(",") if args.ops else None,
        "optimizers": args.optimizers.split(",") if args.optimizers else None,
        "threads": args.threads or (1 if args.smoke else None),
        "no_compile": bool(args.no_compile),
    }
    cfg["item_timeout_s"] = args.item_timeout_s or (30.0 if args.smoke else 90.0)
    if args.smoke:
        cfg.update(
            warmup_ms=2.0, rep_ms=5.0, min_reps=3, copy_bytes=16 * 2**20,
            optim_warmup=1, optim_steps=3, train_warmup=1, train_steps=2,
            host_warmup=10, host_rounds=5, host_reps=20, cpu_warmup=1, cpu_rounds=5,
        )  # fmt: skip
    else:
        cfg.update(
            warmup_ms=10.0, rep_ms=40.0, min_reps=8, copy_bytes=2**30,
            optim_warmup=3, optim_steps=20, train_warmup=5, train_steps=10,
            host_warmup=50, host_rounds=10, host_reps=50, cpu_warmup=2, cpu_rounds=9,
        )  # fmt: skip
    return cfg


def default_budget(cfg: dict, sections: list[str] | None = None) -> float:
    i = 1 if cfg["smoke"] else 0
    extra = sum(EXTRA_BUDGET[s][i] for s in sections or () if s in EXTRA_BUDGET)
    if cfg["smoke"]:
        return 50.0 + extra
    return (180.0 if cfg["quick"] else 330.0) + extra


def results_dir(args: argparse.Namespace, cfg: dict, device_name: str) -> str:
    from benchmarks.common import slug

    if args.out:
        return args.out
    name = time.strftime("%Y-%m-%d") + "_" + slug(device_name)
    if args.results_root:
        root = args.results_root
    elif args.smoke:
        root = tempfile.mkdtemp(prefix="sam_bench_smoke_")
    else:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    path = os.path.join(root, name)
    k = 2
    while os.path.exists(path):
        path = os.path.join(root, f"{name}-{k}")
        k += 1
    return path


def run_child(args: argparse.Namespace) -> int:
    """Child mode: run one section's items into its JSON-lines file."""
    from benchmarks.common import run_items

    with open(args.config) as fh:
        cfg = json.load(fh)
    import torch

    if cfg["device"] == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])  # smoke: tiny tensors, threads only add contention
    module, _, fn = SECTIONS[args.child].partition(":")
    items = getattr(importlib.import_module(module), fn or "plan")(cfg)
    return run_items(args.child, items, args.jsonl, args.deadline)


def collect(jsonl_paths: dict[str, str]) -> dict[str, Any]:
    """Fold the sections' JSON lines into the results dict."""
    from benchmarks.common import TERMINAL, read_records

    out: dict[str, Any] = {k: [] for k in RESULT_KINDS}
    out["failures"] = []
    out["skipped"] = []
    for section, path in jsonl_paths.items():
        recs = read_records(path)
        planned: list[str] = []
        last: dict[str, dict] = {}
        for r in recs:
            if r.get("event") == "plan":
                planned = r["keys"]
            elif r.get("event") in TERMINAL:
                last[r["key"]] = r
        for key in planned:
            if key not in last:
                out["skipped"].append(
                    {"section": section, "key": key, "reason": "not reached (section aborted)"}
                )
        for key, r in last.items():
            kind = r.get("kind") or "other"
            row = {"key": key, **r.get("meta", {})}
            if r["event"] == "done":
                res = r["result"]
                row.update(res if isinstance(res, dict) else {"value": res})
                row["item_wall_s"] = r.get("wall_s")
            elif r["event"] == "error":
                row["error"] = r["error"]
                out["failures"].append(
                    {
                        "section": section,
                        "key": key,
                        "error": r["error"],
                        "traceback": (r.get("traceback") or "")[-1500:],
                    }
                )
            else:
                row["skipped"] = r.get("reason", "")
                out["skipped"].append({"section": section, "key": key, "reason": row["skipped"]})
            out.setdefault(kind, []).append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    t_start = time.time()
    from benchmarks import report
    from benchmarks.common import env_info, run_section_process

    cfg = make_config(args)
    import torch

    if cfg["device"] == "cpu" and not cfg["smoke"] and not args.device:
        print(
            "no CUDA device: the full run trains ResNet-50 and ViT-B/16, which the CPU cannot do "
            "in the budget. Use --smoke, or --device cpu to force it.",
            file=sys.stderr,
        )
        return 2

    try:
        env = env_info(torch.device(cfg["device"]))
    except Exception as exc:  # a broken device must not stop the record
        env = {"device": cfg["device"], "env_error": f"{type(exc).__name__}: {exc}"}
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    budget = args.budget_s if args.budget_s else default_budget(cfg, sections)
    for s in sections:
        if s not in SECTIONS:
            print(f"unknown section {s!r}; expected some of {list(SECTIONS)}", file=sys.stderr)
            return 2
    out_dir = results_dir(args, cfg, env.get("device", "device"))
    os.makedirs(out_dir, exist_ok=True)
    raw = tempfile.mkdtemp(prefix="sam_bench_raw_")
    cfg_path = os.path.join(raw, "config.json")
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    print(
        f"sam-kernels benchmark: {env.get('device')} | torch {env.get('torch')} | "
        f"triton {env.get('triton')} | budget {budget:.0f}s | sections {sections}",
        flush=True,
    )
    jsonls: dict[str, str] = {}
    section_status: dict[str, Any] = {}
    end = t_start + budget
    for i, s in enumerate(sections):
        left = [x for x in sections[i:]]
        share = SHARES[s] / sum(SHARES[x] for x in left)
        deadline = time.time() + max(5.0, (end - time.time()) * share)
        jsonls[s] = os.path.join(raw, f"{s}.jsonl")
        t0 = time.time()
        print(f"== section {s} (until +{deadline - t_start:.0f}s) ==", flush=True)
        try:
            timeout = max(cfg["item_timeout_s"], MIN_ITEM_TIMEOUT.get(s, 0.0))
            st = run_section_process(s, cfg_path, jsonls[s], deadline, item_timeout_s=timeout)
        except Exception as exc:
            st = {"status": f"failed to run: {type(exc).__name__}: {exc}"}
        st["wall_s"] = round(time.time() - t0, 1)
        section_status[s] = st
    results = collect(jsonls)
    results["meta"] = {
        **env,
        "config": cfg,
        "budget_s": budget,
        "elapsed_s": round(time.time() - t_start, 1),
        "sections": section_status,
        "results_dir": out_dir,
        "command": " ".join(["python -m benchmarks.run", *map(shlex.quote, argv or sys.argv[1:])]),
    }
    if args.note:
        results["meta"]["note"] = args.note
    report.write_all(results, out_dir)
    if args.keep_raw:
        print(f"raw JSON lines kept in {raw}")
    else:
        shutil.rmtree(raw, ignore_errors=True)
    print(report.summary_text(results), flush=True)
    print(f"results: {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
