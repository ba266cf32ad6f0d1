"""Integration recipes: the parameter-group helper and every example script, run for 2-3 steps."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _extras import fresh_accelerate, import_timm, require
from torch import nn

from python_api import SAM
from python_api.recipes import param_groups_no_decay

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def finite_losses(losses, n):
    assert len(losses) == n and all(math.isfinite(v) for v in losses), losses


# ----------------------------------------------------------------- param_groups_no_decay
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"pos_embed"}

    def forward(self, x):
        h = self.bn(self.conv(x)).mean((2, 3))
        h = self.gn(self.ln(h).unsqueeze(-1)).squeeze(-1)
        return self.fc(h + self.pos_embed.mean() + self.scale)


def test_param_groups_no_decay_membership():
    net = Net()
    groups = param_groups_no_decay(net, weight_decay=0.05, rho=0.1, skip_list=("fc.weight",))
    names = {id(p): n for n, p in net.named_parameters()}
    decay, no_decay = groups
    assert (decay["weight_decay"], decay["rho"]) == (0.05, 0.1)
    assert (no_decay["weight_decay"], no_decay["rho"]) == (0.0, 0.0)
    assert {names[id(p)] for p in decay["params"]} == {"conv.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "conv.bias", "bn.weight", "bn.bias", "ln.weight", "ln.bias", "gn.weight", "gn.bias",
        "fc.weight", "fc.bias", "pos_embed", "scale",
    }  # fmt: skip
    # only trainable parameters; empty groups dropped; no_decay_rho
    bare = nn.Sequential(nn.Linear(3, 3, bias=False))
    (only,) = param_groups_no_decay(bare, 1e-4, rho=0.05, no_decay_rho=0.02)
    assert only["rho"] == 0.05 and len(only["params"]) == 1
    (nd,) = param_groups_no_decay(nn.LayerNorm(3), 1e-4, rho=0.05, no_decay_rho=0.02)
    assert nd["rho"] == 0.02 and nd["weight_decay"] == 0.0
    with pytest.raises(ValueError):
        param_groups_no_decay(net, -1.0, rho=0.1)


def test_param_groups_no_decay_with_sam():
    """The rho=0 group is not perturbed and gets no weight decay, yet is trained."""
    net = Net()
    opt = SAM(param_groups_no_decay(net, 0.05, rho=0.1), torch.optim.AdamW, lr=1e-2)
    assert [g["weight_decay"] for g in opt.base_optimizer.param_groups] == [0.05, 0.0]
    x = torch.randn(4, 3, 6, 6)
    before = [p.detach().clone() for p in net.parameters()]

    def closure():
        loss = net(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    changed = [not torch.equal(a, b) for a, b in zip(before, net.parameters())]
    trainable = [p.requires_grad for p in net.parameters()]
    assert changed == trainable


# ----------------------------------------------------------------- the example scripts
@pytest.mark.parametrize(
    "argv",
    [[], ["--amp", "fp16", "--accum", "2"], ["--amp", "bf16"]],
    ids=["fp32", "fp16_scaler_accum", "bf16"],
)
def test_example_plain_loop(argv):
    losses = load_example("plain_loop").main(["--steps", "3", "--device", "cpu", *argv])
    finite_losses(losses, 3)


def test_example_timm_param_groups():
    finite_losses(load_example("timm_param_groups").main(["--steps", "2"]), 2)


def test_example_timm_sam():
    """timm's optimizer factory with layer decay, wrapped (needs timm, hence torchvision)."""
    import_timm()
    losses = load_example("timm_sam").main(["--steps", "2", "--model", "vit_tiny_patch16_224"])
    finite_losses(losses, 2)


# Lightning and accelerate are in the test extra (README command 1): in CI they must be there
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_example_lightning_manual(precision):
    require("lightning.pytorch")
    losses = load_example("lightning_manual").main(["--steps", "3", "--precision", precision])
    finite_losses(losses, 3)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_example_accelerate(mixed_precision):
    fresh_accelerate()
    losses = load_example("accelerate_loop").main(
        ["--steps", "3", "--mixed-precision", mixed_precision]
    )
    finite_losses(losses, 3)


def test_example_ddp_per_replica():
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp_sam.py"), "--steps", "2", "--mode", "per_replica"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "per_replica: loss" in out.stdout
