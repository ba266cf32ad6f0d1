"""The data sets: scikit-learn's bundled digits, CIFAR-10/100 pickles and ImageFolder trees, all
held in memory and never downloaded; and the symmetric label noise each seed trains on."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from python_api.demo.errors import DemoError


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


def noisy_labels(data: Data, rate: float, seed: int) -> torch.Tensor:
    """The training labels of one seed: the same for every optimizer of that seed."""
    return add_label_noise(
        data.y_train, rate, data.num_classes, torch.Generator().manual_seed(10_000 + seed)
    )
