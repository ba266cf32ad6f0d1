"""``sam-demo``: train and compare the SAM family on real data, in one command.

The default run needs no GPU and no internet: a small MLP learns scikit-learn's bundled digits
(1797 8x8 images, 10 classes; a fixed 1437/360 train/test split) with 30% of the training labels
replaced by a wrong class, once with the base optimizer (SGD with momentum) and once with every
optimizer of the set, for three seeds. It prints a table (test accuracy mean +- std over the
seeds, final train loss, % of SAM steps, forward/backward passes per step, wall time, and, on a
CUDA device, the speed of the fused kernels against the eager path) and writes the table as
Markdown and JSON and a PNG plot of the curves to an output folder whose path it prints last.

A user's own data: ``--data imagefolder:PATH`` (torchvision ``ImageFolder`` layout) or
``--data cifar10:PATH`` / ``--data cifar100:PATH`` (the python-format pickles, already on disk),
with ``--model resnet18`` or ``--model vit`` (torchvision / timm, when installed), on the GPU
when there is one. Nothing is ever downloaded.

Bad input (a missing or malformed data folder, an unknown optimizer, a noise rate outside
[0, 1), ...) prints one line on stderr and returns exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import inspect
import json
import math
import pickle
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from python_api.optimizer_table import listed

PROG = "sam-demo"
EXIT_USAGE = 2

# --------------------------------------------------------------------------- errors


class DemoError(Exception):
    """Bad input: reported as one line on stderr with exit code 2 (never a traceback)."""


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


# --------------------------------------------------------------------------- optimizer set


@dataclass(frozen=True)
class Method:
    """One optimizer of the comparison.

    Attributes:
        key: the name used on the command line.
        label: the name shown in the table.
        module, cls: where the class lives (imported lazily); ``None`` for the base optimizer.
        kwargs: the method's own hyper-parameters for this demo (rho first).
        adaptive: whether the method decides per step between a SAM and an ERM step (AE-SAM,
            AE-LookSAM, LookSAM, SS-SAM), so that its % of SAM steps is measured, not fixed.
        total_steps: whether the constructor takes ``total_steps`` (the AE schedules).
        seeded: whether the constructor takes ``seed`` (its own random generator).
        per_example: ESAM's closure contract (forward only, per-example losses).
        standalone: the base optimizer the class replaces (Momentum-SAM), else ``None``.
    """

    key: str
    label: str
    module: str | None
    cls: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    adaptive: bool = False
    total_steps: bool = False
    seeded: bool = False
    per_example: bool = False
    standalone: str | None = None


#: The demo's hyper-parameters per method for this tiny problem (an MLP with two hidden layers
#: of 256 units on the 8x8 digits, inputs in [0, 1], SGD lr 0.1 with cosine decay, 30% label
#: noise). rho 0.1 for every method that perturbs along the gradient (SAM, CR-SAM, AE-SAM,
#: AE-LookSAM, LookSAM, SS-SAM, ESAM): the spec's default for CR-SAM, LookSAM and AE-LookSAM,
#: the SAM paper's upper CIFAR value, and on this problem better than 0.05 for SAM (3 seeds:
#: 95.6% vs 94.8% test accuracy; SGD 92.9%); one shared value so that the variants differ only
#: in their rule. ASAM's scale-invariant neighbourhood needs a larger radius: 1.0 (0.5 gave
#: 94.7%; its authors use 2.0 on CIFAR). Frob-, Trace- and Det-SAM keep the spec's defaults
#: (the reference README's CIFAR-10 commands). Every other hyper-parameter is the spec's
#: default. ``--rho NAME=VALUE`` overrides rho.
#: (the values are the ``demo_kwargs`` of python_api/optimizer_table.py)
DEMO_HPARAMS: dict[str, dict[str, Any]] = {o.key: dict(o.demo_kwargs) for o in listed()}

#: Accepted spellings of the base optimizer alone in ``--optimizers``.
BASE_ALIASES = ("base", "sgd", "adamw", "erm")


def optimizer_registry() -> dict[str, Method]:
    """The optimizer set, in table order; classes are imported only when a run needs them."""
    methods = [Method("base", "base", None, None)] + [
        Method(
            o.key,
            o.label,
            o.module,
            o.cls,
            DEMO_HPARAMS[o.key],
            adaptive=o.switching,
            total_steps=o.total_steps,
            seeded=o.seeded,
            per_example=o.closure == "forward-only",
            standalone=o.standalone,
        )
        for o in listed()
    ]
    return {m.key: m for m in methods}


def load_optimizer_class(method: Method) -> type[torch.optim.Optimizer]:
    """Import the class of ``method`` (raises ImportError/AttributeError when it is missing)."""
    assert method.module is not None and method.cls is not None
    return getattr(importlib.import_module(method.module), method.cls)


def _optimizer_missing(method: Method) -> str | None:
    """Why ``method`` cannot run in this install, or None when it can."""
    if method.module is None:
        return None
    try:
        load_optimizer_class(method)
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def parse_optimizers(spec: str, registry: dict[str, Method]) -> tuple[list[str], bool]:
    """``"sgd,sam,asam"`` -> registry keys (base first); the flag tells whether "all" was asked."""
    names = [_normalise_name(s) for s in spec.split(",") if s.strip()]
    if not names:
        raise DemoError("--optimizers is empty")
    if names == ["all"]:
        return list(registry), True
    keys: list[str] = []
    for n in names:
        key = "base" if n in BASE_ALIASES else n
        if key not in registry:
            known = ", ".join(["sgd (or base)"] + [k for k in registry if k != "base"] + ["all"])
            raise DemoError(f"unknown optimizer {n!r} in --optimizers; known: {known}")
        if key not in keys:
            keys.append(key)
    return sorted(keys, key=list(registry).index), False


def parse_rho_overrides(spec: str | None, registry: dict[str, Method]) -> dict[str, float]:
    """``"sam=0.1,asam=1.0"`` -> ``{"sam": 0.1, "asam": 1.0}``."""
    out: dict[str, float] = {}
    if not spec:
        return out
    for item in spec.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        key = _normalise_name(name)
        if not sep or key not in registry or key == "base":
            raise DemoError(f"--rho expects NAME=VALUE with a SAM-family name, got {item!r}")
        try:
            rho = float(value)
        except ValueError:
            raise DemoError(f"--rho {item!r}: {value!r} is not a number") from None
        if not (rho >= 0.0 and math.isfinite(rho)):
            raise DemoError(f"--rho {item!r}: rho must be a finite number >= 0")
        out[key] = rho
    return out


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """A data set held in memory (on the training device).

    Images are ``(N, C, H, W)``: float in [0, 1] for digits, uint8 for user images (normalised
    per batch with ``mean``/``std``). ``y_train`` holds the clean labels; noise is per seed.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    augment: bool = False

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def to(self, device: torch.device) -> Data:
        """Move every tensor to ``device``."""
        for name in ("x_train", "y_train", "x_test", "y_test", "mean", "std"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def prepare(self, x: torch.Tensor, train: bool, gen: torch.Generator | None = None):
        """Batch to model input: float, normalised, augmented (flip + padded crop) if asked."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        if train and self.augment:
            x = _augment(x, gen)
        return x


def _augment(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip and random crop with 4-pixel zero padding (CIFAR's recipe)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen, device="cpu") < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    pad = 4
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device="cpu").to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def load_digits_data(test_size: int = 360, split_seed: int = 0) -> Data:
    """scikit-learn's bundled digits, with a fixed stratified train/test split (1437/360)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DemoError(
            "the digits demo needs scikit-learn (pip install scikit-learn, or "
            "pip install 'sam-kernels[demo]')"
        ) from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N,1,8,8)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = list(range(len(y)))
    tr, te = train_test_split(idx, test_size=test_size, random_state=split_seed, stratify=y)
    tr_t, te_t = torch.tensor(sorted(tr)), torch.tensor(sorted(te))
    return Data("digits", x[tr_t], y[tr_t], x[te_t], y[te_t], num_classes=10)


