"""Memory of the algorithms' own state (issue 14, item 6).

Bytes per fp32 parameter (4 = one full copy) of the algorithm's own tensors: what the optimizer
holds between steps (``opt.state`` and any tensor reachable from its attributes: plans, caches)
plus the peak of what it allocates inside a step, excluding the base optimizer's state
(momentum, Adam moments) and the gradients (every tensor autograd writes into ``p.grad`` during
an evaluation; a step may keep such a gradient after dropping it from ``p.grad``, as CR-SAM keeps
``g0`` and ``g+``). Targets: SAM 4, CR-SAM 8, Frob-SAM 12, Trace-SAM and Det-SAM 8.

The peak is measured by a ``TorchDispatchMode`` that follows every tensor a dispatched op
allocates outside the closure (weak references to the storages: a storage freed is no longer
counted) and samples the live total between the fused ops: temporaries that live inside one
``sam_kernels`` op (the eager reference's foreach intermediates) are that op's working memory,
freed when it returns, and are reported apart (``in_op_peak``), not checked here.
"""

from __future__ import annotations

import functools
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sam_kernels as sk
from python_api.crsam import CRSAM
from python_api.sam import SAM
from python_api.universal import DetSAM, FrobSAM, TraceSAM

#: tensors smaller than this are scalars (coefficients, flags, norms), not per-parameter state
MIN_NUMEL = 256
SIZES = ((64, 64), (48, 32), (1024,))
N_PARAMS = sum(torch.Size(s).numel() for s in SIZES)

#: (name, class, kwargs, target bytes per parameter)
ALGOS = [
    ("SAM", SAM, {"rho": 0.05}, 4),
    ("CRSAM", CRSAM, {"rho": 0.05}, 8),
    ("CRSAM-log", CRSAM, {"rho": 0.05, "log_form": True}, 8),
    ("FrobSAM", FrobSAM, {"rho": 0.01, "n_samples": 3, "lam": 0.01}, 12),
    ("TraceSAM", TraceSAM, {"rho": 0.01, "n_samples": 2, "lam": 0.1}, 8),
    ("DetSAM", DetSAM, {"rho": 1.0, "n_samples": 2, "lam": 0.01, "half_cube_len": 0.01}, 8),
]
BASES = [
    ("sgd", torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    ("adamw", torch.optim.AdamW, {"lr": 1e-3}),
]
# the measurement runs on CPU tensors: Triton there only under its interpreter (the test-suite's
# default without a GPU; tests/conftest.py leaves it off on a GPU machine)
BACKENDS = [b for b in ("eager", "triton", "cuda") if sk.available(b, "cpu")]

#: the fused ops the algorithms call (sampling of the live total pauses inside them)
OPS = (
    "perturb_",
    "restore_",
    "noise_perturb_",
    "sgd_step_",
    "adamw_step_",
    "lincomb_",
    "frob_accumulate_",
    "grad_norm",
    "finite_flag",
)


class LiveAllocations(TorchDispatchMode):
    """Bytes of live storages allocated by dispatched ops while ``counting``."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = True
        self.in_op = 0
        self.live = 0
        self.reset()

    def reset(self) -> None:
        self.live = 0
        self._seen: dict[int, weakref.ref] = {}
        # every allocation in order, and the live total at each sample with the number of
        # allocations made by then: the base optimizer's state created in a step (momentum,
        # Adam moments on the first step) is taken out afterwards
        self.log: list[tuple[weakref.ref, int]] = []
        self.samples: list[tuple[int, int]] = []  # outside the fused ops
        self.in_op_samples: list[tuple[int, int]] = []  # any time

    def peaks(self, excluded: set[int]) -> tuple[int, int]:
        """The peaks outside the fused ops and at any time, less the storages in ``excluded``
        (``data_ptr``) from their allocation on."""
        out = []
        for samples in (self.samples, self.in_op_samples):
            best = 0
            for live, n in samples:
                for ref, nbytes in self.log[:n]:
                    s = ref()
                    if s is not None and s.data_ptr() in excluded:
                        live -= nbytes
                best = max(best, live)
            out.append(best)
        return out[0], out[1]

    def sample(self) -> None:
        self.samples.append((self.live, len(self.log)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.counting:
            return out
        # views and in-place results share an input's storage: not an allocation
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.numel() < MIN_NUMEL:
                continue
            s = t.untyped_storage()
            if s.data_ptr() in inputs:
                continue
            key = id(s)
            if key in self._seen and self._seen[key]() is s:
                continue  # a view or an in-place result of a storage already counted
            nbytes = s.nbytes()
            self.live += nbytes
            ref = weakref.ref(s, functools.partial(self._free_cb, nbytes, key))
            self._seen[key] = ref
            self.log.append((ref, nbytes))
        self.in_op_samples.append((self.live, len(self.log)))
        if not self.in_op:
            self.sample()
        return out

    def _free_cb(self, nbytes: int, key: int, _ref) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)


def _held_storages(opt) -> dict[int, int]:
    """Storages of per-parameter size reachable from the optimizer's own attributes (its state,
    plans and caches), less the parameters, their gradients and the base optimizer's state."""
    base = opt.base_optimizer
    skip: set[int] = set()
    for g in opt.param_groups:
        for p in g["params"]:
            skip.add(p.untyped_storage().data_ptr())
            if p.grad is not None:
                skip.add(p.grad.untyped_storage().data_ptr())
    for st in base.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                skip.add(v.untyped_storage().data_ptr())
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack: list = [opt.__dict__]
    while stack:
        o = stack.pop()
        if id(o) in seen or o is base or isinstance(o, (nn.Module, type, weakref.ref)):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.numel() >= MIN_NUMEL:
                s = o.untyped_storage()
                if s.data_ptr() not in skip:
                    found[s.data_ptr()] = s.nbytes()
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif not callable(o):
            if hasattr(o, "__dict__"):
                stack.append(vars(o))
            for klass in type(o).__mro__:
                for name in getattr(klass, "__slots__", ()):
                    if hasattr(o, name):
                        stack.append(getattr(o, name))
    return found


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.5) for s in SIZES]


