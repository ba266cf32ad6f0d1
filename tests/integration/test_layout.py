"""The design card's layering: csrc -> sam_kernels -> python_api; nothing points back up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_sam_kernels_does_not_import_upward():
    bad = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"python_api", "benchmarks", "tests"})
        for p in (ROOT / "sam_kernels").rglob("*.py")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_python_api_does_not_import_benchmarks_or_tests():
    bad = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"benchmarks", "tests"})
        for p in (ROOT / "python_api").rglob("*.py")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_csrc_is_torch_free_in_cuda_kernels():
    """The .cu kernels take raw pointers: no torch headers, so plain nvcc compiles them."""
    for cu in (ROOT / "csrc").glob("*.cu"):
        text = cu.read_text(encoding="utf-8")
        assert "torch/" not in text and "ATen/" not in text, cu.name


def test_import_never_needs_triton_or_the_extension():
    """`import sam_kernels, python_api` works with triton and the extension unimportable."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['sam_kernels._C'] = None\n"
        "import torch, sam_kernels, python_api\n"
        "assert not sam_kernels.available('triton', 'cpu')\n"
        "g = [torch.ones(3)]\n"
        "assert float(sam_kernels.grad_norm(g)) > 1.7\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def _private_uses(path: Path) -> list[str]:
    """``from sam_kernels.<module> import ...``, ``import sam_kernels.<module>`` and
    ``sk._name`` / ``sam_kernels._name`` attribute reads in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("sam_kernels."):
                out.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.module == "sam_kernels":
                out += [f"line {node.lineno}: {a.name}" for a in node.names if a.name[0] == "_"]
        elif isinstance(node, ast.Import):
            out += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("sam_kernels.")
            ]
        elif (
            isinstance(node, ast.Attribute) and node.attr.startswith("_") and node.attr[:2] != "__"
        ):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("sk", "sam_kernels"):
                out.append(f"line {node.lineno}: {base.id}.{node.attr}")
    return out


def test_python_api_and_benchmarks_use_only_public_sam_kernels_names():
    """Issue 16: what python_api and the benchmarks use of sam_kernels is its public
    interface (``sam_kernels.__all__``), so the ops can be reorganised behind it."""
    import sam_kernels

    bad = {}
    for folder in ("python_api", "benchmarks"):
        for p in (ROOT / folder).rglob("*.py"):
            uses = _private_uses(p)
            tree = ast.parse(p.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "sam_kernels":
                    uses += [
                        f"line {node.lineno}: {a.name} (not in sam_kernels.__all__)"
                        for a in node.names
                        if a.name not in sam_kernels.__all__ and a.name != "__version__"
                    ]
            if uses:
                bad[str(p.relative_to(ROOT))] = uses
    assert not bad, bad
