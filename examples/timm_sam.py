"""timm's optimizer factory with SAM: ``SAM(None, timm.optim.create_optimizer_v2(...))``.

timm builds the parameter groups (no weight decay for biases, norm layers and the model's
``no_weight_decay()`` names; with ``layer_decay`` one group per layer with an ``lr_scale``) and
the base optimizer; SAM wraps that instance (``params=None``) and shares its groups, adding
``rho`` to each. The usual SAM recipe also leaves the no-decay parameters unperturbed
(``rho=0``: they still count in the gradient norm). timm's scheduler sets every group's ``lr``
to the schedule times its ``lr_scale``; attach it to the wrapper (or the base: the groups are
the same objects). ``adamw`` and ``sgd``/``momentum`` bases (``torch.optim.AdamW``/``SGD``) get
the fused step; any other timm optimizer runs its own step at the restored weights.

Needs timm, hence torchvision: PyPI's torchvision wheels do not load beside the CPU-only torch
2.13 wheel, so run it where torchvision imports (a CUDA torch).

    python examples/timm_sam.py --model vit_tiny_patch16_224 --steps 5
    python examples/timm_sam.py --model resnet18 --opt momentum --lr 0.05 --layer-decay 0
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from python_api import SAM  # noqa: E402


def build(model: nn.Module, args) -> tuple[SAM, object]:
    """The timm base optimizer, the SAM wrapper over it and timm's scheduler."""
    import timm.optim
    import timm.scheduler

    base = timm.optim.create_optimizer_v2(
        model,
        args.opt,
        lr=args.lr,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay or None,  # one group per layer, lr_scale per group
    )
    opt = SAM(None, base, rho=args.rho, adaptive=args.adaptive, model=model)
    for g in opt.param_groups:
        if g["weight_decay"] == 0.0:  # biases, norms, no_weight_decay(): not perturbed
            g["rho"] = 0.0
    sched, _ = timm.scheduler.create_scheduler_v2(
        opt, "cosine", num_epochs=args.steps, step_on_epochs=False, updates_per_epoch=1
    )
    return opt, sched


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--opt", default="adamw", help="a timm optimizer name (adamw, momentum, ...)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--layer-decay", type=float, default=0.75, help="0: no layer decay")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--adaptive", action="store_true", help="ASAM")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=32)
    args = ap.parse_args(argv)

    import timm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    kw = {"img_size": args.img_size, "patch_size": 8} if "vit" in args.model else {}
    model = timm.create_model(args.model, num_classes=10, **kw).to(device)
    opt, sched = build(model, args)
    for g in opt.param_groups:
        print(
            f"{len(g['params']):3d} tensors  lr_scale={g.get('lr_scale', 1.0):.3f}  "
            f"wd={g['weight_decay']}  rho={g['rho']}"
        )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, 10, (16,), generator=g).to(device)
    losses = []
    for step in range(args.steps):

        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        losses.append(float(opt.step(closure)))
        sched.step_update(step + 1)  # per-iteration schedule
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
