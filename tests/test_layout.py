"""The design card's layering: csrc -> sam_kernels -> python_api; nothing points back up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
