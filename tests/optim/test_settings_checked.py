"""Bad settings and half-done steps refused before anything changes (found by a failure probe).

- a value written into ``param_groups`` between steps (by hand, a scheduler) is checked at the
  next step: the class's own (``rho``) and those of the SGD/AdamW step the package applies
  itself (``lr``, ``momentum``, ``dampening``, ``betas``, ``eps``); the error names the key,
  and weights and state are exactly as before (they were used as given: ``rho = -1`` ascended
  against the gradient, a NaN ``lr`` wrote NaN weights, a string failed half way);
- infinite radii and weights are refused at construction (every step was skipped silently, or
  the weights became non-finite);
- MSAM and AdamW-MSAM skip (or raise on) a non-finite loss, as the shared rule says;
- AE-SAM's statistics are left as they were when its second evaluation is refused;
- a closure that runs no backward at the perturbed point is an error, not a base step along
  momentum and weight decay alone;
- a sparse gradient's error names the parameter.
"""

from __future__ import annotations

import math

import pytest
import torch
from _optim_table import FORWARD_ONLY, NAMES, Net, batches, build, make_closure, run_steps

from python_api import MSAM, SAM, AdamWMSAM
from python_api.aesam import AESAM

DATA = batches(3)


def _flat(x, path=""):
    """(path, value) pairs of a nested state dict."""
    if isinstance(x, dict):
        return [kv for k in sorted(x, key=str) for kv in _flat(x[k], f"{path}/{k}")]
    if isinstance(x, (list, tuple)):
        return [kv for i, v in enumerate(x) for kv in _flat(v, f"{path}/{i}")]
    return [(path, x)]


def _same(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    if [p for p, _ in fa] != [p for p, _ in fb]:
        return False
    for (_, x), (_, y) in zip(fa, fb):
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y and not (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
            return False
    return True


def _pair(name, base):
    """Two identical models and optimizers, two steps taken by each."""
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Net()
        opt = build(name, base, model)
        torch.manual_seed(1)
        run_steps(name, model, opt, DATA[:2])
        out.append((model, opt))
    return out


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


def _unchanged(model, opt, snap) -> bool:
    """Weights and every entry of the state dict but the groups (which hold the edit)."""
    weights, sd = snap
    now = opt.state_dict()
    rest = [k for k in sd if k != "param_groups"]
    return all(torch.equal(a, p) for a, p in zip(weights, model.parameters())) and _same(
        {k: sd[k] for k in rest}, {k: now.get(k) for k in rest}
    )


EDITS = [
    ("sgd", "rho", -1.0),
    ("sgd", "rho", float("nan")),
    ("sgd", "rho", "0.1"),
    ("sgd", "lr", float("nan")),
    ("sgd", "momentum", None),
    ("sgd", "dampening", "0.1"),
    ("adamw", "lr", float("inf")),
    ("adamw", "betas", (0.9, 1.5)),
    ("adamw", "eps", float("nan")),
]


@pytest.mark.parametrize("base,key,value", EDITS, ids=[f"{b}-{k}-{v!r}" for b, k, v in EDITS])
@pytest.mark.parametrize("name", NAMES)
def test_a_bad_value_written_into_a_group_is_refused_before_the_step(name, base, key, value):
    (model, opt), (twin_model, twin) = _pair(name, base)
    snap = _snapshot(model, opt)
    old = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    x, y = DATA[2]
    with pytest.raises(ValueError, match=key):
        opt.step(make_closure(name, model, x, y))
    assert _unchanged(model, opt, snap), "a refused step changed the weights or the state"
    # the value put back: the next step is the one of a twin that never saw the edit
    opt.param_groups[0][key] = old
    for m, o in ((model, opt), (twin_model, twin)):
        torch.manual_seed(2)
        o.zero_grad()
        o.step(make_closure(name, m, x, y))
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_infinite_rho_refused_at_construction(name):
    with pytest.raises(ValueError, match="rho must be a finite number"):
        build(name, "sgd", Net(), rho=float("inf"))


def test_first_and_second_step_check_the_groups():
    """The halves check too; a value refused at ``second_step`` restores ``w`` first."""
    torch.manual_seed(0)
    model = Net()
    opt = SAM(model.groups(), torch.optim.SGD, lr=0.05, momentum=0.9)
    x, y = DATA[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.param_groups[0]["rho"] = -0.5
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    opt.param_groups[0]["rho"] = 0.05
    w = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.second_step()
    assert all(torch.equal(a, p) for a, p in zip(w, model.parameters()))


@pytest.mark.parametrize("cls", [MSAM, AdamWMSAM])
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_msam_nonfinite_loss_changes_nothing(cls, mode):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = cls(model.parameters(), lr=0.05, on_nonfinite=mode)
    x = torch.randn(8, 4)

    def closure(bad=False):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss * float("nan") if bad else loss

    opt.step(closure)
    snap = _snapshot(model, opt)
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="loss"):
            opt.step(lambda: closure(bad=True))
    else:
        opt.step(lambda: closure(bad=True))
        assert opt.skipped_steps == 1
    assert _unchanged(model, opt, snap)


@pytest.mark.parametrize("name", ["MSAM", "AdamWMSAM"])
def test_msam_group_edit_refused_before_the_move_up(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = (MSAM if name == "MSAM" else AdamWMSAM)(model.parameters(), lr=0.05)
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    snap = _snapshot(model, opt)
    opt.param_groups[0]["rho"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\]: rho"):
        opt.step(closure)
    assert _unchanged(model, opt, snap)


def test_aesam_statistics_unchanged_when_the_second_evaluation_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = AESAM(
        model.parameters(), torch.optim.SGD, lr=0.05, delta=0.5, lambda1=-10.0, lambda2=-10.0
    )
    x = torch.randn(8, 4)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        if len(calls) == 2:  # the evaluation at w + e: a sparse gradient, refused
            model.bias.grad = model.bias.grad.to_sparse()
        return loss

    before = opt.state_dict()
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step(closure)
    assert len(calls) == 2, "the step did not reach its second evaluation"
    assert all(torch.equal(a, p) for a, p in zip(w, model.parameters()))
    assert _same(before, opt.state_dict())


@pytest.mark.parametrize("name", [n for n in NAMES if n not in FORWARD_ONLY])
def test_a_closure_without_backward_at_the_perturbed_point_is_an_error(name):
    (model, opt), _ = _pair(name, "sgd")
    x, y = DATA[2]
    calls = []

    def closure():
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if len(calls) == 1:  # at w; at the perturbed point no backward
            loss.backward()
        return loss

    snap = _snapshot(model, opt)
    opt.zero_grad()
    try:
        opt.step(closure)
    except RuntimeError as e:
        assert "loss.backward()" in str(e)
        assert _unchanged(model, opt, snap)
        return
    # a step with one evaluation (a switching class deciding on its cheap step)
    assert len(calls) == 1, f"{name}: the perturbed evaluation without gradients was stepped"


def test_sparse_gradient_error_names_the_parameter():
    model = torch.nn.Linear(4, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    model.bias.grad = model.bias.grad.to_sparse()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(2,\)\)"):
        opt.step(lambda: None)
