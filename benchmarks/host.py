"""Host overhead and CPU step of SAM next to its peers (issue 14, item 7), two sections.

``host``: the host time of one optimizer step over ResNet-50's tensor count (161) of
one-element fp32 CPU tensors, where the arithmetic costs nothing and what is left is the Python
and dispatch work of the step. ``cpu``: one step over ResNet-50's real shapes (25.6M fp32
parameters) on the CPU (``--smoke``: the first tensors of that list only).

Rows (each over an SGD-momentum and an AdamW base, the same hyper-parameters as the
optimizer-step section):

- ``torch fused``: ``torch.optim.SGD/AdamW(fused=True).step()``, the one-pass lower bound, and
  ``torch foreach``: the same with ``foreach=True``;
- ``ours``: ``python_api.SAM`` on every backend that runs on CPU tensors (``eager``; the
  compiled extension when ``sam_kernels.available(name, "cpu")``; not Triton, which runs on CPU
  tensors only in its interpreter: a skipped row says so); the default backend is marked;
- ``pytorch_optimizer``: its ``SAM`` with ``foreach=True`` (its foreach path; ``None``, its
  default, loops per tensor on the CPU); recorded as not installed when the package is absent;
- ``davda54``: davda54/sam's algorithm as a per-parameter Python loop, written in
  :mod:`benchmarks.optimizer_step` (``LoopSAM``) with torch's default base step;
- ``compiled``: a foreach SAM step written here (:class:`CompiledForeachSAM`) and passed to
  ``torch.compile`` (two compiled functions: the ascent, and restore + base step), the best a user
  can do without this package; its compile time is reported, and a compile failure is the row's
  error.

Modes: ``step()`` (one-pass torch steps), ``first+second`` (``first_step()`` and
``second_step()`` with the gradients already present; they are set outside the timed regions,
before each call) and ``step(closure)`` (a closure that only sets precomputed gradients, ``p.grad
= g``, and returns a precomputed loss; its own cost is timed with the step and reported apart;
the gradients at ``w`` are set before the step, untimed, and are other tensors than the
closure's, as after a real backward: :class:`Grads`).

Timing: ``time.perf_counter`` around the timed calls, garbage collection off while timing. All
rows of one base are timed in interleaved rounds (each round runs every row's reps, in a rotated
order), so load from other processes on a shared machine falls on every row alike; the median
over all reps is reported with the 20th / 80th percentiles. Per row also: the aten ops dispatched
by one step (a ``TorchDispatchMode``, top level, gradient setting excluded; a compiled graph's
kernels are not aten dispatches and are not counted) and the host reads among them
(``_local_scalar_dense`` i.e. ``.item()`` / ``bool()``, ``equal``, ``is_nonzero``, ``nonzero``):
each is a device synchronisation when the tensors are on a GPU.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common import Item, summarize
from benchmarks.optimizer_step import LoopSAM, OpCounter, base_optimizer
from benchmarks.shapes import Shape, model_shapes, numel

#: aten ops whose result is read on the host (a device synchronisation on a GPU)
HOST_READ_OPS = ("_local_scalar_dense", "equal", "is_nonzero", "nonzero", "allclose")
RHO = 0.05
BASES = ("SGD", "AdamW")
#: the smoke run's CPU shapes: the first tensors of ResNet-50 (stem and the first bottleneck)
SMOKE_CPU_TENSORS = 16

# ----------------------------------------------------------------------------- the compiled peer


def _sam_ascent(params: list, grads: list, backups: list, rho: float) -> None:
    """``backup = w; w += rho / (||g|| + 1e-12) * g`` over the lists (davda54's first step)."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = rho / (norm + 1e-12)
    torch._foreach_copy_(backups, params)
    torch._foreach_add_(params, torch._foreach_mul(grads, scale))


def _restore_sgd(
    params: list, grads: list, backups: list, bufs: list, lr: float, momentum: float, wd: float
) -> None:
    """``w = backup``, then torch's SGD-momentum step (no dampening, not Nesterov)."""
    torch._foreach_copy_(params, backups)
    d = torch._foreach_add(grads, params, alpha=wd)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)  # the first step gives buf = d, as torch's clone(d)
    torch._foreach_add_(params, bufs, alpha=-lr)


