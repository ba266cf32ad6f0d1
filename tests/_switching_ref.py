"""Test scaffolding shared by the AE-SAM, LookSAM, SS-SAM and ESAM tests.

The references are independent of sam_kernels: a small model with every awkward parameter
kind (and a factory of it with the optimizer under test), float64 per-parameter references of
the SAM ascent (over _helpers.py's float64 base steps), a plain-Python copy of the documented
counter-based generator, and the behaviour checks every host-decision optimizer must pass
(exact restore, non-finite steps leaving no trace or raising, host reads, batch norm, resume).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import pytest
import torch
from _helpers import SCALAR_READS, HostReads, RefBase, same
from _models import BASES, AwkwardNet
from torch import nn

RHOS = (0.05, 0.2, 0.0)
GROUP_NAMES = (("w1", "b1", "unused"), ("w2t", "empty"), ("b2",))
POISONS = ("loss_w", "grad_w", "loss_w_e", "grad_w_e")


class Net(AwkwardNet):
    """The shared awkward model, groups for the switching algorithms."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__(bn)

    def groups(self, rhos=RHOS):
        return [
            {"params": [getattr(self, n) for n in names], "rho": rho}
            for rho, names in zip(rhos, GROUP_NAMES)
        ]

    def ref_groups(self, rhos=RHOS):
        return [(rho, [getattr(self, n) for n in names]) for rho, names in zip(rhos, GROUP_NAMES)]


def make_net(seed: int, bn: bool = False, dtype=torch.float64) -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Net(bn=bn).to(dtype)


def factory_of(cls, base: str = "sgd", lr=None, **kw):
    """``make(init_seed=0) -> (model, optimizer)``: a fresh net and ``cls`` over its groups and
    ``BASES[base]`` (``lr``: that rate, no weight decay) with ``kw``; ``model="bn"``: a net
    with batch norm, given to the optimizer as ``model=``."""
    base_cls, hp = BASES[base]
    hp = dict(hp, **({} if lr is None else dict(lr=lr, weight_decay=0.0)))

    def make(init_seed=0):
        model = make_net(init_seed, bn=kw.get("model") == "bn")
        extra = dict(kw)
        if extra.pop("model", None) == "bn":
            extra["model"] = model
        return model, cls(model.groups(), base_cls, **extra, **hp)

    return make


def data(n: int = 16, seed: int = 0, dtype=torch.float64):
    """A batch whose scale varies with the seed, so that gradient norms fluctuate."""
    g = torch.Generator().manual_seed(seed)
    scale = (1.0, 0.15, 3.0, 0.3, 2.0)[seed % 5]
    x = torch.randn(n, 5, generator=g, dtype=dtype) * scale
    return x, torch.randint(0, 3, (n,), generator=g)


def loss_fn(model, x, y, reduction: str = "mean"):
    return nn.functional.cross_entropy(model(x.to(model.w1.dtype)), y, reduction=reduction)


# ---------------------------------------------------------------- float64 references
def grads_at(model: Net, params, loss_of: Callable[[], torch.Tensor]):
    """``(loss, [grad or None])`` of ``loss_of()`` w.r.t. ``params`` (no .grad touched)."""
    with torch.enable_grad():
        loss = loss_of()
        gs = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [None if g is None else g.detach() for g in gs]


def all_params(model: Net) -> list[torch.Tensor]:
    return [p for _, ps in model.ref_groups() for p in ps]


@torch.no_grad()
def sam_point(groups, g0: dict, norm: float, mult: dict | None = None) -> dict:
    """Move to ``w + e`` with ``e = mult_p * rho / (norm + 1e-12) * g0``; returns the saved w."""
    saved = {}
    for rho, ps in groups:
        for p in ps:
            if g0.get(p) is not None and rho != 0:
                saved[p] = p.clone()
                m = 1.0 if mult is None else mult[p]
                p.add_(m * rho / (norm + 1e-12) * g0[p])
    return saved


@torch.no_grad()
def restore(saved: dict) -> None:
    for p, w in saved.items():
        p.copy_(w)


def global_norm(g0: dict) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in g0.values() if g is not None))


