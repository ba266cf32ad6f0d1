"""The fused base step's cached plan (issue 14): rebuilt when it must be, reused when it may.

Each case runs SAM with rho = 0 (the base step alone, with g0) next to ``torch.optim.SGD`` /
``AdamW`` on a copy of the model through the same events, and counts the plan builds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from python_api import SAM


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)
        self.extra = nn.Parameter(torch.randn(2))

    def forward(self, x, use_b=True):
        h = torch.tanh(self.a(x))
        return (self.b(h) if use_b else h[:, :2]) + self.extra


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}


def _pair(base, params_of=lambda m: [m.a.weight, m.a.bias, m.b.weight, m.b.bias]):
    torch.manual_seed(0)
    m = Two()
    r = copy.deepcopy(m)
    cls, hp = BASES[base]
    opt = SAM(params_of(m), cls, rho=0.0, **hp)
    ref = cls(params_of(r), **hp)
    builds = [0]
    real = opt._build_base_plan

    def spy(*a, **k):
        builds[0] += 1
        return real(*a, **k)

    opt._build_base_plan = spy
    return m, r, opt, ref, builds


def _step(m, r, opt, ref, seed, use_b=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g)
    for model, o in ((m, opt), (r, ref)):
        o.zero_grad()
        model(x.to(model.a.weight.dtype), use_b).square().mean().backward()
    opt.first_step()
    opt.second_step()
    ref.step()


def _close(m, r):
    # fp32 rounding of two implementations (AdamW's division differs by an ulp); a plan that
    # stepped stale buffers would be off by the size of a step (>1e-3 here)
    for p, q in zip(m.parameters(), r.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_plan_reused_in_steady_state(base):
    m, r, opt, ref, builds = _pair(base)
    for s in range(6):
        _step(m, r, opt, ref, s)
    _close(m, r)
    # the first step creates the state (momentum / moments): built again once it exists
    assert builds[0] == 2


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_plan_rebuilt_when_a_parameter_loses_or_gains_its_gradient(base):
    m, r, opt, ref, builds = _pair(base)
    for s, use_b in enumerate([True, True, False, False, True, False, True, True]):
        _step(m, r, opt, ref, s, use_b)
        _close(m, r)
    # 2 + lost b's gradients; when they come back (and at every switch after) the plan of the
    # other key is the one kept from before (what AE-SAM, LookSAM and SS-SAM do at every switch
    # between a SAM step and a one-pass step), checked intact, not rebuilt
    assert builds[0] == 3


@pytest.mark.parametrize("edit", ["reset", "replace"])
def test_kept_plan_of_the_other_key_sees_state_edits(edit):
    """The plan kept for the other key is checked like the current one before it is used: a
    state reset or a replaced buffer while it waited is seen (the step matches torch's)."""
    m, r, opt, ref, builds = _pair("sgd")
    for s, use_b in enumerate([True, True, False]):
        _step(m, r, opt, ref, s, use_b)
    for o, model in ((opt.base_optimizer, m), (ref, r)):
        if edit == "reset":
            o.state[model.b.weight] = {}
        else:
            st = o.state[model.b.weight]
            st["momentum_buffer"] = torch.ones_like(st["momentum_buffer"])
    for s in range(3, 6):
        _step(m, r, opt, ref, s, True)
        _close(m, r)
    assert builds[0] >= 4  # not the kept plan of step 2


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_plan_rebuilt_on_add_param_group(base):
    m, r, opt, ref, builds = _pair(base)
    for s in range(3):
        _step(m, r, opt, ref, s)
    opt.add_param_group({"params": [m.extra]})
    ref.add_param_group({"params": [r.extra]})
    for s in range(3, 6):
        _step(m, r, opt, ref, s)
    _close(m, r)
    assert not torch.equal(m.extra, Two().extra)  # the new group is stepped
    assert builds[0] == 4


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_plan_rebuilt_on_load_state_dict(base):
    m, r, opt, ref, builds = _pair(base)
    for s in range(3):
        _step(m, r, opt, ref, s)
    sd, sd_ref = copy.deepcopy(opt.state_dict()), copy.deepcopy(ref.state_dict())
    w, w_ref = copy.deepcopy(m.state_dict()), copy.deepcopy(r.state_dict())
    for s in range(3, 5):
        _step(m, r, opt, ref, s)
    # back to step 3 and on again: the plan must use the loaded buffers, not the old ones
    m.load_state_dict(w)
    r.load_state_dict(w_ref)
    opt.load_state_dict(sd)
    ref.load_state_dict(sd_ref)
    before = builds[0]
    for s in range(3, 5):
        _step(m, r, opt, ref, s)
    _close(m, r)
    assert builds[0] > before


def test_plan_sees_a_replaced_state_tensor():
    m, r, opt, ref, builds = _pair("sgd")
    for s in range(3):
        _step(m, r, opt, ref, s)
    for o, model in ((opt.base_optimizer, m), (ref, r)):
        st = o.state[model.a.weight]
        st["momentum_buffer"] = torch.zeros_like(st["momentum_buffer"])
    _step(m, r, opt, ref, 3)
    _close(m, r)
    assert builds[0] == 3


def test_plan_rebuilt_on_dtype_change():
    m, r, opt, ref, builds = _pair("sgd")
    for s in range(3):
        _step(m, r, opt, ref, s)
    m.double()
    r.double()
    ref.load_state_dict(ref.state_dict())  # torch casts its state when it is loaded
    for s in range(3, 5):
        _step(m, r, opt, ref, s)
    _close(m, r)
    assert m.a.weight.dtype == torch.float64
    assert builds[0] == 3


@pytest.mark.parametrize("backend", ["eager", "cuda"])
def test_lists_validated_once_per_plan(backend, monkeypatch):
    """The ops' list validation runs when a plan is built, not on every step: a steady-state
    SAM step runs its fused ops under ``sam_kernels.prevalidated()``."""
    import sam_kernels as sk
    from sam_kernels.ops import _common

    if not sk.available(backend, "cpu"):
        pytest.skip(f"the {backend} backend is not built here")
    calls = [0]
    real = _common.check_lists

    def spy(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(_common, "check_lists", spy)  # the ops' own check
    monkeypatch.setattr(sk, "check_lists", spy)  # the plans' (python_api calls it by this name)
    m = Two()
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    x = torch.randn(8, 4)
    steps = []
    for _ in range(4):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.first_step()
        m(x).square().mean().backward()
        opt.second_step()
        steps.append(calls[0])
    assert steps[0] > 0  # the plans checked their lists
    assert steps[3] == steps[2]  # steady state: none per step


def test_aliased_parameters_refused_when_the_plan_is_built():
    """Parameters that are overlapping views of one storage: refused, naming both, weights
    unchanged (the check the ops no longer repeat per step)."""
    base = torch.randn(10)
    a = nn.Parameter(base[:6])
    b = nn.Parameter(base[4:])  # shares base[4:6] with a
    opt = SAM([a, b], torch.optim.SGD, rho=0.05, lr=0.1)
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    before = base.clone()
    with pytest.raises(ValueError, match="alias"):
        opt.first_step()
    assert torch.equal(base, before)