def _loss(params):
    return sum(((torch.sin(p) * p).sum() + 0.1 * (p * p).sum()) for p in params) / N_PARAMS


def _measure(cls, kwargs, base_cls, base_kwargs, backend, steps=3):
    params = _params()
    opt = cls(params, base_cls, backend=backend, **kwargs, **base_kwargs)
    mode = LiveAllocations()

    def closure():
        mode.counting = False  # the evaluation's activations and gradients are not counted
        try:
            with torch.enable_grad():
                loss = _loss(params)
                loss.backward()
            return loss.detach()
        finally:
            mode.counting = True

    originals = {name: getattr(sk, name) for name in OPS if hasattr(sk, name)}

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            mode.in_op += 1
            try:
                return fn(*a, **k)
            finally:
                mode.in_op -= 1
                if not mode.in_op:
                    mode.sample()

        return inner

    held_between: list[int] = []
    peaks: list[int] = []
    in_op_peaks: list[int] = []
    try:
        for name, fn in originals.items():
            setattr(sk, name, wrap(fn))
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            held = sum(_held_storages(opt).values())
            held_between.append(held)
            mode.reset()
            with mode:
                opt.step(closure)
            base_state = {
                v.untyped_storage().data_ptr()
                for st in opt.base_optimizer.state.values()
                for v in st.values()
                if isinstance(v, torch.Tensor)
            }
            peak, in_op_peak = mode.peaks(base_state)
            peaks.append(held + peak)
            in_op_peaks.append(held + in_op_peak)
            mode.reset()  # no callbacks into a later step's totals
        opt.zero_grad(set_to_none=True)
        held_between.append(sum(_held_storages(opt).values()))
    finally:
        for name, fn in originals.items():
            setattr(sk, name, fn)
    assert opt.steps_taken == steps  # every measured step was applied (not skipped)
    per = N_PARAMS  # bytes per parameter
    return (
        [b / per for b in held_between],
        [b / per for b in peaks],
        [b / per for b in in_op_peaks],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", BASES, ids=[b[0] for b in BASES])
@pytest.mark.parametrize("algo", ALGOS, ids=[a[0] for a in ALGOS])
def test_own_state_bytes_per_parameter(algo, base, backend):
    name, cls, kwargs, target = algo
    _, base_cls, base_kwargs = base
    held, peak, _ = _measure(cls, kwargs, base_cls, base_kwargs, backend)
    # between steps: at most the one backup copy every SAM-family optimizer keeps
    assert max(held) <= 4.0, (name, held)
    # inside a step (what is held plus the peak of what the step allocates)
    assert max(peak) <= target, (name, peak, target)


@pytest.mark.parametrize("algo", ALGOS[1:], ids=[a[0] for a in ALGOS[1:]])
def test_no_plan_keeps_step_scratch(algo):
    """After a step, nothing of the step's scratch is reachable from the optimizer (a cached
    plan holding a dropped buffer would keep its memory alive): only the backups remain."""
    _, cls, kwargs, _ = algo
    params = _params()
    opt = cls(params, torch.optim.SGD, lr=0.01, momentum=0.9, backend="eager", **kwargs)

    def closure():
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = _loss(params)
            loss.backward()
        return loss.detach()

    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    opt.zero_grad(set_to_none=True)
    held = _held_storages(opt)
    backups = {opt.state[p]["backup"].untyped_storage().data_ptr() for p in params}
    assert set(held) == backups
    for p in params:
        assert set(opt.state[p]) <= set(type(opt)._transient_state) | {"backup"}


@pytest.mark.parametrize("algo", ALGOS[1:], ids=[a[0] for a in ALGOS[1:]])
def test_kept_gradients_that_are_views_are_copied(algo):
    """A gradient that is a view of a buffer the next backward writes again (DDP's
    ``gradient_as_bucket_view``) is copied, not kept: the steps equal those with plain
    gradients, bit for bit."""
    _, cls, kwargs, _ = algo

    def run(bucketed: bool):
        torch.manual_seed(0)  # the eager noise of the universal class
        params = _params(1)
        bucket = torch.zeros(N_PARAMS)
        views = []
        start = 0
        for p in params:
            views.append(bucket[start : start + p.numel()].view_as(p))
            start += p.numel()
        opt = cls(params, torch.optim.SGD, lr=0.05, momentum=0.9, backend="eager", **kwargs)

        def closure():
            with torch.enable_grad():
                loss = _loss(params)
                loss.backward()
            if bucketed:  # the same bucket memory at every evaluation
                for p, v in zip(params, views):
                    v.copy_(p.grad)
                    p.grad = v
            return loss.detach()

        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            opt.step(closure)
        return [p.detach().clone() for p in params]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