_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DemoError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DemoError(f"{path} is not a CIFAR python-format batch (not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar(kind: str, path: str) -> Data:
    """CIFAR-10/100 from the python-format pickles already on disk (never downloads).

    ``path`` is the folder holding the batches (``cifar-10-batches-py`` / ``cifar-100-python``)
    or its parent. The files are read with :mod:`pickle`, like the official loader: use only
    files from a source you trust.
    """
    import numpy as np

    root = Path(path).expanduser()
    if not root.exists():
        raise DemoError(f"--data {kind}:{path}: no such folder")
    if not root.is_dir():
        raise DemoError(f"--data {kind}:{path}: not a folder")
    if kind == "cifar10":
        sub, label_key, num_classes = "cifar-10-batches-py", "labels", 10
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        sub, label_key, num_classes = "cifar-100-python", "fine_labels", 100
        train_files, test_files = ["train"], ["test"]
    if not (root / test_files[0]).exists() and (root / sub).is_dir():
        root = root / sub
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise DemoError(
            f"--data {kind}:{path}: missing {', '.join(missing)} (expected the python-format "
            f"files of {sub}/ in that folder)"
        )

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for f in files:
            d = _unpickle(root / f)
            if "data" not in d or label_key not in d:
                raise DemoError(f"{root / f}: no 'data' / '{label_key}' entries (not {kind}?)")
            data = np.asarray(d["data"], dtype=np.uint8)
            labels = np.asarray(d[label_key], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise DemoError(f"{root / f}: unexpected shape {data.shape} (want N x 3072)")
            xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            ys.append(torch.from_numpy(labels))
        return torch.cat(xs), torch.cat(ys)

    x_tr, y_tr = read(train_files)
    x_te, y_te = read(test_files)
    if int(y_tr.min()) < 0 or int(max(y_tr.max(), y_te.max())) >= num_classes:
        raise DemoError(f"--data {kind}:{path}: labels outside 0..{num_classes - 1}")
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
    return Data(kind, x_tr, y_tr, x_te, y_te, num_classes, mean, std, augment=True)


def load_image_folder(
    path: str, image_size: int, split_seed: int = 0, progress: bool = True
) -> Data:
    """A torchvision ``ImageFolder`` tree, resized to ``image_size`` and held in memory.

    ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) are used as the split when present;
    otherwise ``PATH/<class>/<image>`` is split 80/20 with a fixed seed.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DemoError(f"--data imagefolder:{path}: no such folder")
    if not root.is_dir():
        raise DemoError(f"--data imagefolder:{path}: not a folder")
    try:
        from torchvision import datasets, transforms
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise DemoError(
            f"--data imagefolder needs torchvision, which cannot be imported here "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); install "
            "the torchvision that matches your torch"
        ) from None
    tf = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.PILToTensor(),
        ]
    )

    def open_folder(p: Path):
        try:
            return datasets.ImageFolder(str(p), transform=tf)
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            raise DemoError(
                f"--data imagefolder:{p}: not an ImageFolder tree (want <class>/<image> "
                f"subfolders): {str(exc).splitlines()[0]}"
            ) from None

    def to_tensors(ds, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        from tqdm.auto import tqdm

        xs, ys = [], []
        for i in tqdm(range(len(ds)), desc=desc, leave=False, disable=not progress):
            try:
                img, label = ds[i]
            except Exception as exc:
                raise DemoError(
                    f"cannot read image {ds.samples[i][0]}: {type(exc).__name__}: {exc}"
                ) from None
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            xs.append(img[:3])
            ys.append(label)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        tr_ds, te_ds = open_folder(root / "train"), open_folder(test_dir)
        if tr_ds.classes != te_ds.classes:
            raise DemoError(
                f"--data imagefolder:{path}: train/ and {test_dir.name}/ have different classes"
            )
        x_tr, y_tr = to_tensors(tr_ds, "reading train images")
        x_te, y_te = to_tensors(te_ds, "reading test images")
        num_classes = len(tr_ds.classes)
    else:
        ds = open_folder(root)
        if len(ds) < 10:
            raise DemoError(f"--data imagefolder:{path}: only {len(ds)} images; need 10 or more")
        x, y = to_tensors(ds, "reading images")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
        n_test = max(1, len(y) // 5)
        te_i, tr_i = perm[:n_test], perm[n_test:]
        x_tr, y_tr, x_te, y_te = x[tr_i], y[tr_i], x[te_i], y[te_i]
        num_classes = len(ds.classes)
    if num_classes < 2:
        raise DemoError(f"--data imagefolder:{path}: needs at least 2 class folders")
    xf = x_tr.float().div_(255.0)
    mean = xf.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, 3, 1, 1)
    return Data(f"imagefolder:{root.name}", x_tr, y_tr, x_te, y_te, num_classes, mean, std, True)


def load_data(spec: str, image_size: int, progress: bool = True) -> Data:
    """``digits`` | ``imagefolder:PATH`` | ``cifar10:PATH`` | ``cifar100:PATH``."""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        return load_digits_data()
    if kind in ("imagefolder", "cifar10", "cifar100"):
        if not path:
            raise DemoError(f"--data {kind} needs a path: --data {kind}:PATH")
        if kind == "imagefolder":
            return load_image_folder(path, image_size, progress=progress)
        return load_cifar(kind, path)
    raise DemoError(
        f"unknown --data {spec!r}; expected digits, imagefolder:PATH, cifar10:PATH or cifar100:PATH"
    )


def add_label_noise(
    y: torch.Tensor, rate: float, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """Symmetric label noise: exactly ``round(rate * N)`` labels changed to another class.

    The examples to corrupt are drawn without replacement, and each gets a class drawn
    uniformly among the ``num_classes - 1`` wrong ones, so the fraction of changed labels is the
    rate (up to rounding).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    y = y.clone()
    k = int(round(rate * y.numel()))
    if k == 0 or num_classes < 2:
        return y
    idx = torch.randperm(y.numel(), generator=generator)[:k].to(y.device)
    shift = torch.randint(1, num_classes, (k,), generator=generator).to(y.device)
    y[idx] = (y[idx] + shift) % num_classes
    return y


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ReLU layers of ``width`` units."""

    def __init__(self, in_features: int, num_classes: int, width: int = 256, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU blocks with 2x2 pooling and a linear head (digits: 8x8 -> 2x2)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


MODELS = ("auto", "mlp", "cnn", "resnet18", "vit")


def _import_torchvision_models(what: str):
    try:
        import torchvision.models as tvm
    except Exception as exc:
        raise DemoError(
            f"--model {what} needs torchvision, which cannot be imported here "
            f"({type(exc).__name__}); install the torchvision that matches your torch, or use "
            "--model cnn"
        ) from None
    return tvm


def check_model_available(name: str) -> None:
    """Fail early (before any data is read) when ``--model`` needs a missing package."""
    if name == "resnet18":
        _import_torchvision_models(name)
    elif name == "vit":
        try:
            import timm  # noqa: F401
        except Exception:
            _import_torchvision_models(name)


def resolve_model_name(name: str, data: Data) -> str:
    """``auto``: an MLP on digits; ResNet-18 on user images when torchvision is there, else CNN."""
    if name != "auto":
        return name
    if data.name == "digits":
        return "mlp"
    try:
        import torchvision.models  # noqa: F401
    except Exception:
        return "cnn"
    return "resnet18"


def build_model(name: str, data: Data) -> nn.Module:
    """A freshly initialised model (random weights only: no pretrained download)."""
    c, h, w = data.image_shape
    k = data.num_classes
    if name == "mlp":
        return MLP(c * h * w, k)
    if name == "cnn":
        return SmallCNN(c, k)
    if name == "resnet18":
        tvm = _import_torchvision_models(name)
        model = tvm.resnet18(weights=None, num_classes=k)
        if max(h, w) <= 64:  # CIFAR-style stem for small images
            model.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif c != 3:
            model.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
        return model
    if name == "vit":
        if h != w:
            raise DemoError(f"--model vit needs square images, got {h}x{w}")
        patch = 4 if h <= 64 else 16
        if h % patch:
            raise DemoError(f"--model vit: image size {h} is not a multiple of patch {patch}")
        try:
            import timm

            return timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                num_classes=k,
                img_size=h,
                patch_size=patch,
                in_chans=c,
            )
        except ImportError:
            pass
        tvm = _import_torchvision_models(name)
        if c != 3:
            raise DemoError("--model vit (torchvision) needs 3-channel images")
        return tvm.VisionTransformer(
            image_size=h,
            patch_size=patch,
            num_layers=6,
            num_heads=6,
            hidden_dim=192,
            mlp_dim=768,
            num_classes=k,
        )
    raise DemoError(f"unknown --model {name!r}; expected one of {', '.join(MODELS)}")


# --------------------------------------------------------------------------- training


@dataclass
class RunConfig:
    """Everything a single (optimizer, seed) run needs besides the data."""

    model: str
    base: str
    lr: float
    momentum: float
    weight_decay: float
    epochs: int
    batch_size: int
    max_steps: int | None
    noise: float
    device: torch.device
    progress: bool
    rho_overrides: dict[str, float]


@dataclass
class RunResult:
    """The outcome of one (optimizer, seed) run."""

    test_acc: list[float]  # per epoch, in %
    train_loss: list[float]  # per epoch: mean minibatch loss at w (noisy labels)
    steps: int
    closure_calls: int
    sam_fraction: float | None  # in [0, 1]
    wall_s: float
    noisy_fraction: float
    model: nn.Module | None = field(default=None, repr=False)  # the trained model


def base_optimizer(cfg: RunConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The base optimizer class and its keyword arguments."""
    if cfg.base == "sgd":
        return torch.optim.SGD, {
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
        }
    return torch.optim.AdamW, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}


def method_kwargs(method: Method, cfg: RunConfig, seed: int, total_steps: int) -> dict[str, Any]:
    """The method's own keyword arguments for one run (demo values, overrides, seed, T)."""
    kw = dict(method.kwargs)
    if method.key in cfg.rho_overrides:
        kw["rho"] = cfg.rho_overrides[method.key]
    if method.total_steps:
        kw["total_steps"] = total_steps
    if method.seeded:
        kw["seed"] = seed
    return kw


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls.__init__`` names ``name`` (not merely through ``**kwargs``)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(name)
    return p is not None and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)