def _restore_adamw(
    params: list,
    grads: list,
    backups: list,
    m: list,
    v: list,
    step: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    wd: float,
) -> None:
    """``w = backup``, then torch's AdamW step (``step`` a 0-d tensor: no recompiles)."""
    torch._foreach_copy_(params, backups)
    step.add_(1)
    torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(m, grads, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    bc1 = 1 - torch.pow(beta1, step)
    bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
    denom = torch._foreach_div(torch._foreach_sqrt(v), bc2_sqrt)
    torch._foreach_add_(denom, eps)
    upd = torch._foreach_div(m, denom)
    torch._foreach_mul_(upd, lr / bc1)
    torch._foreach_sub_(params, upd)


class CompiledForeachSAM:
    """SAM (davda54's algorithm, non-adaptive) as two foreach functions, compiled once.

    ``first_step()``: ascent from the present gradients; ``second_step()``: restore and the base
    step (torch's SGD-momentum or AdamW update, written out); ``step(closure)`` as davda54's.
    ``compile=False`` runs the same functions eagerly (the tests check them against
    :class:`~benchmarks.optimizer_step.LoopSAM`).
    """

    def __init__(self, params: list, base: str, rho: float = RHO, compile: bool = True) -> None:
        self.params = list(params)
        self.rho = rho
        self.base = base
        self.backups = [torch.zeros_like(p) for p in self.params]
        _, kw = base_optimizer(base)
        self.kw = kw
        wrap = torch.compile if compile else (lambda f: f)
        self._ascent = wrap(_sam_ascent)
        if base == "SGD":
            self.state = ([torch.zeros_like(p) for p in self.params],)
            self._second = wrap(_restore_sgd)
            self._args = (kw["lr"], kw["momentum"], kw["weight_decay"])
        else:
            m = [torch.zeros_like(p) for p in self.params]
            v = [torch.zeros_like(p) for p in self.params]
            self.state = (m, v, torch.zeros((), dtype=torch.float32))
            self._second = wrap(_restore_adamw)
            self._args = (kw["lr"], 0.9, 0.999, 1e-8, kw["weight_decay"])

    @torch.no_grad()
    def first_step(self) -> None:
        self._ascent(self.params, [p.grad for p in self.params], self.backups, self.rho)

    @torch.no_grad()
    def second_step(self) -> None:
        grads = [p.grad for p in self.params]
        self._second(self.params, grads, self.backups, *self.state, *self._args)

    def step(self, closure: Callable[[], Any]) -> Any:
        self.first_step()
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss


# ----------------------------------------------------------------------------- rows


@dataclass
class Runner:
    """One row: the timed calls of one step (gradients set before each, outside the timing)."""

    label: str  # "torch fused", "ours eager", "pytorch_optimizer", "davda54", "compiled"
    family: str  # torch / ours / peer
    base: str
    mode: str  # step() / first+second / step(closure)
    phases: list[Callable[[], Any]]
    set_grads: Callable[[], None]
    info: dict = field(default_factory=dict)
    counted: bool = True  # whether a dispatch mode sees its work
    times: list[float] = field(default_factory=list)

    def rep(self) -> float:
        """One step: the timed phases' seconds summed."""
        total = 0.0
        for ph in self.phases:
            self.set_grads()
            t = time.perf_counter()
            ph()
            total += time.perf_counter() - t
        return total


class Grads:
    """Precomputed gradients for a parameter list, set by pointer (``p.grad = g``).

    Two sets, as in training, where each backward writes its own gradient tensors: ``set`` puts
    the gradients of the user's backward at ``w`` (``grads``), the closure those of the
    backward at ``w + e`` (``closure_grads``). With one set the closure would leave the very
    tensors, unchanged, that ``set`` puts back before the next step: gradients that no backward
    wrote since the step, which the package's stale-gradient rule (the spec's closure contract)
    drops, evaluating the closure at ``w`` once more (two closures per timed step, where the
    peers run one).
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(0)
        self.params = params
        self.grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        self.closure_grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        self.loss = torch.tensor(1.0)

    def set(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def closure(self) -> torch.Tensor:
        for p, g in zip(self.params, self.closure_grads):
            p.grad = g
        return self.loss


def peer_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


#: backends left out of these sections even where they can run on CPU tensors
NOT_TIMED = {
    "triton": "runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1), whose "
    "speed says nothing about the package",
}


def cpu_backends() -> list[str]:
    """The package's backends that run on CPU tensors here, Triton's interpreter apart."""
    import sam_kernels as sk

    out = []
    for name in sk.BACKENDS:
        if name in NOT_TIMED:
            continue
        try:
            if sk.available(name, "cpu"):
                out.append(name)
        except Exception:
            pass
    return out


def default_backend_cpu() -> str | None:
    import sam_kernels as sk

    try:
        return sk.backend_name("cpu")
    except Exception:
        return None


_COMPILED: dict[tuple, tuple[CompiledForeachSAM, float]] = {}
_COMPILE_FAILED: dict[tuple, str] = {}


def compiled_peer(params: list, base: str, key: tuple) -> tuple[CompiledForeachSAM, float]:
    """The compiled peer for ``params`` and its compile seconds (the first two calls), cached
    per key: it is compiled once per list, by the section's compile item."""
    if key in _COMPILED:
        return _COMPILED[key]
    if key in _COMPILE_FAILED:  # the compile item failed: do not spend its time again
        raise RuntimeError(_COMPILE_FAILED[key])
    opt = CompiledForeachSAM(params, base)
    g = Grads(params)
    g.set()
    t = time.perf_counter()
    try:
        opt.first_step()
        g.set()
        opt.second_step()
    except Exception as exc:
        _COMPILE_FAILED[key] = f"torch.compile failed: {type(exc).__name__}: {exc}"[:800]
        raise
    compile_s = time.perf_counter() - t
    _COMPILED[key] = (opt, compile_s)
    return opt, compile_s


def build_runners(
    params: list[torch.Tensor],
    base: str,
    modes: tuple[str, ...],
    key: tuple,
    with_compiled: bool | str,
) -> tuple[list[Runner], list[dict]]:
    """The rows of one base over ``params`` (shared by every row), and the rows that could not
    be built (``{"label", "error" | "skipped"}``)."""
    grads = Grads(params)
    cls, kw = base_optimizer(base)
    runners: list[Runner] = []
    failed: list[dict] = []

    def add_sam(label: str, family: str, opt: Any, info: dict) -> None:
        if "first+second" in modes:
            runners.append(
                Runner(label, family, base, "first+second", [opt.first_step, opt.second_step],
                       grads.set, dict(info))
            )  # fmt: skip
        if "step(closure)" in modes:
            runners.append(
                Runner(label, family, base, "step(closure)",
                       [lambda o=opt: o.step(grads.closure)], grads.set, dict(info))
            )  # fmt: skip

    for impl in ("fused", "foreach"):
        opt = cls(params, **kw, **{impl: True})
        runners.append(
            Runner(f"torch {impl}", "torch", base, "step()", [opt.step], grads.set, {impl: True})
        )
    from python_api import SAM

    default = default_backend_cpu()
    for backend in cpu_backends():
        label = f"ours {backend}" + (" (default)" if backend == default else "")
        try:
            opt = SAM(params, cls, rho=RHO, backend=backend, **kw)
        except Exception as exc:
            failed.append({"label": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        add_sam(label, "ours", opt, {"backend": backend, "default": backend == default})
    if "step(closure)" in modes:
        # CR-SAM's and the universal class's steps beside SAM's rows, outside the targets
        # (their own target is their op count, "about 8"). CR-SAM on the default backend; the
        # universal class (its defaults: Frob-SAM n = 2, Trace- and Det-SAM n = 1) on the
        # extension with its counter-based noise (the CPU default's reference stream, one draw
        # per tensor from the global generator, is planned too)
        from python_api import CRSAM, DetSAM, FrobSAM, TraceSAM

        counter = " (counter noise)"
        extras = [
            ("CR-SAM", CRSAM, default, " (default)", {}),
            ("Frob-SAM", FrobSAM, "ext", counter, {"seed": 0}),
            ("Trace-SAM", TraceSAM, "ext", counter, {"seed": 0}),
            ("Det-SAM", DetSAM, "ext", counter, {"seed": 0}),
        ]
        for name, algo, backend, what, extra in extras:
            label = f"ours {name} {backend}{what}"
            is_default = what == " (default)"
            try:
                opt = algo(params, cls, rho=RHO, backend=backend, **extra, **kw)
                runners.append(
                    Runner(label, f"ours {name}", base, "step(closure)",
                           [lambda o=opt: o.step(grads.closure)], grads.set,
                           {"backend": backend, "default": is_default, **extra})
                )  # fmt: skip
            except Exception as exc:
                failed.append({"label": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
    import sam_kernels as sk

    for backend, why in NOT_TIMED.items():
        if backend in sk.BACKENDS:
            failed.append({"label": f"ours {backend}", "skipped": why})
    version = peer_version("pytorch_optimizer")
    if version is None:
        failed.append({"label": "pytorch_optimizer", "skipped": "not installed"})
    else:
        try:
            po = importlib.import_module("pytorch_optimizer")
            opt = po.SAM(params, cls, rho=RHO, foreach=True, **kw)
            add_sam("pytorch_optimizer", "peer", opt, {"version": version, "foreach": True})
        except Exception as exc:
            failed.append(
                {"label": "pytorch_optimizer", "error": f"{type(exc).__name__}: {exc}"[:500]}
            )
    add_sam("davda54", "peer", LoopSAM(params, cls, rho=RHO, **kw), {"base_step": "torch default"})
    if with_compiled is True:
        try:
            opt, compile_s = compiled_peer(params, base, key)
            info = {"torch_compile": True, "compile_s": round(compile_s, 2)}
            n0 = len(runners)
            add_sam("compiled", "peer", opt, info)
            for r in runners[n0:]:
                r.counted = False
        except Exception as exc:
            failed.append({"label": "compiled", "error": f"{type(exc).__name__}: {exc}"[:800]})
    elif with_compiled:
        failed.append({"label": "compiled", "skipped": str(with_compiled)})
    return runners, failed


# ----------------------------------------------------------------------------- measuring


def count_ops(r: Runner) -> dict:
    """Top-level aten ops of one step, and the host reads among them."""
    counter = OpCounter()
    with counter:
        r.rep()
    n = sum(counter.counts.values())
    reads = sum(counter.counts.get(op, 0) for op in HOST_READ_OPS)
    return {"aten_ops": n, "host_reads": reads, "top_ops": dict(counter.counts.most_common(6))}


def measure(runners: list[Runner], warmup: int, rounds: int, reps: int) -> None:
    """Interleaved timing: ``rounds`` times, each runner ``reps`` steps (rotated order)."""
    for r in runners:
        for _ in range(warmup):
            r.rep()
    gc.collect()
    gc.disable()
    try:
        for k in range(rounds):
            order = runners[k % len(runners) :] + runners[: k % len(runners)]
            for r in order:
                for _ in range(reps):
                    r.times.append(r.rep() * 1e3)
    finally:
        gc.enable()


def run_base(
    params: list[torch.Tensor],
    base: str,
    modes: tuple[str, ...],
    key: tuple,
    with_compiled: bool | str,
    warmup: int,
    rounds: int,
    reps: int,
    count: bool,
) -> dict:
    runners, failed = build_runners(params, base, modes, key, with_compiled)
    rows: list[dict] = []
    errors: dict[int, str] = {}
    ok: list[Runner] = []
    for i, r in enumerate(runners):
        try:  # a row that cannot step is recorded, the others are timed
            for _ in range(2):
                r.rep()
            ok.append(r)
        except Exception as exc:
            errors[i] = f"{type(exc).__name__}: {exc}"[:500]
    measure(ok, warmup, rounds, reps)
    # a closure alone (the gradient pointer assignments every step(closure) row includes)
    g = Grads(params)
    closure_ms = summarize(_time_calls(g.closure, max(50, rounds * reps)))["median_ms"]
    for i, r in enumerate(runners):
        row: dict[str, Any] = {"label": r.label, "family": r.family, "base": base, "mode": r.mode}
        row.update(r.info)
        if i in errors:
            row["error"] = errors[i]
        else:
            row.update(summarize(r.times))
            if r.mode == "step(closure)":
                row["closure_ms"] = closure_ms
            if count and r.counted:
                try:
                    row.update(count_ops(r))
                except Exception as exc:
                    row["count_error"] = f"{type(exc).__name__}: {exc}"[:300]
            elif count:
                row["aten_ops_note"] = "compiled graph: its kernels are not aten dispatches"
        rows.append(row)
    for f in failed:
        family = "ours" if f["label"].startswith("ours") else "peer"
        rows.append({"family": family, "base": base, "mode": "-", **f})
    return {
        "rows": rows,
        "n_tensors": len(params),
        "numel": numel([tuple(p.shape) for p in params]),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "reps_per_round": reps,
        "warmup": warmup,
        "default_backend": default_backend_cpu(),
        "backends": cpu_backends(),
        "pytorch_optimizer": peer_version("pytorch_optimizer") or "not installed",
        "closure_ms": closure_ms,
    }


def _time_calls(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def make_params(shapes: list[Shape]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in shapes]


# ----------------------------------------------------------------------------- items


def host_shapes() -> list[Shape]:
    """One one-element tensor per ResNet-50 parameter tensor (161)."""
    rn, _ = model_shapes("resnet50")
    return [(1,)] * len(rn)


def cpu_shapes(smoke: bool) -> tuple[str, list[Shape]]:
    rn, _ = model_shapes("resnet50")
    if smoke:
        return f"resnet50[:{SMOKE_CPU_TENSORS}]", rn[:SMOKE_CPU_TENSORS]
    return "resnet50", rn


def _compile_item(kind: str, base: str, shapes: list[Shape], key: tuple) -> dict:
    """Compile the compiled peer ahead of the timing item (its own progress record)."""
    params = make_params(shapes)
    _PARAMS[key] = params
    _, compile_s = compiled_peer(params, base, key)
    return {"compile_s": compile_s, "n_tensors": len(shapes), "base": base}


_PARAMS: dict[tuple, list[torch.Tensor]] = {}


def _base_item(
    cfg: dict, section: str, base: str, shapes: list[Shape], key: tuple, compiled: bool | str
) -> dict:
    # the compiled peer is bound to the parameters it was compiled for: share them
    params = _PARAMS.get(key) or make_params(shapes)
    if section == "host":
        modes = ("first+second", "step(closure)")
        w, rounds, reps = (
            cfg.get("host_warmup", 50),
            cfg.get("host_rounds", 10),
            cfg.get("host_reps", 50),
        )
    else:
        modes = ("step(closure)",)
        w, rounds, reps = cfg.get("cpu_warmup", 2), cfg.get("cpu_rounds", 9), 1
    res = run_base(params, base, modes, key, compiled, w, rounds, reps, count=section == "host")
    res["section"] = section
    res["shapes"] = _shape_name(section, cfg)
    return res


def _shape_name(section: str, cfg: dict) -> str:
    if section == "host":
        return f"{len(host_shapes())} x 1 element"
    return cpu_shapes(cfg["smoke"])[0]


def compile_policy(cfg: dict, section: str, base: str) -> bool | str:
    """Whether the compiled peer runs (True) or why not (a string)."""
    if cfg.get("no_compile"):
        return "torch.compile turned off (--no-compile)"
    if cfg["smoke"] and base != "SGD":
        return "--smoke compiles the SGD-base peer only (a cold inductor compile is ~10-25 s here)"
    return True


def plan_section(cfg: dict, section: str) -> list[Item]:
    if section == "host":
        shapes, kind = host_shapes(), "host_overhead"
    else:
        shapes, kind = cpu_shapes(cfg["smoke"])[1], "cpu_step"
    items: list[Item] = []
    for base in BASES:
        key = (section, base)
        compiled = compile_policy(cfg, section, base)
        meta = {"base": base, "section": section}
        if compiled is True:
            items.append(
                Item(f"{section}/{base}/compile", "compile",
                     lambda b=base, k=key: _compile_item(kind, b, shapes, k), meta)
            )  # fmt: skip
        items.append(
            Item(f"{section}/{base}", kind,
                 lambda b=base, k=key, c=compiled: _base_item(cfg, section, b, shapes, k, c), meta)
        )  # fmt: skip
    return items


def plan(cfg: dict) -> list[Item]:
    """The ``host`` section: one-element tensors."""
    return plan_section(cfg, "host")


def plan_cpu(cfg: dict) -> list[Item]:
    """The ``cpu`` section: ResNet-50's shapes."""
    return plan_section(cfg, "cpu")
