"""Build script: the Python packages, plus the optional compiled extension (csrc/).

The extension ``sam_kernels._C`` holds the fused ops as torch custom ops
(``torch.ops.sam_kernels_C``) with a CPU implementation (C++/OpenMP) and, when a CUDA toolchain
and a CUDA build of torch are present, a CUDA implementation (multi-tensor kernels). It is
optional: when torch cannot be imported at build time, or no compiler / CUDA toolchain is
usable, the install still succeeds and the package runs on its Triton / eager backends.

Environment variables:
  SAM_KERNELS_NO_EXT=1     skip the extension entirely
  SAM_KERNELS_NO_CUDA=1    build only the CPU part even where CUDA is available
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0": A100 and H100)
  MAX_JOBS                 parallel compile jobs (ninja)

Install with ``pip install -e . --no-build-isolation`` (or ``pip install . --no-build-isolation``)
so that the build sees the torch you installed; an isolated build has no torch and skips the
extension.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "sam_kernels._C"
IDENTITY_NAME = "sam_kernels._identity"
CPU_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/cpu_ops.cpp",
    "csrc/cpu_filter_noise.cpp",
    "csrc/cpu_looksam.cpp",
    "csrc/step_plan.cpp",
    "csrc/plan_glue.cpp",
    "csrc/universal_plan.cpp",
    "csrc/scalar_glue.cpp",
    "csrc/list_ops.cpp",
]
CUDA_SOURCES = ["csrc/cuda_glue.cpp"] + sorted(
    os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cu"))
)
DEFAULT_ARCH_LIST = "8.0;9.0"


def _say(msg: str) -> None:
    print(f"sam-kernels setup: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_wanted(torch, cpp_extension) -> tuple[bool, str]:
    if _flag("SAM_KERNELS_NO_CUDA"):
        return False, "SAM_KERNELS_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    if home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, f"no nvcc under CUDA_HOME={home}"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit {home}"


def _make_extension(torch, cpp_extension, cuda: bool):
    # -ffp-contract=off: no a*b+c contracted into an FMA (the CPU kernels must round like the
    # eager reference); -fno-math-errno: sqrtf without an errno branch, so loops using it
    # vectorise (torch builds with it too; results are the same); -fno-trapping-math: no
    # floating-point trap is enabled in a torch process, so the compiler may compute both sides
    # of a select (the noise contract's log and cos, whose branches it kept as jumps: the
    # normal-noise loop ran scalar, 33 ns per element, 9 ns vectorised; every operation still
    # rounds as written, tests/ops/test_noise_contract.py)
    cxx = [
        "-O3",
        "-g0",
        "-fopenmp",
        "-ffp-contract=off",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-Wno-unused-parameter",
    ]
    link = ["-fopenmp"]
    if not cuda:
        return cpp_extension.CppExtension(
            EXT_NAME,
            CPU_SOURCES,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return cpp_extension.CUDAExtension(
        EXT_NAME,
        CPU_SOURCES + CUDA_SOURCES,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("SAM_KERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        extra_link_args=link,
    )


def _identity_extension():
    # the plans' identity checks (csrc/py_identity.cpp): a plain CPython module, no torch
    from setuptools import Extension

    return Extension(IDENTITY_NAME, ["csrc/py_identity.cpp"], extra_compile_args=["-O2", "-g0"])


def _extension_setup() -> dict:
    """ext_modules / cmdclass for setup(), or nothing when the extension is skipped."""
    if _flag("SAM_KERNELS_NO_EXT"):
        _say("SAM_KERNELS_NO_EXT is set: not building the compiled extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in this (isolated?) build environment
        _say(
            f"torch is not importable at build time ({type(exc).__name__}: {exc}); not building "
            "the compiled extension. Install torch first, then "
            "`pip install . --no-build-isolation` to build it."
        )
        return {}

    cuda, why = _cuda_wanted(torch, cpp_extension)
    _say(
        ("building the CPU and CUDA extension: " if cuda else "building the CPU extension: ") + why
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension that never fails the install: CUDA -> CPU -> no extension."""

        def run(self) -> None:
            attempts = [cuda, False] if cuda else [False]
            for i, with_cuda in enumerate(attempts):
                if i > 0:
                    self.extensions = [
                        _make_extension(torch, cpp_extension, with_cuda),
                        _identity_extension(),
                    ]
                try:
                    super().run()
                    _say("built " + ("the CPU+CUDA" if with_cuda else "the CPU") + " extension")
                    return
                except Exception as exc:
                    part = "CPU+CUDA" if with_cuda else "CPU"
                    _say(f"building the {part} extension failed: {type(exc).__name__}: {exc}")
            _say(
                "continuing WITHOUT the compiled extension: sam_kernels runs on its Triton / "
                "eager backends (backend='cuda' is unavailable)."
            )
            self.extensions = []

        def build_extension(self, ext) -> None:
            if ext.name != IDENTITY_NAME:
                return super().build_extension(ext)
            try:  # a helper the package runs without (Python versions): never fails the rest
                super().build_extension(ext)
            except Exception as exc:
                _say(f"building {IDENTITY_NAME} failed ({type(exc).__name__}: {exc}); the step "
                     "plans' identity checks run as Python")  # fmt: skip
                self.extensions = [e for e in self.extensions if e.name != IDENTITY_NAME]

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    build_ext = OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)
    return {
        "ext_modules": [_make_extension(torch, cpp_extension, cuda), _identity_extension()],
        "cmdclass": {"build_ext": build_ext},
    }


setup(**_extension_setup())
