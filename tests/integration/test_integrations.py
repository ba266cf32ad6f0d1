"""The real third-party packages, over the whole optimizer table: Lightning, accelerate, timm.

Lightning (automatic optimization, where Lightning calls ``optimizer.step(closure)`` as it does
for LBFGS; manual optimization with ``step(closure=...)`` and with ``first_step``/
``second_step``) and accelerate (``prepare`` and training; ``save_state``/``load_state``
continuing) must give exactly the weights of the equivalent plain loop. Both packages are in the
``test`` extra, which the README's install command installs: in CI (``CI`` set) a missing one
fails instead of skipping. timm needs torchvision, which does not load beside the CPU torch 2.13
wheel: its test runs where timm imports (a CUDA torch with torchvision) and skips elsewhere.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _extras import fresh_accelerate, import_timm, require
from _helpers import same
from _optim_table import NAMES, Net, batches, build, make_closure, opt_class
from torch.nn import functional as F
from torch.optim.lr_scheduler import StepLR

from python_api import SAM

STEPS = 4
TWO_CALL = [n for n in NAMES if hasattr(opt_class(n), "first_step")]


def same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every parameter and buffer (BN statistics) bit-identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def plain_closure_loop(name, model, opt, data, zero_in_closure=False):
    """``opt.step(closure)`` per batch; the global seed set per step as the Lightning runs do."""
    for i, (x, y) in enumerate(data):
        torch.manual_seed(1000 + i)
        opt.zero_grad()
        closure = make_closure(name, model, x, y)
        if zero_in_closure:  # Lightning's automatic closure: forward, zero_grad, backward

            def closure():
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                return loss

        opt.step(closure)


def plain_two_call_loop(model, opt, data, sched=None):
    for i, (x, y) in enumerate(data):
        torch.manual_seed(1000 + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        if sched is not None:
            sched.step()


# ----------------------------------------------------------------- Lightning
def lightning_fit(name, base, net, mode, data, with_scheduler=False):
    """Train ``net`` with a Lightning Trainer (one epoch over ``data``); returns the optimizer."""
    pl = require("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.automatic_optimization = mode == "automatic"

        def on_train_batch_start(self, batch, batch_idx):
            torch.manual_seed(1000 + batch_idx)  # as the plain loops do

        def training_step(self, batch, batch_idx):
            x, y = batch
            if mode == "automatic":  # Lightning's closure: this, zero_grad, backward
                return F.cross_entropy(self.net(x), y)
            opt = self.optimizers()
            opt.zero_grad()
            if mode == "manual_closure":
                if name == "ESAM":  # per-example losses, no backward: ESAM runs its own

                    def closure():
                        return F.cross_entropy(self.net(x), y, reduction="none")

                else:

                    def closure():
                        loss = F.cross_entropy(self.net(x), y)
                        self.manual_backward(loss)
                        return loss

                opt.step(closure=closure)
            else:  # davda54/sam's two calls on Lightning's optimizer wrapper
                self.manual_backward(F.cross_entropy(self.net(x), y))
                opt.first_step(zero_grad=True)
                self.manual_backward(F.cross_entropy(self.net(x), y))
                opt.second_step(zero_grad=True)
            if with_scheduler:
                self.lr_schedulers().step()

        def configure_optimizers(self):
            self.opt = build(name, base, self.net)
            if with_scheduler:
                return {"optimizer": self.opt, "lr_scheduler": StepLR(self.opt, 1, gamma=0.5)}
            return self.opt

    module = Module()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # the scheduler's order checks are errors here
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        warnings.filterwarnings("error", message=".*optimizer.step.*has been overridden.*")
        trainer.fit(module, loader)
    return module.opt, trainer


AUTOMATIC = [n for n in NAMES if n != "ESAM"]


@pytest.mark.parametrize("name", AUTOMATIC)
def test_lightning_automatic_optimization_equals_plain_loop(name):
    """Lightning calls ``optimizer.step(closure)`` with its own closure (training_step,
    zero_grad, backward): exactly the weights of the plain closure loop."""
    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    data = batches(STEPS)
    opt, trainer = lightning_fit(name, "sgd", net, "automatic", data)
    plain_closure_loop(name, ref, build(name, "sgd", ref), data, zero_in_closure=True)
    same_model(net, ref)
    assert trainer.global_step == STEPS and opt.steps_taken == STEPS


def test_lightning_automatic_optimization_adamw():
    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    data = batches(STEPS)
    lightning_fit("SAM", "adamw", net, "automatic", data)
    plain_closure_loop("SAM", ref, build("SAM", "adamw", ref), data, zero_in_closure=True)
    same_model(net, ref)


def test_lightning_automatic_optimization_esam_is_refused():
    """ESAM's closure returns per-example losses and runs no backward; Lightning's automatic
    closure backpropagates a scalar itself: the step refuses (use manual optimization)."""
    torch.manual_seed(0)
    with pytest.raises(Exception, match="per-example|reduction"):
        lightning_fit("ESAM", "sgd", Net(), "automatic", batches(1))


@pytest.mark.parametrize("name", NAMES)
def test_lightning_manual_closure_equals_plain_loop(name):
    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    data = batches(STEPS)
    opt, trainer = lightning_fit(name, "sgd", net, "manual_closure", data)
    plain_closure_loop(name, ref, build(name, "sgd", ref), data)
    same_model(net, ref)
    assert trainer.global_step == STEPS and opt.steps_taken == STEPS


@pytest.mark.parametrize("name", TWO_CALL)
def test_lightning_manual_two_call_equals_plain_loop(name):
    """``first_step``/``second_step`` on ``self.optimizers()`` (Lightning's wrapper), with an
    LR scheduler stepped after each step: the plain loop's weights and learning rates, and no
    scheduler-order warning (an error here)."""
    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    data = batches(STEPS)
    opt, _ = lightning_fit(name, "sgd", net, "two_call", data, with_scheduler=True)
    ref_opt = build(name, "sgd", ref)
    plain_two_call_loop(ref, ref_opt, data, StepLR(ref_opt, 1, gamma=0.5))
    same_model(net, ref)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert opt.steps_taken == STEPS  # the state lives on the optimizer, not Lightning's proxy


# ----------------------------------------------------------------- accelerate
def accelerate_run(name, net, data, start=0, save_dir=None, save_at=None, load_dir=None):
    """Train with ``accelerator.prepare``d model and optimizer over ``data[start:]``; the
    global seed set per step as in the plain loop. Returns the (unwrapped) optimizer."""
    accelerate = fresh_accelerate()
    accelerator = accelerate.Accelerator(cpu=True)
    opt = build(name, "sgd", net)
    model, popt = accelerator.prepare(net, opt)
    if load_dir is not None:
        accelerator.load_state(load_dir)
    for i in range(start, len(data)):
        if save_at is not None and i == save_at:
            accelerator.save_state(save_dir, safe_serialization=False)
        torch.manual_seed(1000 + i)
        x, y = data[i]
        popt.zero_grad()
        if name == "ESAM":
            closure = make_closure(name, model, x, y)
        else:

            def closure():
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                return loss

        popt.step(closure)
    return opt


@pytest.mark.parametrize("name", NAMES)
def test_accelerate_training_and_resume_equal_plain_loop(name, tmp_path):
    """prepare + training gives the plain loop's weights; save_state after 2 steps, then
    load_state into a fresh model and optimizer, continues bit-identically (weights, BN
    statistics and optimizer state; the global RNG, which the stochastic classes draw from,
    is part of accelerate's state)."""
    data = batches(STEPS + 1)
    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    opt = accelerate_run(name, net, data, save_dir=tmp_path / "ckpt", save_at=2)
    plain_closure_loop(name, ref, build(name, "sgd", ref), data)
    same_model(net, ref)

    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    resumed = Net()
    torch.manual_seed(456)  # and another RNG state
    opt2 = accelerate_run(name, resumed, data, start=2, load_dir=tmp_path / "ckpt")
    same_model(resumed, net)
    assert same(opt.state_dict(), opt2.state_dict())


# ----------------------------------------------------------------- timm
def test_timm_create_optimizer_v2_with_layer_decay():
    """``SAM(None, timm.optim.create_optimizer_v2(model, ..., layer_decay=...))``: the wrapper
    shares timm's groups (weight decay, lr_scale per layer), timm's scheduler sets each group's
    lr through it, and a step equals SAM built from the same groups as a class."""
    timm = import_timm()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    ).to(device)
    ref_model = copy.deepcopy(model)
    base = timm.optim.create_optimizer_v2(
        model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75
    )
    opt = SAM(None, base, rho=0.05, model=model)
    assert opt.param_groups is base.param_groups and len(opt.param_groups) > 2
    scales = {g["lr_scale"] for g in opt.param_groups}
    assert len(scales) > 2 and max(scales) == 1.0
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    for g in opt.param_groups:  # the usual SAM recipe: no perturbation where no weight decay
        if g["weight_decay"] == 0.0:
            g["rho"] = 0.0
    sched = timm.scheduler.create_scheduler_v2(opt, "cosine", num_epochs=10, warmup_epochs=0)[0]
    sched.step(0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])

    # the same groups given to SAM as a class build the same step
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref_model.named_parameters())
    ref_groups = [
        {**g, "params": [ref_params[names[id(p)]] for p in g["params"]]} for g in opt.param_groups
    ]
    ref = SAM(ref_groups, torch.optim.AdamW, model=ref_model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (8,), generator=g).to(device)
    w0 = model.head.weight.detach().clone()
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(2):
            o.zero_grad()
            o.step(make_closure("SAM", m, x, y))
    if device == "cuda":
        # two models on the GPU: cuDNN/cuBLAS may pick other kernels for each (seen on an
        # H200: the patch embedding differs in the last bits), so close, not bit-identical
        for (k, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    else:
        same_model(model, ref_model)
    assert not torch.equal(model.head.weight, w0)
