"""CR-SAM's Table 3 for several models: the rows, the Markdown/JSON rendering and the files.

:func:`sharpness_report` is a client of the estimators (one :func:`normalized_hessian_trace`
call per model, optionally :func:`top_hessian_eigenvalue`); everything else here is formatting.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from python_api.metrics._checks import check_int
from python_api.metrics._data import Data, DeviceLike, LossFn
from python_api.metrics.estimators import normalized_hessian_trace, top_hessian_eigenvalue


@dataclass(frozen=True)
class SharpnessRow:
    """One model's geometry: gradient norm, Hessian trace, C(w), optionally the top eigenvalue."""

    name: str
    loss: float
    grad_norm: float
    trace: float
    trace_stderr: float
    normalized_trace: float
    normalized_trace_stderr: float
    top_eigenvalue: float | None = None
    top_eigenvalue_residual: float | None = None


def _fmt(x: float | None, se: float | None = None) -> str:
    """A table cell: 4 significant digits, ``± se`` when the error is known; ``-`` for none."""
    if x is None:
        return "-"
    s = f"{x:.4g}"
    if se is not None and math.isfinite(se):
        s += f" ± {se:.2g}"
    return s


def _json_safe(x: Any) -> Any:
    """JSON has no nan or inf: nan becomes null, +-inf the strings "inf"/"-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass(frozen=True)
class SharpnessReport:
    """Several models' geometry on the same data, as in CR-SAM's Table 3.

    ``str(report)`` and :meth:`to_markdown` give the Markdown table (``±`` is the estimator's
    standard error, not a spread over runs); :meth:`to_dict` the JSON-ready content.
    """

    rows: tuple[SharpnessRow, ...]
    n_probes: int
    seed: int
    n_examples: int

    def to_markdown(self) -> str:
        eig = any(r.top_eigenvalue is not None for r in self.rows)
        head = ["optimizer", "‖∇L‖", "Tr(H)", "C(w)"] + (["λ_max"] if eig else [])
        lines = [
            "| " + " | ".join(head) + " |",
            "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |",
        ]
        for r in self.rows:
            cells = [
                r.name,
                _fmt(r.grad_norm),
                _fmt(r.trace, r.trace_stderr),
                _fmt(r.normalized_trace, r.normalized_trace_stderr),
            ]
            if eig:
                cells.append(_fmt(r.top_eigenvalue))
            lines.append("| " + " | ".join(cells) + " |")
        note = (
            f"\n{self.n_examples} examples, {self.n_probes} Hutchinson probes (seed {self.seed}); "
            "± is the estimator's standard error."
        )
        return "\n".join(lines) + "\n" + note + "\n"

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "n_probes": self.n_probes,
                "seed": self.seed,
                "n_examples": self.n_examples,
                "rows": [asdict(r) for r in self.rows],
            }
        )

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``<path>.md`` and ``<path>.json`` (a ``.md``/``.json`` suffix on ``path`` is
        replaced); returns the two paths."""
        p = Path(path)
        base = p.with_suffix("") if p.suffix in (".md", ".json") else p
        md, js = Path(f"{base}.md"), Path(f"{base}.json")
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(self.to_markdown(), encoding="utf-8")
        js.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", "utf-8")
        return md, js

    def __str__(self) -> str:
        return self.to_markdown()


def sharpness_report(
    models: Mapping[str, nn.Module],
    loss_fn: LossFn,
    data: Data,
    *,
    n_probes: int = 100,
    seed: int = 0,
    top_eigenvalue: bool = False,
    tol: float = 1e-3,
    max_iter: int = 100,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
    path: str | os.PathLike[str] | None = None,
    show: bool = True,
) -> SharpnessReport:
    """Model geometry of several models on the same data: CR-SAM (Wu et al. 2024) Table 3.

    For each ``name -> model`` (the name is the table's "optimizer" column): ``||grad L||``,
    ``Tr(H)`` (Hutchinson, ``n_probes`` Rademacher probes; the same ``seed``, hence the same
    probes, for every model) and ``C(w) = Tr(H)/||grad L||`` from one
    :func:`normalized_hessian_trace` call; with ``top_eigenvalue=True`` also
    :func:`top_hessian_eigenvalue` (``tol``, ``max_iter``). Prints the Markdown table when
    ``show``; with ``path`` saves it as ``<path>.md`` and ``<path>.json``.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping of name -> nn.Module")
    check_int("n_probes", n_probes, 1)
    rows = []
    n_examples = 0
    for name, model in models.items():
        c = normalized_hessian_trace(
            model,
            loss_fn,
            data,
            n_probes=n_probes,
            seed=seed,
            device=device,
            progress=progress,
            eval_mode=eval_mode,
        )
        n_examples = c.n_examples
        eig = None
        if top_eigenvalue:
            eig = top_hessian_eigenvalue(
                model,
                loss_fn,
                data,
                tol=tol,
                max_iter=max_iter,
                seed=seed,
                device=device,
                progress=progress,
                eval_mode=eval_mode,
            )
        rows.append(
            SharpnessRow(
                name=str(name),
                loss=c.loss,
                grad_norm=c.grad_norm,
                trace=c.trace,
                trace_stderr=c.trace_stderr,
                normalized_trace=c.estimate,
                normalized_trace_stderr=c.stderr,
                top_eigenvalue=None if eig is None else eig.estimate,
                top_eigenvalue_residual=None if eig is None else eig.residual,
            )
        )
    report = SharpnessReport(rows=tuple(rows), n_probes=n_probes, seed=seed, n_examples=n_examples)
    if path is not None:
        report.save(path)
    if show:
        print(report.to_markdown())
    return report
