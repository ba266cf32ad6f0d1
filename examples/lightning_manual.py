"""PyTorch Lightning with SAM: manual optimization (the closure runs forward and backward).

SAM needs two forward/backward passes per step, so the LightningModule sets
``automatic_optimization = False`` and gives ``step`` a closure that calls
``self.manual_backward`` (Lightning's precision plugin and strategy see every backward).
``configure_optimizers`` returns the SAM optimizer itself; ``self.optimizers()`` wraps it in a
``LightningOptimizer`` whose ``step(closure=...)`` reaches ``SAM.step``. Give ``model=self``
so that BN statistics are updated only by the unperturbed pass.

bf16 (``precision="bf16-mixed"``) works as it is. For fp16 with a GradScaler use the plain
loop's recipe (``opt.step(closure, scaler=scaler)``): Lightning's fp16 plugin steps through
``scaler.step(optimizer)``, which cannot see the perturbed pass's gradients (the optimizer
refuses it with that message). Multi-GPU: Lightning's DDP strategy gives the global mode of
``python_api.distributed``.

    python examples/lightning_manual.py --steps 5        (needs `pip install lightning`)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from python_api import SAM  # noqa: E402
from python_api.recipes import param_groups_no_decay  # noqa: E402


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl  # the older package name
    return pl


def build_module(pl):
    class SAMModule(pl.LightningModule):
        def __init__(self, rho: float = 0.05, lr: float = 0.1) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.rho, self.lr = rho, lr
            self.net = nn.Sequential(
                nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)
            )
            self.losses: list[float] = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()

            def closure():
                loss = nn.functional.cross_entropy(self(x), y)
                self.manual_backward(loss)
                return loss

            opt.zero_grad()
            loss = opt.step(closure=closure)
            self.log("train_loss", loss, prog_bar=True)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            groups = param_groups_no_decay(self, weight_decay=5e-4, rho=self.rho)
            return SAM(groups, torch.optim.SGD, model=self, lr=self.lr, momentum=0.9)

    return SAMModule


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="32-true")
    args = ap.parse_args(argv)
    pl = _lightning()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64 * args.steps, 10, generator=g)
    y = (x @ torch.randn(10, 4, generator=g)).argmax(dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    module = build_module(pl)()
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    print(f"loss {module.losses[0]:.4f} -> {module.losses[-1]:.4f}")
    return module.losses


if __name__ == "__main__":
    main()
