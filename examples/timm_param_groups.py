"""timm-style parameter groups with SAM on a tiny ViT: no decay, no perturbation for norms/biases.

The ViT/DeiT/ConvNeXt recipes exclude biases, normalisation weights and the position /
class-token embeddings from weight decay (timm's ``param_groups_weight_decay`` and the model's
``no_weight_decay()``). With SAM the same parameters are usually also left unperturbed
(``rho=0``; they still count in the gradient norm). :func:`param_groups_no_decay` builds both
groups without timm; with timm installed the same call works on any timm model.

    python examples/timm_param_groups.py --steps 5
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


class TinyViT(nn.Module):
    """Patch embedding, one transformer block, class token and learned positions."""

    def __init__(self, img=8, patch=4, dim=32, classes=10) -> None:
        super().__init__()
        n = (img // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.block = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def no_weight_decay(self) -> set[str]:  # timm's hook
        return {"pos_embed", "cls_token"}

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.block(x))[:, 0])


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = TinyViT()
    groups = param_groups_no_decay(model, weight_decay=0.05, rho=2.0)  # ASAM's rho
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        print(f"wd={g['weight_decay']} rho={g['rho']}: {[names[id(p)] for p in g['params']]}")
    opt = SAM(groups, torch.optim.AdamW, adaptive=True, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    losses = []
    for _ in range(args.steps):

        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        losses.append(float(opt.step(closure)))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
