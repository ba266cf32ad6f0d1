"""Fused vs eager: the speed of whole optimizer steps on the Triton backend against the eager
one, on CUDA (the table's last column)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from python_api.demo.data import Data
from python_api.demo.models import build_model
from python_api.demo.registry import Method, accepts_keyword, load_optimizer_class, make_optimizer
from python_api.demo.train import RunConfig


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
    if not accepts_keyword(cls, "backend"):
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
