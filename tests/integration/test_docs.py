"""docs/algorithms.md stays true to the code, and the README links only inside the repository.

The page's hyper-parameter tables (header ``| class | hyper-parameter | default | ...``) and its
table of shared keywords (header ``| keyword | default | ...``) are parsed and every default is
compared with ``inspect.signature`` of the class.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import python_api

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "algorithms.md"
README = ROOT / "README.md"

#: keyword arguments every class documents once, in the shared table
SHARED = ("model", "on_nonfinite", "backend", "process_group", "max_grad_norm")
#: constructor arguments that are not hyper-parameters
NOT_HYPER = ("self", "params", "base_optimizer")


def _optimizer_classes() -> dict[str, type]:
    out = {}
    for name in python_api.__all__:
        obj = getattr(python_api, name)
        if (
            inspect.isclass(obj)
            and issubclass(obj, torch.optim.Optimizer)  # SAMFamily's and the standalone ones
            and obj is not python_api.SAMFamily
        ):
            out[name] = obj
    return out


def _resolve(name: str) -> type | None:
    """A documented class: exported from python_api, or in its own module (python_api.gsam).

    ``None`` when neither exists and no ``python_api/<name>.py`` file does (a class documented
    ahead of its module landing); a module that exists must define the class.
    """
    obj = getattr(python_api, name, None)
    if obj is None:
        if not (ROOT / "python_api" / f"{name.lower()}.py").exists():
            return None
        obj = getattr(importlib.import_module(f"python_api.{name.lower()}"), name)
    assert inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer), name
    return obj


def _tables(text: str, header: tuple[str, ...]) -> list[list[str]]:
    """Rows (cells stripped, backticks removed) of every table whose header starts so."""
    rows: list[list[str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
        if tuple(cells[: len(header)]) == header:
            i += 2  # the header and its --- line
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                row = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append([c[1:-1] if c.startswith("`") and c.endswith("`") else c for c in row])
                i += 1
        else:
            i += 1
    return rows


def _same(doc_value: str, default: object) -> bool:
    value = ast.literal_eval(doc_value)
    return type(value) is type(default) and value == default


def _hyper_parameters(cls: type) -> dict[str, object]:
    sig = inspect.signature(cls.__init__)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in NOT_HYPER and n not in SHARED and p.kind is not p.VAR_KEYWORD
    }


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def documented(doc) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for row in _tables(doc, ("class", "hyper-parameter", "default")):
        cls, name, value = row[:3]
        assert name not in out.setdefault(cls, {}), f"{cls}.{name} documented twice"
        out[cls][name] = value
    assert out, "no hyper-parameter table found in docs/algorithms.md"
    return out


def test_every_optimizer_class_has_a_section(doc):
    headings = [line for line in doc.splitlines() if line.startswith("#")]
    classes = _optimizer_classes()
    # SAM (ASAM), CRSAM, AESAM, AELookSAM, LookSAM, SSSAM, ESAM, FrobSAM, TraceSAM, DetSAM
    assert len(classes) >= 10
    missing = [n for n in classes if not any(f"`{n}`" in h for h in headings)]
    assert not missing, f"no section of docs/algorithms.md names {missing}"


def test_every_optimizer_class_has_its_defaults_documented(documented):
    missing = sorted(set(_optimizer_classes()) - set(documented))
    assert not missing, f"no hyper-parameter table rows for {missing}"


def test_documented_defaults_match_the_signatures(documented):
    wrong = []
    for cls_name, rows in documented.items():
        cls = _resolve(cls_name)
        if cls is None:
            continue
        want = _hyper_parameters(cls)
        if set(rows) != set(want):
            wrong.append(f"{cls_name}: documented {sorted(rows)}, signature {sorted(want)}")
            continue
        for name, value in rows.items():
            if want[name] is inspect.Parameter.empty:
                wrong.append(f"{cls_name}.{name} has no default")
            elif not _same(value, want[name]):
                wrong.append(f"{cls_name}.{name}: documented {value}, code {want[name]!r}")
    assert not wrong, "\n".join(wrong)


def test_shared_keywords_match_the_signatures(doc, documented):
    rows = {r[0]: r[1] for r in _tables(doc, ("keyword", "default"))}
    assert set(rows) == set(SHARED)
    wrong = []
    for cls_name in documented:
        cls = _resolve(cls_name)
        if cls is None:
            continue
        sig = inspect.signature(cls.__init__).parameters
        for name, value in rows.items():
            if name in sig and not _same(value, sig[name].default):
                wrong.append(f"{cls_name}.{name}: documented {value}, code {sig[name].default!r}")
    assert not wrong, "\n".join(wrong)


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", [README, DOC], ids=lambda p: p.name)
def test_links_stay_inside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    if path is README:
        assert "../" not in text, "README.md points outside the repository's tree"
    root = ROOT.resolve()
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor
        dest = (path.parent / target.split("#")[0]).resolve()
        assert dest.is_relative_to(root), f"{path.name} links {target}, outside the repository"
        assert dest.exists(), f"{path.name} links {target}, which does not exist"


def test_readme_links_the_algorithms_page():
    assert "(docs/algorithms.md)" in README.read_text(encoding="utf-8")


def test_readme_algorithm_table_is_the_optimizer_table():
    """The README's algorithm table is python_api/optimizer_table.py's listed rows, in its order:
    the class (with the arguments that make the row), paper, reference code, defaults and
    passes per step."""
    from python_api.optimizer_table import listed

    header = ("class", "paper", "reference code", "defaults", "passes / step")
    got = [
        [c.replace("`", "") for c in row[:5]]
        for row in _tables(README.read_text(encoding="utf-8"), header)
    ]
    want = []
    for o in listed():
        # a class the row specialises is named with its label: SAM(adaptive=True) (ASAM)
        name = f"{o.readme_name} ({o.label})" if o.kwargs else o.readme_name
        want.append([name, o.paper, o.reference or "—", o.defaults, o.passes_text])
    assert got == want
