"""The ``sam-demo`` command line: the argument parser, and :func:`main`, which maps bad input
to one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from python_api.demo.compare import DIGITS_DEFAULTS, IMAGE_DEFAULTS, run
from python_api.demo.errors import EXIT_USAGE, PROG, DemoError
from python_api.demo.models import MODELS


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises :class:`DemoError` instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DemoError(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only where the default is a value (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> _Parser:
    """The ``sam-demo`` argument parser."""
    from python_api import demo  # through the package: see compare.run

    reg = demo.optimizer_registry()
    p = _Parser(
        prog=PROG,
        description=(
            "Train a small model with the base optimizer and the SAM family on label-noised "
            "data, then print and save a comparison table and plot. Default: scikit-learn's "
            "bundled digits (no download), 30% label noise, all optimizers, 3 seeds, a few "
            "minutes on a 2-core CPU."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--data",
        default="digits",
        help="digits | imagefolder:PATH (torchvision ImageFolder layout) | cifar10:PATH | "
        "cifar100:PATH (python-format pickles already on disk; never downloaded)",
    )
    p.add_argument(
        "--model",
        default="auto",
        choices=MODELS,
        help="auto: mlp on digits, resnet18 on user images (cnn without torchvision)",
    )
    p.add_argument(
        "--optimizers",
        default="all",
        help="comma-separated subset of: sgd (the base optimizer alone), "
        + ", ".join(k for k in reg if k != "base")
        + "; or all",
    )
    p.add_argument(
        "--base",
        default="sgd",
        choices=("sgd", "adamw"),
        help="base optimizer (SGD with momentum 0.9, or AdamW)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.3,
        help="fraction of training labels replaced by a wrong class, in [0, 1)",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per run (default {DIGITS_DEFAULTS['epochs']} on digits, "
        f"{IMAGE_DEFAULTS['epochs']} on user data)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"default {DIGITS_DEFAULTS['batch_size']} on digits, "
        f"{IMAGE_DEFAULTS['batch_size']} on user data",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop each run after this many steps (a quick smoke run)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base learning rate (default 0.1 for SGD, 1e-3 for AdamW); cosine decay",
    )
    p.add_argument(
        "--weight-decay", type=float, default=None, help="default 5e-4 for SGD, 0.05 for AdamW"
    )
    p.add_argument(
        "--rho",
        default=None,
        metavar="NAME=RHO,...",
        help="override the demo's rho for some optimizers, e.g. sam=0.1,asam=1.0",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="imagefolder: images are resized and center-cropped to this size",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda when present (the digits MLP is faster on the CPU, but the fused vs "
        "eager timing needs cuda)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 on digits, whose tiny matrices gain nothing from "
        "more and lose much when cores are shared; torch's default on user data)",
    )
    p.add_argument(
        "--sharpness",
        type=int,
        nargs="?",
        const=50,
        default=0,
        metavar="PROBES",
        help="after training, print and save CR-SAM Table-3 model geometry (||grad L||, Tr(H), "
        "C(w)) of each optimizer's seed-0 model on the training set, with PROBES Hutchinson "
        "probes (default 50 when given without a number)",
    )
    p.add_argument(
        "--no-fused-timing",
        action="store_true",
        help="skip the fused (triton) vs eager timing on CUDA",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: a new timestamped folder under ./demo_out)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sam-demo``; returns the exit code (2 for bad input)."""
    parser = build_parser()
    threads = torch.get_num_threads()
    try:
        args = parser.parse_args(argv)
        return run(args)
    except DemoError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger process (tests)
