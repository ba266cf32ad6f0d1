"""One comparison: every chosen optimizer over every seed on one data set and model, then the
table, the JSON report, the plot (and the sharpness table when asked) in the output folder."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from typing import Any

import torch
from torch import nn

from python_api.demo.data import load_data, noisy_labels
from python_api.demo.errors import PROG, DemoError
from python_api.demo.models import check_model_available, resolve_model_name
from python_api.demo.registry import _optimizer_missing, parse_optimizers, parse_rho_overrides
from python_api.demo.report import (
    prepare_out_dir,
    render_table,
    save_plot,
    sharpness_table,
    summarise,
)
from python_api.demo.timing import fused_vs_eager
from python_api.demo.train import RunConfig, train_one

#: Epochs and batch size when not given, per kind of data (the parser's help quotes them).
DIGITS_DEFAULTS = {"epochs": 40, "batch_size": 64}
IMAGE_DEFAULTS = {"epochs": 10, "batch_size": 128}


def _check_args(args: argparse.Namespace) -> None:
    """The checks argparse cannot express (ranges, CUDA present); raises DemoError."""
    if not (0.0 <= args.noise < 1.0):
        raise DemoError(f"--noise must be in [0, 1), got {args.noise:g}")
    if args.sharpness < 0:
        raise DemoError(f"--sharpness needs a number of probes >= 1, got {args.sharpness}")
    if args.seeds < 1:
        raise DemoError(f"--seeds must be >= 1, got {args.seeds}")
    for name in ("epochs", "batch_size", "max_steps", "image_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("lr", "weight_decay"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and (v > 0 if name == "lr" else v >= 0)):
            raise DemoError(
                f"--{name.replace('_', '-')} must be a finite number "
                f"{'> 0' if name == 'lr' else '>= 0'}, got {v:g}"
            )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device is available")


def run(args: argparse.Namespace) -> int:
    """Run the comparison described by parsed ``args``; returns the exit code."""
    _check_args(args)
    # Through the package, not an import of registry's function: a test replaces
    # demo.optimizer_registry (with an optimizer that fails) and the run must see it.
    from python_api import demo

    reg = demo.optimizer_registry()
    keys, asked_all = parse_optimizers(args.optimizers, reg)
    rho_over = parse_rho_overrides(args.rho, reg)
    # Momentum-SAM's forms each replace one base optimizer: "all" runs the one of --base
    other_base = [k for k in keys if reg[k].standalone not in (None, args.base)]
    if other_base and not asked_all:
        k = other_base[0]
        raise DemoError(f"{k} replaces {reg[k].standalone}: run it with --base {reg[k].standalone}")
    keys = [k for k in keys if k not in other_base]
    missing = {k: why for k in keys if (why := _optimizer_missing(reg[k])) is not None}
    if missing and not asked_all:
        k, why = next(iter(missing.items()))
        raise DemoError(f"optimizer {k!r} is not available in this install ({why})")
    for k, why in missing.items():
        print(f"{PROG}: note: skipping {k} (not available: {why})", file=sys.stderr)
    keys = [k for k in keys if k not in missing]
    if args.model != "auto":
        check_model_available(args.model)
    out_dir = prepare_out_dir(args.out)

    data = load_data(args.data, args.image_size, progress=not args.no_progress)
    digits = data.name == "digits"
    threads = args.threads or (1 if digits else torch.get_num_threads())
    torch.set_num_threads(threads)
    defaults = DIGITS_DEFAULTS if digits else IMAGE_DEFAULTS
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    data.to(device)
    model_name = resolve_model_name(args.model, data)
    if model_name == "cnn" and args.model == "auto" and not digits:
        print(
            f"{PROG}: note: torchvision not importable; using the small CNN (--model cnn)",
            file=sys.stderr,
        )
    sgd = args.base == "sgd"
    cfg = RunConfig(
        model=model_name,
        base=args.base,
        lr=args.lr if args.lr is not None else (0.1 if sgd else 1e-3),
        momentum=0.9,
        weight_decay=(
            args.weight_decay if args.weight_decay is not None else (5e-4 if sgd else 0.05)
        ),
        epochs=args.epochs or defaults["epochs"],
        batch_size=args.batch_size or defaults["batch_size"],
        max_steps=args.max_steps,
        noise=args.noise,
        device=device,
        progress=not args.no_progress,
        rho_overrides=rho_over,
    )
    base_label = "SGD" if sgd else "AdamW"
    seeds = list(range(args.seeds))
    header = (
        f"data {data.name} ({len(data.y_train)} train / {len(data.y_test)} test, "
        f"{data.num_classes} classes), model {model_name}, label noise {cfg.noise:.0%}, "
        f"base {base_label} (lr {cfg.lr:g}, wd {cfg.weight_decay:g}, cosine), "
        f"{cfg.epochs} epochs x batch {cfg.batch_size}"
        + (f" (max {cfg.max_steps} steps)" if cfg.max_steps else "")
        + f", seeds {len(seeds)}, device {device.type}"
        + (f" ({threads} threads)" if device.type == "cpu" else "")
    )
    print(f"{PROG}: {header}", flush=True)

    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    noisy_fracs = [
        float((noisy_labels(data, cfg.noise, s) != data.y_train).float().mean()) for s in seeds
    ]
    failed: dict[str, str] = {}
    trained: dict[str, nn.Module] = {}  # seed 0's model per optimizer, for --sharpness
    for k in keys:
        method = reg[k]
        label = base_label if k == "base" else method.label
        results = []
        try:
            for seed in seeds:
                results.append(train_one(method, seed, data, cfg))
        except (DemoError, KeyboardInterrupt):
            raise
        except Exception as exc:  # one optimizer failing must not lose the others' results
            first = str(exc).splitlines()[0] if str(exc) else ""
            failed[k] = f"{type(exc).__name__}: {first}"
            with open(out_dir / "errors.log", "a", encoding="utf-8") as f:
                f.write(f"--- {label} (seed {len(results)})\n{traceback.format_exc()}\n")
            print(
                f"{PROG}: {label} failed ({failed[k]}); traceback in {out_dir / 'errors.log'}",
                file=sys.stderr,
                flush=True,
            )
            continue
        rho = None if method.module is None else rho_over.get(k, method.kwargs.get("rho"))
        fused = None
        if device.type == "cuda" and not args.no_fused_timing:
            try:
                fused = fused_vs_eager(method, data, cfg)
            except Exception as exc:  # a backend that cannot run this optimizer: no timing
                first = str(exc).splitlines()[0] if str(exc) else ""
                print(
                    f"{PROG}: note: no fused vs eager timing for {label} "
                    f"({type(exc).__name__}: {first})",
                    file=sys.stderr,
                )
        row = summarise(method, label, results, rho, fused)
        if args.sharpness:
            trained[label] = results[0].model
        rows.append(row)
        print(
            f"  {label:<11} test acc {row['test_acc_mean']:6.2f} ± {row['test_acc_std']:4.2f}%"
            f"  train loss {row['train_loss_mean']:.3f}  {row['wall_s_mean']:5.1f} s/run",
            flush=True,
        )
    total_wall = time.perf_counter() - t_start

    with_fused = any(r["fused_vs_eager"] for r in rows)
    table = render_table(rows, with_fused)
    note = (
        f"Test accuracy after the last epoch (clean test labels), mean ± std over "
        f"{len(seeds)} seed(s); train loss: mean minibatch loss at w over the last epoch "
        f"(noisy labels); passes/step: closure calls (forward/backward) per step; "
        f"total wall time {total_wall:.0f} s."
    )
    if with_fused:
        note += (
            " Fused vs eager: eager ms/step / Triton ms/step (in brackets: Triton vs eager) "
            "for whole steps on one batch, forward/backward included, best of 3 x 40 steps."
        )
    elif device.type != "cuda":
        note += " Fused vs eager: not measured (needs a CUDA device with Triton)."
    if failed:
        note += " Failed (not in the table): " + "; ".join(
            f"{reg[k].label} ({why})" for k, why in failed.items()
        )
        note += "."
    print()
    print(table)
    print()
    print(note)

    md = f"# sam-demo results\n\n{header}\n\n{table}\n\n{note}\n\n![curves](curves.png)\n"
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    import sam_kernels

    report = {
        "config": {
            "data": data.name,
            "n_train": len(data.y_train),
            "n_test": len(data.y_test),
            "num_classes": data.num_classes,
            "model": model_name,
            "noise": cfg.noise,
            "noisy_fraction": noisy_fracs,
            "base": cfg.base,
            "lr": cfg.lr,
            "momentum": cfg.momentum if sgd else None,
            "weight_decay": cfg.weight_decay,
            "schedule": "cosine",
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "max_steps": cfg.max_steps,
            "seeds": seeds,
            "optimizers": keys,
            "device": str(device),
            "threads": threads,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sam_kernels": getattr(sam_kernels, "__version__", None),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "platform": platform.platform(),
        },
        "total_wall_s": total_wall,
        "failed": failed,
        "skipped": missing,
        "rows": rows,
        "table_markdown": table,
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    save_plot(rows, out_dir / "curves.png", header)
    if args.sharpness and trained:
        sharpness_table(trained, data, cfg, seeds[0], args.sharpness, out_dir)
    print(f"\nResults written to {out_dir.resolve()}  (results.md, results.json, curves.png)")
    return 1 if failed else 0
