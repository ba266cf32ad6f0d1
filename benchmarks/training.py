"""Training-step throughput: images/s of a full step (forward, backward, optimizer).

ResNet-50 (channels-last) and ViT-B/16 from torchvision (else timm) on synthetic ImageNet-sized
data (224x224, 1000 classes), bf16 autocast, fp32 weights; the base optimizer alone (SGD-momentum
for ResNet-50, AdamW for ViT-B/16), then each SAM-family optimizer with the eager and the fused
backend, and the davda54-style SAM reference. Each configuration runs ``train_warmup`` steps,
then ``train_steps`` timed steps with no synchronisation between them (CUDA events at the step
boundaries; the mean over the timed steps gives images/s, the per-step median is kept too).

The ratio ``step time / base step time`` is reported next to the ideal: the number of
forward+backward passes per step (2 for SAM and ASAM, 3 for CR-SAM and Frob-SAM with n=2, about
1.5 for AE-SAM at 50% SAM steps, 1 + 1/k for LookSAM with k=5).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import Item, Skip, summarize
from benchmarks.optimizer_step import (
    SPECS,
    base_optimizer,
    build_optimizer,
    sam_fraction,
    switch_counts,
)

# model name -> (batch, base optimizer)
MODELS = {"resnet50": (128, "SGD"), "vit_b_16": (64, "AdamW")}
SMOKE_MODELS = {"tinycnn": (8, "SGD")}


class TinyCNN(torch.nn.Module):
    """A small conv net with batch norm for the CPU smoke run (32x32 inputs, 10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_model(name: str) -> tuple[torch.nn.Module, str]:
    """``(model, source)``: torchvision first, then timm."""
    if name == "tinycnn":
        return TinyCNN(), "benchmarks"
    errors = []
    try:
        import torchvision

        return getattr(torchvision.models, name)(), "torchvision"
    except Exception as exc:
        errors.append(f"torchvision: {type(exc).__name__}: {exc}")
    try:
        import timm

        timm_name = {"resnet50": "resnet50", "vit_b_16": "vit_base_patch16_224"}[name]
        return timm.create_model(timm_name, pretrained=False), "timm"
    except Exception as exc:
        errors.append(f"timm: {type(exc).__name__}: {exc}")
    raise Skip(f"no {name}: " + "; ".join(errors))


class Workload:
    """A model on the device, its initial weights, and one synthetic batch."""

    def __init__(self, name: str, device: torch.device, smoke: bool) -> None:
        self.name = name
        self.device = device
        batch, self.base = (SMOKE_MODELS if smoke else MODELS)[name]
        model, self.source = build_model(name)
        size, classes = (32, 10) if smoke else (224, 1000)
        self.channels_last = name != "vit_b_16"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=fmt).train()
        self.init_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=gen, device=device)
        self.x = self.x.contiguous(memory_format=fmt)
        self.y = torch.randint(0, classes, (batch,), generator=gen, device=device)
        self.batch = batch
        self.autocast = device.type == "cuda"

    def reset(self) -> None:
        self.model.load_state_dict(self.init_state)
        for p in self.model.parameters():
            p.grad = None

    def closure(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss


_WORKLOADS: dict[str, Workload] = {}


def workload(name: str, cfg: dict) -> Workload:
    if name not in _WORKLOADS:
        _WORKLOADS[name] = Workload(name, torch.device(cfg["device"]), cfg["smoke"])
    w = _WORKLOADS[name]
    w.reset()
    return w


def bench_train(cfg: dict, model_name: str, opt_name: str, backend: str) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    w = workload(model_name, cfg)
    params = [p for p in w.model.parameters() if p.requires_grad]
    used: dict[str, Any]
    if opt_name == "base":
        cls, kw = base_optimizer(w.base)
        opt = cls(params, **kw)
        used = dict(kw)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            w.closure()
            opt.step()

    else:
        opt, used = build_optimizer(opt_name, params, backend, w.base, model=w.model)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            opt.step(w.closure)

    cuda = w.device.type == "cuda"
    for _ in range(cfg.get("train_warmup", 5)):
        step()
    switching = opt_name != "base" and SPECS[opt_name].switching
    before = switch_counts(opt) if switching else None
    n = cfg.get("train_steps", 10)
    if cuda:
        torch.cuda.synchronize()
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        t0 = time.perf_counter()
        evs[0].record()
        for i in range(n):
            step()
            evs[i + 1].record()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        per = [evs[i].elapsed_time(evs[i + 1]) for i in range(n)]
        total_ms = evs[0].elapsed_time(evs[n])
    else:
        per = []
        t0 = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            step()
            per.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
        total_ms = wall * 1e3
    mean_ms = total_ms / n
    frac = sam_fraction(before, switch_counts(opt)) if switching else None
    s = summarize(per)
    loss = float(w.closure().item())
    return {
        "step_ms": mean_ms,
        "median_step_ms": s["median_ms"],
        "p20_ms": s["p20_ms"],
        "p80_ms": s["p80_ms"],
        "img_per_s": w.batch / (mean_ms * 1e-3),
        "batch": w.batch,
        "steps": n,
        "wall_s": wall,
        "model_source": w.source,
        "channels_last": w.channels_last,
        "bf16_autocast": w.autocast,
        "base": w.base,
        "kwargs": used,
        "loss_after": loss,
        "sam_fraction": frac,
        "ideal_ratio": 1.0 if opt_name == "base" else ideal(opt_name, frac),
    }


def ideal(opt_name: str, fraction: float | None = None) -> float:
    """Forward+backward passes per step relative to the base optimizer (measured SAM fraction
    for the switching optimizers when they report it, else the nominal one)."""
    return SPECS[opt_name].ideal_passes(fraction)


def plan(cfg: dict) -> list[Item]:
    """Items by priority: every model's base first, then SAM fused, SAM eager, and so on."""
    import sam_kernels as sk

    device = torch.device(cfg["device"])
    models = list(SMOKE_MODELS if cfg["smoke"] else MODELS)
    if cfg["quick"] and not cfg["smoke"]:
        models = ["resnet50"]
    fused = None
    if not cfg["smoke"]:
        for b in ("triton", "ext"):
            if sk.available(b, device):
                fused = b
                break
    names = ["SAM", "CR-SAM", "AE-SAM", "LookSAM", "Frob-SAM", "ASAM"]
    if cfg.get("optimizers"):
        names = [n for n in names if n in cfg["optimizers"]]
    if cfg["quick"]:
        names = [n for n in names if n in ("SAM", "CR-SAM")]
    combos: list[tuple[str, str]] = [("base", "-")]
    for n in names:
        if fused:
            combos.append((n, fused))
        combos.append((n, "eager"))
        if n == "SAM" and not cfg["quick"]:
            combos.append(("SAM", "davda54"))
    items = []
    for opt_name, backend in combos:
        for m in models:
            meta = {"model": m, "optimizer": opt_name, "backend": backend}
            items.append(
                Item(
                    f"train/{m}/{opt_name}/{backend}",
                    "training",
                    lambda m=m, o=opt_name, b=backend: bench_train(cfg, m, o, b),
                    meta,
                )
            )
    return items
