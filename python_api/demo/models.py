"""The models: a small MLP and CNN defined here, ResNet-18 / ViT from torchvision or timm when
installed; always freshly initialised (no pretrained weights, nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn

from python_api.demo.data import Data
from python_api.demo.errors import DemoError


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
