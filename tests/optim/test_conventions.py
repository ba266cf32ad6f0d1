"""torch's optimizer conventions, over the whole optimizer table.

Step hooks once per step in both forms (and an LR scheduler stepped after the optimizer gives no
warning), torch's implementation flags for the base (``foreach``/``fused``/``capturable``),
``repr``, ``scaler=`` in the step's signature, ``__version__``, ``py.typed`` and the helpful
error for ``from sam_kernels import SAM``.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
from _optim_table import BASES, NAMES, SPECS, Net, batches, build, make_closure, opt_class
from torch.optim import Optimizer
from torch.optim.lr_scheduler import StepLR
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import python_api
import sam_kernels
from python_api import SAM

ROOT = Path(__file__).resolve().parents[2]
TWO_CALL = [n for n in NAMES if hasattr(opt_class(n), "first_step")]


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


def two_call_step(model, opt, x, y):
    """davda54/sam's loop: backward at w, first_step, backward at w + e, second_step."""
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def test_two_call_form_is_defined_exactly_where_expected():
    """first_step and second_step come together; the classes without them take step(closure)."""
    for name in NAMES:
        cls = opt_class(name)
        assert hasattr(cls, "first_step") == hasattr(cls, "second_step"), name
    assert TWO_CALL == ["SAM", "ASAM"]


# ----------------------------------------------------------------- step hooks
class Recorder:
    """Pre/post step hooks on one optimizer and global ones, all recording into one list."""

    def __init__(self, opt) -> None:
        self.events: list[tuple[str, object, tuple, dict]] = []
        self.weights_at_pre: list[torch.Tensor] = []
        self.handles = [
            opt.register_step_pre_hook(self._hook("pre")),
            opt.register_step_post_hook(self._hook("post")),
            register_optimizer_step_pre_hook(self._hook("global_pre")),
            register_optimizer_step_post_hook(self._hook("global_post")),
        ]

    def _hook(self, kind):
        def hook(o, args, kwargs):
            self.events.append((kind, o, args, kwargs))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def kinds(self, opt) -> list[str]:
        # the global hooks see every optimizer (a generic base's own step too): keep ours
        return [k for k, o, _, _ in self.events if o is opt]


ONE_STEP = ["global_pre", "pre", "post", "global_post"]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_step_hooks_once_per_closure_step(name, base):
    model = Net()
    opt = build(name, base, model)
    rec = Recorder(opt)
    try:
        for i, (x, y) in enumerate(batches(3)):
            opt.zero_grad()
            closure = make_closure(name, model, x, y)
            opt.step(closure)
            assert rec.kinds(opt) == ONE_STEP * (i + 1)
    finally:
        rec.remove()
    # torch's hook arguments: (optimizer, args of step including the optimizer, kwargs)
    _, o, args, kwargs = rec.events[-1]
    assert o is opt and args[0] is opt and callable(args[1]) and kwargs == {}


@pytest.mark.parametrize("name2", TWO_CALL)
def test_step_hooks_once_per_two_call_step(name2):
    model = Net()
    opt = build(name2, "sgd", model)
    seen = []  # the weights each hook sees: pre at w (before the ascent), post after the step
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", model.l1.weight.clone())))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", model.l1.weight.clone())))
    rec = Recorder(opt)
    try:
        for i, (x, y) in enumerate(batches(3)):
            w0 = model.l1.weight.detach().clone()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            assert rec.kinds(opt) == ONE_STEP * i + ONE_STEP[:2]  # pre-hooks only so far
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            assert rec.kinds(opt) == ONE_STEP * (i + 1)
            (k0, at_pre), (k1, at_post) = seen[-2:]
            assert (k0, k1) == ("pre", "post")
            assert torch.equal(at_pre, w0)
            assert torch.equal(at_post, model.l1.weight) and not torch.equal(at_post, w0)
    finally:
        rec.remove()
    # as for opt.step() with no argument
    _, o, args, kwargs = rec.events[-1]
    assert o is opt and args == (opt,) and kwargs == {}


def test_two_call_pre_hook_replacing_arguments_is_refused():
    model = Net()
    opt = build("SAM", "sgd", model)
    x, y = batches(1)[0]
    h = opt.register_step_pre_hook(lambda o, args, kwargs: (args, kwargs))  # unchanged: fine
    two_call_step(model, opt, x, y)
    h.remove()
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o, lambda: None), {}))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))  # nothing moved


