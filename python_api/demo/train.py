"""One training run: a fresh model, one optimizer, one seed; the test accuracy and training
loss per epoch, the closure calls and the fraction of SAM steps it took."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from python_api.demo.data import Data, noisy_labels
from python_api.demo.models import build_model
from python_api.demo.registry import Method, make_optimizer


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