def make_optimizer(
    method: Method,
    model: nn.Module,
    cfg: RunConfig,
    seed: int,
    total_steps: int,
    backend: str | None = None,
) -> torch.optim.Optimizer:
    """The base optimizer alone, or a SAM-family optimizer wrapping it."""
    base_cls, base_kw = base_optimizer(cfg)
    if method.module is None:
        return base_cls(model.parameters(), **base_kw)
    cls = load_optimizer_class(method)
    kw = method_kwargs(method, cfg, seed, total_steps)
    if _accepts(cls, "model"):
        kw["model"] = model  # BN statistics untouched by the perturbed evaluations
    if backend is not None:
        kw["backend"] = backend
    if method.standalone is not None:  # replaces the base: its lr, momentum, weight decay
        return cls(model.parameters(), **kw, **base_kw)
    return cls(model.parameters(), base_cls, **kw, **base_kw)


def _sam_fraction_attr(opt: torch.optim.Optimizer) -> float | None:
    """The optimizer's own statistic of the fraction of SAM steps, if it exposes one."""
    for name in ("sam_fraction", "sam_ratio", "fraction_sam", "sam_rate", "percent_sam"):
        v = getattr(opt, name, None)
        if v is None:
            continue
        if callable(v):
            v = v()
        if isinstance(v, torch.Tensor):
            v = float(v.item())
        if isinstance(v, (int, float)) and math.isfinite(v):
            return v / 100.0 if name == "percent_sam" or v > 1.0 else float(v)
    return None


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch (the last partial batch is dropped if n > batch)."""
    perm = torch.randperm(n, generator=gen)
    stop = n - n % batch_size if n > batch_size else n
    for i in range(0, stop, batch_size):
        yield perm[i : i + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int = 1024) -> float:
    """Test accuracy in %."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data.y_test), batch_size):
        x = data.prepare(data.x_test[i : i + batch_size], train=False)
        correct += int((model(x).argmax(1) == data.y_test[i : i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(data.y_test)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of optimizer steps in one epoch (see :func:`_batches`)."""
    return n // batch_size if n > batch_size else 1


def noisy_labels(data: Data, rate: float, seed: int) -> torch.Tensor:
    """The training labels of one seed: the same for every optimizer of that seed."""
    return add_label_noise(
        data.y_train, rate, data.num_classes, torch.Generator().manual_seed(10_000 + seed)
    )


def train_one(method: Method, seed: int, data: Data, cfg: RunConfig) -> RunResult:
    """Train a fresh model with one optimizer and one seed; the curves are per epoch."""
    dev = cfg.device
    y_noisy = noisy_labels(data, cfg.noise, seed)
    noisy_fraction = float((y_noisy != data.y_train).float().mean())
    torch.manual_seed(seed)
    model = build_model(cfg.model, data).to(dev)
    model.train()
    n = len(y_noisy)
    spe = steps_per_epoch(n, cfg.batch_size)
    total = spe * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    epochs = math.ceil(total / spe)
    opt = make_optimizer(method, model, cfg, seed, total)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    order_gen = torch.Generator().manual_seed(20_000 + seed)
    aug_gen = torch.Generator().manual_seed(30_000 + seed)

    calls = 0
    loss_sum = torch.zeros((), device=dev)
    loss_n = 0
    first_call = True

    test_acc: list[float] = []
    train_loss: list[float] = []
    step = 0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        desc=f"{method.label if method.module else cfg.base.upper():>10} seed {seed}",
        leave=False,
        disable=not cfg.progress,
        unit="step",
        dynamic_ncols=True,
    )
    try:
        for _epoch in range(epochs):
            for idx in _batches(n, cfg.batch_size, order_gen):
                if step >= total:
                    break
                idx = idx.to(dev)
                x = data.prepare(data.x_train[idx], train=True, gen=aug_gen)
                y = y_noisy[idx]
                first_call = True

                def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    nonlocal calls, loss_sum, loss_n, first_call
                    calls += 1
                    out = model(x)
                    if method.per_example:
                        loss = F.cross_entropy(out, y, reduction="none")
                    else:
                        loss = F.cross_entropy(out, y)
                        loss.backward()
                    if first_call:  # the evaluation at w: the training loss of this batch
                        first_call = False
                        loss_sum = loss_sum + loss.detach().mean()
                        loss_n += 1
                    return loss

                opt.zero_grad(set_to_none=True)
                opt.step(closure)
                sched.step()
                step += 1
                bar.update(1)
            # Momentum-SAM keeps the weights at its moved-down point between steps: evaluate w
            with getattr(opt, "unperturbed", contextlib.nullcontext)():
                test_acc.append(evaluate(model, data))
            train_loss.append(float(loss_sum) / max(loss_n, 1))
            loss_sum = torch.zeros((), device=dev)
            loss_n = 0
            bar.set_postfix(test_acc=f"{test_acc[-1]:.1f}%", loss=f"{train_loss[-1]:.3f}")
    finally:
        bar.close()
    if hasattr(opt, "finalize"):  # Momentum-SAM: leave the trained weights w in the model
        opt.finalize()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    if method.module is None:
        frac: float | None = 0.0
    elif method.adaptive:
        frac = _sam_fraction_attr(opt)
        if frac is None:  # a SAM step costs two closure calls, an ERM step one
            frac = min(max(calls / max(step, 1) - 1.0, 0.0), 1.0)
    else:
        frac = 1.0
    return RunResult(test_acc, train_loss, step, calls, frac, wall, noisy_fraction, model)


def fused_vs_eager(
    method: Method, data: Data, cfg: RunConfig, steps: int = 40, repeats: int = 3
) -> dict[str, float] | None:
    """ms per whole step with ``backend="triton"`` and ``backend="eager"`` on CUDA, or None.

    Same model, batch, seed and hyper-parameters for both; after 5 warm-up steps (Triton's
    compilation), the best of ``repeats`` timings of ``steps`` steps. The step includes the
    forward/backward passes, which the backends share: on a small model those dominate.
    """
    if cfg.device.type != "cuda" or method.module is None:
        return None
    import sam_kernels as sk

    if not sk.available("triton", cfg.device):
        return None
    cls = load_optimizer_class(method)
    if not _accepts(cls, "backend"):
        return None
    idx = torch.arange(min(cfg.batch_size, len(data.y_train)), device=cfg.device)
    x = data.prepare(data.x_train[idx], train=False)
    y = data.y_train[idx]
    out: dict[str, float] = {}
    for backend in ("triton", "eager"):
        torch.manual_seed(0)
        model = build_model(cfg.model, data).to(cfg.device)
        opt = make_optimizer(method, model, cfg, 0, 10_000, backend=backend)

        def closure(model: nn.Module = model) -> torch.Tensor:
            o = model(x)
            if method.per_example:
                return F.cross_entropy(o, y, reduction="none")
            loss = F.cross_entropy(o, y)
            loss.backward()
            return loss

        def run_steps(n: int, opt: torch.optim.Optimizer = opt, closure=closure) -> float:
            torch.cuda.synchronize(cfg.device)
            t0 = time.perf_counter()
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                opt.step(closure)
            torch.cuda.synchronize(cfg.device)
            return time.perf_counter() - t0

        run_steps(5)
        out[backend] = 1000.0 * min(run_steps(steps) for _ in range(repeats)) / steps
    out["speedup"] = out["eager"] / out["triton"]
    return out


# --------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------- command line


DIGITS_DEFAULTS = {"epochs": 40, "batch_size": 64}
IMAGE_DEFAULTS = {"epochs": 10, "batch_size": 128}


def build_parser() -> _Parser:
    """The ``sam-demo`` argument parser."""
    reg = optimizer_registry()
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


def _check_args(args: argparse.Namespace) -> None:
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


def _prepare_out_dir(out: str | None) -> Path:
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


def run(args: argparse.Namespace) -> int:
    """Run the comparison described by parsed ``args``; returns the exit code."""
    _check_args(args)
    reg = optimizer_registry()
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
    out_dir = _prepare_out_dir(args.out)

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


if __name__ == "__main__":
    sys.exit(main())