FORMS = [(n, "closure") for n in NAMES] + [(n, "two_call") for n in TWO_CALL]


@pytest.mark.parametrize("on", ["wrapper", "base"])
@pytest.mark.parametrize(("name", "form"), FORMS)
def test_lr_scheduler_after_step_gives_no_warning(name, form, on):
    """StepLR stepped after each optimizer step, warnings as errors: no "lr_scheduler.step()
    before optimizer.step()" warning, and the schedule advances once per step (a scheduler on
    the wrapper, or on the base optimizer instance it wraps)."""
    model = Net()
    cls, hp = BASES["sgd"]
    _, _, kw, _ = SPECS[name]
    base = cls(model.groups(), **hp)
    opt = opt_class(name)(None, base, model=model, **kw)
    lr0 = [g["lr"] for g in opt.param_groups]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = StepLR(opt if on == "wrapper" else base, step_size=1, gamma=0.5)
        for x, y in batches(3):
            opt.zero_grad()
            if form == "closure":
                opt.step(make_closure(name, model, x, y))
            else:
                two_call_step(model, opt, x, y)
            sched.step()
    assert [g["lr"] for g in opt.param_groups] == [lr * 0.5**3 for lr in lr0]


def test_lr_scheduler_warns_when_stepped_first():
    """The check above can fail: stepping the scheduler before the optimizer still warns."""
    model = Net()
    opt = build("SAM", "sgd", model)
    sched = StepLR(opt, step_size=1)
    with pytest.warns(UserWarning, match="before `optimizer.step"):
        sched.step()


def test_copy_after_lr_scheduler_steps_the_copy(name):
    """An LR scheduler wraps ``opt.step`` on the instance (bound to that optimizer); a deep
    copy must step its own parameters, not the original's."""
    model = Net()
    opt = build(name, "sgd", model)
    StepLR(opt, step_size=1)
    both = copy.deepcopy({"model": model, "opt": opt})
    model2, opt2 = both["model"], both["opt"]
    before, before2 = copy.deepcopy(model.state_dict()), copy.deepcopy(model2.state_dict())
    x, y = batches(1)[0]
    opt2.step(make_closure(name, model2, x, y))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(before2["l1.weight"], model2.l1.weight)


# ----------------------------------------------------------------- foreach / fused / capturable
def _train(name, base, model, steps=3, **flags):
    opt = build(name, base, model, **flags)
    calls = []
    opt.base_optimizer.register_step_post_hook(lambda o, a, k: calls.append(1))
    for x, y in batches(steps):
        opt.zero_grad()
        opt.step(make_closure(name, model, x, y))
    return opt, len(calls)


KEEP_FUSED = [
    {"foreach": None},
    {"foreach": True},
    {"fused": None},
    {"fused": True},
    {"capturable": True},  # AdamW only (torch.optim.SGD has no capturable flag)
    {"capturable": False},
]
KEEP_CASES = [
    (base, flags) for base in ("sgd", "adamw") for flags in KEEP_FUSED
    if base == "adamw" or "capturable" not in flags
]  # fmt: skip


@pytest.mark.parametrize(
    ("base", "flags"),
    KEEP_CASES,
    ids=[f"{b}-" + ",".join(f"{k}={v}" for k, v in f.items()) for b, f in KEEP_CASES],
)
def test_flags_that_keep_the_fused_step(base, flags):
    """None/True (and any capturable) keep the wrapper's fused step: the base's own step never
    runs and the weights are bit-identical to the default's."""
    torch.manual_seed(0)
    ref_model = Net()
    model = Net()
    model.load_state_dict(ref_model.state_dict())
    ref, _ = _train("SAM", base, ref_model)
    opt, base_steps = _train("SAM", base, model, **flags)
    assert opt._fused == base and base_steps == 0
    for k, v in flags.items():
        assert all(g[k] == v for g in opt.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model.parameters()))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_flags_false_are_honoured_by_torch_step(name, base, flag, monkeypatch):
    """foreach=False / fused=False: torch's own step runs once per step with that flag (the
    base's step hook fires), giving the fused path's values up to rounding.

    Both runs use the eager reference's ops (torch's own arithmetic, as torch's step): the
    compiled extension, the CPU default, rounds differently, which CR-SAM's log form amplifies
    beyond this comparison's bound (tests/ops/test_cuda_ext.py compares it with eager)."""
    monkeypatch.setenv("SAM_KERNELS_BACKEND", "eager")
    torch.manual_seed(0)
    ref_model = Net()
    model = Net()
    model.load_state_dict(ref_model.state_dict())
    torch.manual_seed(1)
    _train(name, base, ref_model)
    torch.manual_seed(1)
    opt, base_steps = _train(name, base, model, **{flag: False})
    assert opt._fused is None and base_steps == 3
    assert all(g[flag] is False for g in opt.base_optimizer.param_groups)
    for (n, a), b in zip(ref_model.named_parameters(), model.parameters()):
        if n != "l1.bias":  # before BN its gradient is rounding noise, which Adam amplifies
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_flag_false_on_a_base_instance_is_honoured():
    model = Net()
    base = torch.optim.AdamW(model.groups(), lr=0.01, foreach=False)
    opt = SAM(None, base)
    calls = []
    base.register_step_post_hook(lambda o, a, k: calls.append(1))
    x, y = batches(1)[0]
    opt.step(make_closure("SAM", model, x, y))
    assert opt._fused is None and calls == [1]