class RefSwitching:
    """Float64 reference of a step that is either SAM or one-pass, decided by ``decide``.

    ``decide(t, g0) -> bool`` (SAM?); ``cheap(g0) -> dict`` the one-pass gradient;
    ``after_sam(g0, gs)`` sees both gradients of a SAM step.
    """

    def __init__(self, model: Net, base: str, hp: dict, rhos=RHOS) -> None:
        self.model, self.groups = model, model.ref_groups(rhos)
        self.params = [p for _, ps in self.groups for p in ps]
        self.base = RefBase(base, hp)
        self.t = 0
        self.decisions: list[bool] = []

    def decide(self, g0: dict) -> bool:
        raise NotImplementedError

    def cheap(self, g0: dict) -> dict:
        return g0

    def after_sam(self, g0: dict, gs: dict) -> None:
        pass

    def step(self, x, y):
        loss, gl = grads_at(self.model, self.params, lambda: loss_fn(self.model, x, y))
        g0 = {p: g for p, g in zip(self.params, gl) if g is not None}
        sam = self.decide(g0)
        self.decisions.append(sam)
        if sam:
            saved = sam_point(self.groups, g0, global_norm(g0))
            _, gl1 = grads_at(self.model, self.params, lambda: loss_fn(self.model, x, y))
            restore(saved)
            gs = {
                p: (g if g is not None else torch.zeros_like(p))
                for p, g in zip(self.params, gl1)
                if p in g0
            }
            self.after_sam(g0, gs)
            grads = gs
        else:
            grads = self.cheap(g0)
        for p in self.params:
            if p in grads:
                self.base.step(p, grads[p])
        self.t += 1
        return loss


