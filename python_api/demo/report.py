"""What a comparison leaves behind: the rows of the table (JSON-ready), the Markdown table, the
plot of the curves, the sharpness table of the trained models, and the output folder."""

from __future__ import annotations

import datetime as _dt
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from python_api.demo.data import Data, noisy_labels
from python_api.demo.errors import DemoError
from python_api.demo.registry import Method
from python_api.demo.train import RunConfig, RunResult


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(
    method: Method,
    label: str,
    results: list[RunResult],
    rho: float | None,
    fused: dict[str, float] | None,
) -> dict[str, Any]:
    """One table row (JSON-ready) from the per-seed results of one optimizer."""
    accs = [r.test_acc[-1] for r in results]
    losses = [r.train_loss[-1] for r in results]
    m, s = _mean_std(accs)
    lm, ls = _mean_std(losses)
    steps = sum(r.steps for r in results)
    fracs = [r.sam_fraction for r in results if r.sam_fraction is not None]
    return {
        "optimizer": method.key,
        "label": label,
        "rho": rho,
        "hparams": ({**method.kwargs, "rho": rho} if method.module else {}),
        "test_acc_mean": m,
        "test_acc_std": s,
        "test_acc": accs,
        "train_loss_mean": lm,
        "train_loss_std": ls,
        "train_loss": losses,
        "sam_steps_pct": 100.0 * statistics.fmean(fracs) if fracs else None,
        "passes_per_step": sum(r.closure_calls for r in results) / max(steps, 1),
        "steps_per_run": results[0].steps,
        "wall_s_mean": statistics.fmean(r.wall_s for r in results),
        "wall_s": [r.wall_s for r in results],
        "fused_vs_eager": fused,
        "curves": {
            "test_acc": [r.test_acc for r in results],
            "train_loss": [r.train_loss for r in results],
        },
    }


def render_table(rows: list[dict[str, Any]], with_fused: bool) -> str:
    """The Markdown table printed and saved."""
    head = [
        "optimizer",
        "rho",
        "test acc % (mean ± std)",
        "vs base",
        "train loss",
        "% SAM steps",
        "passes/step",
        "s/run",
    ]
    if with_fused:
        head.append("fused vs eager (ms/step)")
    base_acc = next((r["test_acc_mean"] for r in rows if r["optimizer"] == "base"), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        delta = (
            f"{r['test_acc_mean'] - base_acc:+.2f}"
            if base_acc is not None and r["optimizer"] != "base"
            else ""
        )
        cells = [
            r["label"],
            "" if r["rho"] is None else f"{r['rho']:g}",
            f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}",
            delta,
            f"{r['train_loss_mean']:.3f}",
            "" if r["sam_steps_pct"] is None else f"{r['sam_steps_pct']:.0f}",
            f"{r['passes_per_step']:.2f}",
            f"{r['wall_s_mean']:.2f}",
        ]
        if with_fused:
            f = r["fused_vs_eager"]
            cells.append(
                f"{f['speedup']:.2f}x ({f['triton']:.2f} vs {f['eager']:.2f})" if f else "n/a"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Final test accuracy per optimizer, and test accuracy and train loss per epoch.

    Curves are the mean over seeds with a min..max band; the base optimizer is black, dashed.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_bar, ax_acc, ax_loss) = plt.subplots(
        1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [0.8, 1, 1]}
    )
    palette = [*plt.get_cmap("tab10").colors, "navy", "darkgoldenrod", "lime"]
    styles: list[tuple[Any, str]] = []
    i = 0
    for r in rows:
        if r["optimizer"] == "base":
            styles.append(("black", "--"))
        else:
            styles.append((palette[i % len(palette)], "-"))
            i += 1
    late_acc: list[float] = []
    for r, (color, style) in zip(rows, styles):
        for ax, key in ((ax_acc, "test_acc"), (ax_loss, "train_loss")):
            curves = torch.tensor(r["curves"][key], dtype=torch.float64)  # seeds x epochs
            xs = list(range(1, curves.shape[1] + 1))
            mean = curves.mean(0)
            ax.plot(xs, mean.tolist(), style, color=color, label=r["label"], lw=1.6)
            if curves.shape[0] > 1:
                ax.fill_between(
                    xs,
                    curves.min(0).values.tolist(),
                    curves.max(0).values.tolist(),
                    color=color,
                    alpha=0.10,
                    lw=0,
                )
            if key == "test_acc":
                late_acc.extend(mean[len(xs) // 4 :].tolist())
    labels = [r["label"] for r in rows]
    means = [r["test_acc_mean"] for r in rows]
    ys = list(range(len(rows)))[::-1]
    ax_bar.barh(
        ys,
        means,
        xerr=[r["test_acc_std"] for r in rows],
        color=[c for c, _ in styles],
        alpha=0.85,
        capsize=3,
    )
    ax_bar.set_yticks(ys, labels)
    for y, r in zip(ys, rows):
        ax_bar.text(
            r["test_acc_mean"] + r["test_acc_std"],
            y,
            f"  {r['test_acc_mean']:.1f}",
            va="center",
            ha="left",
            fontsize=8,
        )
    if means:
        lo = min(m - s for m, s in zip(means, (r["test_acc_std"] for r in rows)))
        hi = max(m + s for m, s in zip(means, (r["test_acc_std"] for r in rows)))
        ax_bar.set_xlim(max(0.0, lo - 3.0), min(100.0, hi + 2.5))
    base = next((r for r in rows if r["optimizer"] == "base"), None)
    if base is not None:
        ax_bar.axvline(base["test_acc_mean"], color="black", ls="--", lw=1)
    ax_bar.set(xlabel="test accuracy (%), mean ± std", title="final test accuracy")
    if late_acc:
        ax_acc.set_ylim(max(0.0, min(late_acc) - 5.0), min(100.0, max(late_acc) + 2.0))
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss (noisy labels)", title="train loss")
    for ax in (ax_bar, ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, ncol=2, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_out_dir() -> Path:
    """A new timestamped folder under ./demo_out."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("demo_out") / stamp
    out, i = base, 1
    while out.exists():
        out = base.with_name(f"{stamp}-{i}")
        i += 1
    return out


def prepare_out_dir(out: str | None) -> Path:
    path = Path(out).expanduser() if out else default_out_dir()
    if path.exists() and not path.is_dir():
        raise DemoError(f"--out {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DemoError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def sharpness_table(
    models: dict[str, nn.Module],
    data: Data,
    cfg: RunConfig,
    seed: int,
    n_probes: int,
    out_dir: Path,
) -> None:
    """CR-SAM Table 3 for the trained models: ||grad L||, Tr(H), C(w) on the training set.

    The loss is the training objective the models were fitted to (seed ``seed``'s noisy
    labels, no augmentation); every model gets the same Hutchinson probes.
    """
    from python_api.metrics import sharpness_report

    x = data.prepare(data.x_train, train=False)
    y = noisy_labels(data, cfg.noise, seed).to(x.device)
    print()
    print(f"Model geometry on the training set (seed {seed}, {n_probes} Hutchinson probes):")
    sharpness_report(
        models,
        F.cross_entropy,
        (x, y),
        n_probes=n_probes,
        seed=0,
        progress=cfg.progress,
        path=out_dir / "sharpness",
    )