# ----------------------------------------------------------------- repr
class MySGD(torch.optim.SGD):
    pass


def test_repr_is_torchs_with_the_base(name):
    model = Net()
    opt = build(name, "sgd", model)
    text = repr(opt)
    lines = text.splitlines()
    assert lines[:2] == [f"{type(opt).__name__} (", "base_optimizer: SGD"]
    # the rest is torch's Optimizer.__repr__, line for line: every group, every hyper-parameter
    assert [lines[0]] + lines[2:] == Optimizer.__repr__(opt).splitlines()
    for i, g in enumerate(opt.param_groups):
        assert f"Parameter Group {i}" in lines
        for k in ("lr", "momentum", "rho", "weight_decay"):
            assert f"    {k}: {g[k]}" in text
    assert "    rho: 0.0" in lines and "    rho: 0.02" in lines  # the groups' own values


def test_repr_names_a_base_outside_torch_by_module():
    model = Net()
    opt = SAM(model.parameters(), MySGD, lr=0.1)
    assert repr(opt).splitlines()[1] == f"base_optimizer: {__name__}.MySGD"


# ----------------------------------------------------------------- scaler= in the signature
def test_scaler_in_step_signature(name):
    model = Net()
    opt = build(name, "sgd", model)
    original = inspect.signature(inspect.unwrap(type(opt).step))
    for _ in range(2):  # as built, then with an LR scheduler's wrapper on the instance
        sig = inspect.signature(opt.step)
        p = sig.parameters["scaler"]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None
        assert [q for q in sig.parameters if q != "self"] == [
            q for q in original.parameters if q != "self"
        ] + ["scaler"]
        StepLR(opt, step_size=1)
    # the signature tells the truth: a call it accepts runs
    x, y = batches(1)[0]
    opt.step(make_closure(name, model, x, y), scaler=torch.amp.GradScaler("cpu", enabled=False))


# ----------------------------------------------------------------- packaging
def test_version_matches_pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        meta = tomllib.load(f)
    version = meta["project"]["version"]
    assert python_api.__version__ == version
    assert sam_kernels.__version__ == version


def test_py_typed_markers_are_shipped():
    with open(ROOT / "pyproject.toml", "rb") as f:
        meta = tomllib.load(f)["tool"]["setuptools"]
    include = meta["packages"]["find"]["include"]
    data = meta["package-data"]
    for pkg in ("python_api", "sam_kernels"):
        assert (ROOT / pkg / "py.typed").is_file()
        assert "py.typed" in data[pkg]
        assert any(pat.rstrip("*") == pkg for pat in include)


def test_wrong_import_says_where_the_optimizers_are():
    for name in python_api.__all__:
        with pytest.raises(ImportError, match=f"from python_api import {name}$"):
            exec(f"from sam_kernels import {name}", {})
    with pytest.raises(ImportError, match=r"from python_api import SAM \(ASAM is SAM"):
        exec("from sam_kernels import ASAM", {})
    assert sam_kernels._PYTHON_API_NAMES == set(python_api.__all__)
    assert not hasattr(sam_kernels, "no_such_name")  # any other name: a plain AttributeError
    # sam_kernels still never imports python_api
    code = (
        "import sys\n"
        "try:\n    from sam_kernels import SAM\nexcept ImportError:\n    pass\n"
        "assert 'python_api' not in sys.modules, 'sam_kernels imported python_api'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