def look_project(g0: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """LookSAM's stored component, literally: ``gs - ||gs|| cos(theta) g0 / ||g0||``."""
    n0, ns = g0.norm(), gs.norm()
    if n0 == 0 or ns == 0:
        return gs.clone()
    cos = (g0 * gs).sum() / (n0 * ns)
    return gs - ns * cos * g0 / n0


def look_reuse(g0: torch.Tensor, gv: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """LookSAM's reuse gradient ``g0 + alpha ||g0|| / (||gv|| + 1e-8) gv`` (g0 without gv)."""
    if gv is None:
        return g0
    return g0 + alpha * (g0.norm() / (gv.norm() + 1e-8)) * gv


# ---------------------------------------------------------------- the documented generator
_M32 = 0xFFFFFFFF


def _mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _absorb(h: int, w: int) -> int:
    return _mix(((h ^ w) + 0x9E3779B9) & _M32)


def py_counter_uniform(seed: int, stream: int, counter: int, index: int) -> float:
    """Plain-Python copy of the documented counter-based generator."""
    h = 0
    for w in (seed & _M32, seed >> 32 & _M32, stream, counter & _M32, counter >> 32 & _M32, index):
        h = _absorb(h, w)
    return (_mix(h) >> 8) * 2.0**-24


# ---------------------------------------------------------------- closures and spies
def make_closure(model, x, y, poison: str | None = None, calls: list | None = None):
    """The standard closure (forward + backward at the current weights, returns the loss).

    ``poison`` makes one evaluation non-finite: ``loss_w`` / ``grad_w`` on the first call of
    the step, ``loss_w_e`` / ``grad_w_e`` on the second (the perturbed point).
    """
    calls = [] if calls is None else calls
    n0 = len(calls)

    def closure():
        calls.append(1)
        first = len(calls) - n0 == 1
        loss = loss_fn(model, x, y)
        if poison is not None and first == poison.endswith("_w"):
            if poison.startswith("loss"):
                loss = loss + torch.tensor(float("nan"), dtype=loss.dtype)  # gradients finite
            else:
                loss = loss * torch.tensor(float("inf"), dtype=loss.dtype)
        loss.backward()
        return loss

    return closure


def state_without_counters(opt) -> dict:
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["sam_state"].pop("counters")
    return sd


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def save_and_load(opt_state: dict, model_state: dict):
    buf = io.BytesIO()
    torch.save({"opt": opt_state, "model": model_state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------- behaviour checks
def run_step(model, opt, x, y, form: str = "closure", poison=None, calls=None):
    """One step in either closure form: ``closure`` (the optimizer evaluates at w) or
    ``grads_present`` (the user ran the first backward). Returns the loss at w."""
    closure = make_closure(model, x, y, poison, calls)
    opt.zero_grad()
    if form == "grads_present":
        loss = closure()
        opt.step(closure)
        return loss
    return opt.step(closure)


def check_no_trace(factory, batches, poison: str, at: int, step=run_step) -> int | None:
    """A step poisoned at ``at`` changes nothing; the run then equals one that never saw it.

    Returns the host decision of the poisoned step (the caller checks the case was hit).
    """
    model, opt = factory()
    clean_model, clean_opt = factory()
    decision = None
    for s, (x, y) in enumerate(batches):
        if s == at:
            before = (weights(model), state_without_counters(opt))
            step(model, opt, x, y, poison=poison)
            decision = opt.last_decision if hasattr(opt, "last_decision") else None
            after = (weights(model), state_without_counters(opt))
            assert same(before, after, dtype=True), f"a step poisoned at {poison} changed something"
            assert opt.skipped_steps == 1
            continue
        step(model, opt, x, y)
        step(clean_model, clean_opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean_model.parameters()))
    assert same(state_without_counters(opt), state_without_counters(clean_opt), dtype=True)
    assert opt.steps_taken == clean_opt.steps_taken == len(batches) - 1
    return decision


def check_raise_leaves_no_trace(model, opt, batch, cases, step=run_step) -> None:
    """``on_nonfinite="raise"``: each ``(poison, match)`` of ``cases`` raises NonFiniteError
    matching ``match`` and leaves the weights and the state as they were."""
    from python_api import NonFiniteError

    for poison, match in cases:
        before = (weights(model), state_without_counters(opt))
        with pytest.raises(NonFiniteError, match=match):
            step(model, opt, *batch, poison=poison)
        assert same(before, (weights(model), state_without_counters(opt)), dtype=True)


def check_host_reads(model, opt, batches, generic: bool, closure_of=make_closure) -> list:
    """At most one host read per step (two on a SAM step over a base torch cannot fuse);
    none at all for an optimizer without host decisions (ESAM) over SGD / AdamW."""
    decisions = []
    for x, y in batches:
        closure = closure_of(model, x, y)
        opt.zero_grad()
        with HostReads(SCALAR_READS) as spy:
            opt.step(closure)
        decision = getattr(opt, "last_decision", None)
        decisions.append(decision)
        if opt.host_decisions:
            allowed = 1 + (1 if generic and decision == 1 else 0)
        else:
            allowed = 1 if generic else 0
        assert spy.reads <= allowed, (spy.reads, decision)
        assert spy.kernels() > 10  # the spy saw the step
    return decisions


def check_bn_untouched(model, opt, batches, step=run_step) -> list:
    """BN buffers after each step equal those of one forward at w (model= given)."""
    decisions = []
    for x, y in batches:
        ref = copy.deepcopy(model)
        ref(x.to(ref.w1.dtype))  # one forward at w, in training mode
        step(model, opt, x, y)
        decisions.append(getattr(opt, "last_decision", None))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(model.bn, name), getattr(ref.bn, name)), name
        assert model.bn.momentum == 0.1 and not hasattr(model.bn, "backup_momentum")
    return decisions


def check_exact_restore(model, opt, batches, step=run_step) -> list:
    """With lr = 0 and no weight decay the weights stay bit-identical."""
    before = weights(model)
    decisions = []
    for x, y in batches:
        step(model, opt, x, y)
        decisions.append(getattr(opt, "last_decision", None))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return decisions


def check_resume(factory, batches, stop: int, step=run_step) -> None:
    """Stop after ``stop`` steps, checkpoint, resume in a fresh optimizer: bit-identical."""
    model, opt = factory()
    for x, y in batches[:stop]:
        step(model, opt, x, y)
    ckpt = save_and_load(opt.state_dict(), model.state_dict())
    for x, y in batches[stop:]:
        step(model, opt, x, y)
    fresh_model, fresh_opt = factory(init_seed=123)  # different initial weights and seed
    fresh_model.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh_opt.steps_taken == stop
    for x, y in batches[stop:]:
        step(fresh_model, fresh_opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))
    assert same(opt.state_dict(), fresh_opt.state_dict(), dtype=True)
