"""Optimizer-step benchmark: the optimizer-side cost of one step of each SAM-family optimizer.

Forward and backward are replaced by closures that only *set precomputed gradients* (pointer
assignments ``p.grad = g``, no device work) and return a precomputed loss, so the time measured is
everything the optimizer does between and around the evaluations. Per optimizer and backend:

- ``step_ms``: median over timed steps of CUDA-event time around ``opt.step(closure)`` (the
  queue is drained before each step; a host-bound step shows as GPU idle inside the events);
- ``floor_ms``: the step's byte floor (below) over the copy bandwidth measured in the same run;
- ``kernels``: CUDA kernels of one step (torch.profiler), with memcpy/memset counted apart;
- ``host_syncs``: synchronising CUDA calls in one step (``torch.cuda.set_sync_debug_mode``), and
  ``aten::_local_scalar_dense`` calls (``.item()``) seen by the profiler;
- graph capture: whether ``opt.step(closure)`` can be captured in a CUDA graph, the error if
  not, and the replay time if so;
- dispatched ops (CPU: the eager path, and the compiled extension where built): top-level aten
  ops of one step for a 10-tensor and a 300-tensor model, counted with a ``TorchDispatchMode``.

Byte floors, in elements read plus written per parameter element, SGD-momentum base step (an
AdamW base step reads and writes m and v instead of buf: +2):

- SAM 11: norm(g0) 1 + perturb (read w, g0; write w, backup) 4 + finite(g1) 1 + step from the
  backup (read backup, g1, buf; write w, buf) 5.
- ASAM 12: as SAM, the norm also reads w.
- CR-SAM 17: norm 1 + perturb to w+e 4 + move to w-e (read backup, g0; write w) 3 + finite(g+),
  finite(g-) 2 + step with g = LinComb(g+, g-, g0) (read backup, 3 grads, buf; write w, buf) 7.
- AE-SAM 8.5: stats/norm(g0) 1, then a SAM step (perturb 4 + finite 1 + step 5) or an ERM step
  (step from w 5); at the nominal 50% SAM steps: 1 + (10 + 5) / 2.
- LookSAM 8.4 (k=5): a SAM step every k (norm 1, perturb 4, finite 1, g_v from g0, g1: 3,
  step 5 = 14); the others: norm(g) 1 + step with LinComb(g, g_v) (read w, g, g_v, buf; write
  w, buf) 6 = 7; mean (14 + 4 * 7) / 5.
- Frob-SAM (n=2) 23: finite(g0) 1 + noise sample 1 (read w; write backup, w) 3 + accumulate
  (read cross, gsum, g; write cross, gsum) 5 + noise sample 2 (read backup; write w) 2 +
  accumulate 5 + step with LinComb(g0, cross, gsum) (read backup, 3 lists, buf; write w, buf) 7.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common import Item, Skip, copy_bandwidth, summarize
from benchmarks.shapes import Shape, model_shapes, numel
from python_api.optimizer_table import listed

# ----------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptSpec:
    """How to build one SAM-family optimizer, and its byte floor and ideal pass count."""

    name: str
    module: str
    cls: str
    kwargs: dict = field(default_factory=dict)
    n_samples: int | None = None  # the universal class's n_samples
    floor_sam: float = 0.0  # elements read+written per parameter element, SGD base, SAM step
    floor_cheap: float | None = None  # the same for a one-pass step (AE-SAM ERM, LookSAM reuse)
    nominal_fraction: float = 1.0  # SAM steps among all steps, when not measured
    passes_sam: float = 2.0  # forward+backward passes of a SAM step

    @property
    def switching(self) -> bool:
        return self.floor_cheap is not None

    def floor_elems(self, fraction: float | None = None, base: str = "SGD") -> float:
        """The step's byte floor in elements, averaged over SAM / one-pass steps."""
        f = self.nominal_fraction if fraction is None else fraction
        extra = 2.0 if base == "AdamW" else 0.0  # m, v read and written instead of buf
        if self.floor_cheap is None:
            return self.floor_sam + extra
        return f * self.floor_sam + (1 - f) * self.floor_cheap + extra

    def ideal_passes(self, fraction: float | None = None) -> float:
        """Forward+backward passes per step, relative to the base optimizer's one."""
        if not self.switching:
            return self.passes_sam
        f = self.nominal_fraction if fraction is None else fraction
        return 1.0 + f * (self.passes_sam - 1.0)


# the benchmarked rows of the one optimizer table (python_api/optimizer_table.py)
OPTIMIZERS: list[OptSpec] = [
    OptSpec(
        o.label,
        o.module,
        o.cls,
        dict(o.bench_kwargs),
        n_samples=o.n_samples,
        floor_sam=o.floor_sam,
        floor_cheap=o.floor_cheap,
        nominal_fraction=o.nominal_fraction,
        passes_sam=o.passes,
    )
    for o in listed()
    if o.bench_kwargs is not None
]
SPECS = {s.name: s for s in OPTIMIZERS}


class LoopSAM(torch.optim.Optimizer):
    """The davda54/sam algorithm as users run it: per-parameter Python loops around the base
    optimizer's own ``step()`` (torch's defaults: the foreach implementation on CUDA).

    Written here as the reference the fused optimizers are compared with (not its code).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kw):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kw))
        self.base_optimizer = base_optimizer(self.param_groups, **kw)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = [
            ((torch.abs(p) if g["adaptive"] else 1.0) * p.grad).norm(p=2)
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        return torch.norm(torch.stack(norms), p=2)

    @torch.no_grad()
    def first_step(self) -> None:
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_((torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()

    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        closure = torch.enable_grad()(closure)
        if all(p.grad is None for g in self.param_groups for p in g["params"]):
            closure()
        self.first_step()
        loss = closure()
        self.second_step()
        return loss


def build_optimizer(
    name: str,
    params: list[torch.Tensor],
    backend: str,
    base: str,
    model: torch.nn.Module | None = None,
) -> tuple[torch.optim.Optimizer, dict]:
    """``(optimizer, kwargs used)``; raises :class:`Skip` if the class is not there yet."""
    base_cls, base_kw = base_optimizer(base)
    if backend == "davda54":
        if name not in ("SAM", "ASAM"):
            raise Skip("the davda54 reference is SAM/ASAM only")
        kw = dict(SPECS[name].kwargs)
        return LoopSAM(params, base_cls, **kw, **base_kw), {**kw, **base_kw}
    spec = SPECS[name]
    try:
        cls = getattr(importlib.import_module(spec.module), spec.cls)
    except (ImportError, AttributeError) as exc:
        raise Skip(f"{spec.module}.{spec.cls} is not available: {exc}") from None
    kw = dict(spec.kwargs)
    if spec.n_samples is not None:
        kw["n_samples"] = spec.n_samples  # the universal class's argument (the table's row)
    try:
        sig = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        sig = {}
    if model is not None and "model" in sig:
        kw["model"] = model
    used = {k: v for k, v in kw.items() if k != "model"}
    opt = cls(params, base_cls, backend=backend, **kw, **base_kw)
    return opt, {**used, **base_kw, "backend": backend}


def base_optimizer(base: str) -> tuple[type[torch.optim.Optimizer], dict]:
    if base == "SGD":
        return torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
    if base == "AdamW":
        return torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.05}
    raise KeyError(base)


# ----------------------------------------------------------------------------- closures


class GradFeeder:
    """A closure that sets precomputed gradients (set k of K, in turn) and returns a loss.

    ``refresh()`` copies the pristine gradients back (outside timed regions), in case an
    optimizer writes into ``p.grad``.
    """

    def __init__(self, params: list[torch.Tensor], n_sets: int = 3) -> None:
        self.params = params
        gen = torch.Generator(device=params[0].device).manual_seed(0)
        self.master = [
            [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in params]
            for _ in range(n_sets)
        ]
        self.work = [[g.clone() for g in s] for s in self.master]
        self.losses = [torch.tensor(1.0 + 0.1 * k, device=params[0].device) for k in range(n_sets)]
        self.k = 0

    def __call__(self) -> torch.Tensor:
        k = self.k % len(self.work)
        self.k += 1
        for p, g in zip(self.params, self.work[k]):
            p.grad = g
        return self.losses[k]

    def refresh(self) -> None:
        for w, m in zip(self.work, self.master):
            torch._foreach_copy_(w, m)
        self.k = 0


def make_params(shapes: list[Shape], device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, device=device) * 0.05) for s in shapes]


def _step(opt: torch.optim.Optimizer, feeder: GradFeeder) -> None:
    opt.zero_grad(set_to_none=True)
    opt.step(feeder)


# ----------------------------------------------------------------------------- measurements


def count_kernels(opt, feeder, device) -> dict:
    """Kernels, launch calls, synchronising runtime calls and ``.item()`` calls of one step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    feeder.refresh()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _step(opt, feeder)
        torch.cuda.synchronize()
    kernels = memops = launches = syncs = items = 0
    names: Counter = Counter()
    for e in prof.events():
        name = e.name
        if e.device_type == DeviceType.CUDA:
            if name.startswith(("Memcpy", "Memset", "memcpy", "memset")):
                memops += 1
            else:
                kernels += 1
                names[name[:60]] += 1
        elif "LaunchKernel" in name:
            launches += 1
        elif "Synchronize" in name:
            syncs += 1
        elif name == "aten::_local_scalar_dense":
            items += 1
    return {
        "kernels": kernels,
        "memcpy_memset": memops,
        "launch_calls": launches,
        "sync_calls_incl_final": syncs,
        "item_calls": items,
        "top_kernels": dict(names.most_common(8)),
    }


def count_syncs(opt, feeder, device, steps: int = 2) -> dict:
    """Synchronising CUDA operations per step, from ``torch.cuda.set_sync_debug_mode``."""
    feeder.refresh()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                _step(opt, feeder)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{w.filename.split('/')[-1]}:{w.lineno}" for w in hits)
    return {"host_syncs_per_step": len(hits) / steps, "sync_sites": dict(where.most_common(6))}


def time_steps(opt, feeder, device, n: int) -> dict:
    """Median step time over ``n`` steps (events on CUDA, perf_counter on the CPU)."""
    cuda = device.type == "cuda"
    ev, wall = [], []
    for _ in range(n):
        feeder.refresh()
        if cuda:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            s.record()
            _step(opt, feeder)
            e.record()
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t0) * 1e3)
            ev.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            _step(opt, feeder)
            wall.append((time.perf_counter() - t0) * 1e3)
    times = ev if cuda else wall
    out = summarize(times)
    out["mean_ms"] = sum(times) / len(times)
    out["wall_median_ms"] = summarize(wall)["median_ms"]
    return out


_COPY: dict[str, float] = {}


def _copy_gbps(cfg: dict) -> float:
    if "gbps" not in _COPY:
        dev = torch.device(cfg["device"])
        _COPY["gbps"] = copy_bandwidth(dev, cfg.get("copy_bytes", 2**30))["gbps"]
    return _COPY["gbps"]


def switch_counts(opt) -> tuple[int, int] | None:
    """``(SAM steps, one-pass steps)`` applied so far, for optimizers that switch (host read)."""
    try:
        return int(opt.sam_steps), int(opt.cheap_steps)
    except Exception:
        return None


def sam_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Fraction of SAM steps between two :func:`switch_counts` readings."""
    if before is None or after is None:
        return None
    ds, dc = after[0] - before[0], after[1] - before[1]
    return ds / (ds + dc) if ds + dc > 0 else None


def bench_step(cfg: dict, shapes_name: str, shapes, base: str, name: str, backend: str) -> dict:
    gc.collect()
    device = torch.device(cfg["device"])
    params = make_params(shapes, device)
    opt, used = build_optimizer(name, params, backend, base)
    feeder = GradFeeder(params)
    for _ in range(cfg.get("optim_warmup", 3)):
        feeder.refresh()
        _step(opt, feeder)
    spec = SPECS[name]
    before = switch_counts(opt) if spec.switching else None
    t = time_steps(opt, feeder, device, cfg.get("optim_steps", 20))
    frac = sam_fraction(before, switch_counts(opt)) if spec.switching else None
    n_el = numel(shapes)
    # a switching optimizer mixes two kinds of step: its mean is the cost per step
    step_ms = t["mean_ms"] if spec.switching else t["median_ms"]
    res: dict[str, Any] = {"step_ms": step_ms, **t, "kwargs": used, "numel": n_el}
    if spec.switching:
        res["sam_fraction"] = frac
    res["floor_elems"] = spec.floor_elems(frac, base)
    res["floor_bytes"] = res["floor_elems"] * 4 * n_el
    if device.type == "cuda":
        gbps = _copy_gbps(cfg)
        res["copy_gbps"] = gbps
        res["floor_ms"] = res["floor_bytes"] / (gbps * 1e9) * 1e3
        res["x_floor"] = step_ms / res["floor_ms"]
        for what, fn in (("kernels", count_kernels), ("syncs", count_syncs)):
            try:
                res.update(fn(opt, feeder, device))
            except Exception as exc:
                res[f"{what}_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return res


#: steps that cannot be captured by design, with the reason. A capture attempt that fails
#: part-way leaves the process's CUDA generator unusable (seen on an H100: every later draw
#: raised "Offset increment outside graph capture"), so these are not attempted.
NOT_CAPTURABLE = {
    "AE-SAM": "reads its SAM/ERM decision on the host once per step",
    "LookSAM": "reads its SAM/reuse decision on the host once per step",
}


def capture_step(cfg: dict, shapes, base: str, name: str, backend: str) -> dict:
    """Try to capture ``opt.step(closure)`` in a CUDA graph; replay and time it if it works."""
    why = NOT_CAPTURABLE.get(name)
    if why is None and name == "Frob-SAM" and backend == "eager":
        why = "the eager path draws its noise per tensor from the global generator"
    if why is not None:
        return {"captured": False, "error": f"not attempted: {why}"}
    device = torch.device(cfg["device"])
    params = make_params(shapes, device)
    opt, _ = build_optimizer(name, params, backend, base)
    feeder = GradFeeder(params, n_sets=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _step(opt, feeder)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    try:
        with torch.cuda.graph(graph):
            opt.step(feeder)
    except Exception as exc:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return {"captured": False, "error": f"{type(exc).__name__}: {exc}"[:800]}
    before = params[0].detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    changed = not torch.equal(before, params[0].detach())
    t = summarize(
        [_replay_ms(graph) for _ in range(cfg.get("optim_steps", 20))],
    )
    return {"captured": True, "replay_changes_params": changed, "replay_ms": t["median_ms"]}


def _replay_ms(graph) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    graph.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the top-level aten ops dispatched while active (nested calls are not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def dispatch_count(name: str, backend: str, base: str, n_tensors: int) -> dict:
    """Top-level aten ops of one step on the CPU on ``backend`` for ``n_tensors``."""
    device = torch.device("cpu")
    shapes = [(8, 8)] * n_tensors
    params = make_params(shapes, device)
    opt, _ = build_optimizer(name, params, backend, base)
    feeder = GradFeeder(params)
    # warm-up: the first step creates state, a plan is built by the second or third (Frob-SAM's
    # needs SAM's norm/ascent lists, which its unplanned steps do not build): steady state after
    for _ in range(3):
        feeder.refresh()
        _step(opt, feeder)
    feeder.refresh()
    opt.zero_grad(set_to_none=True)
    counter = OpCounter()
    with counter:
        opt.step(feeder)
    return {"count": sum(counter.counts.values()), "by_op": dict(counter.counts.most_common())}


def dispatch_pair(name: str, backend: str, base: str) -> dict:
    """Counts for a 10- and a 300-tensor model, and which ops grow with the tensor count."""
    a = dispatch_count(name, backend, base, 10)
    b = dispatch_count(name, backend, base, 300)
    growing = {
        op: [a["by_op"].get(op, 0), b["by_op"].get(op, 0)]
        for op in set(a["by_op"]) | set(b["by_op"])
        if a["by_op"].get(op, 0) != b["by_op"].get(op, 0)
    }
    return {
        "count": a["count"],
        "ops_10": a["count"],
        "ops_300": b["count"],
        "grows": a["count"] != b["count"],
        "growing_ops": growing,
    }


# ----------------------------------------------------------------------------- plan


def fused_backends(cfg: dict) -> list[str]:
    """The fused backends that can run on the configured device."""
    import sam_kernels as sk

    device = torch.device(cfg["device"])
    if cfg["smoke"]:
        return []
    return [b for b in ("triton", "ext") if sk.available(b, device)]


def plan(cfg: dict) -> list[Item]:
    device = torch.device(cfg["device"])
    if cfg["smoke"]:
        configs = [("tiny10", [(32, 16, 3, 3), (32,), (32,), (64, 32, 3, 3), (64,)] * 2, "SGD")]
    else:
        rn, _ = model_shapes("resnet50")
        configs = [("resnet50", rn, "SGD")]
        if not cfg["quick"]:
            vit, _ = model_shapes("vit_b_16")
            configs.append(("vit_b_16", vit, "AdamW"))
    names = [s.name for s in OPTIMIZERS]
    if cfg.get("optimizers"):
        names = [n for n in names if n in cfg["optimizers"]]
    fused = fused_backends(cfg)
    items: list[Item] = []
    # dispatch counts first: cheap, on the CPU, and the smoke run's main report; the compiled
    # extension too where it is built (the CPU default: issue 14's ops-per-step target)
    import sam_kernels as sk

    counted = ["eager", *(["ext"] if sk.available("ext", "cpu") else []), "davda54"]
    for name in names:
        for base in ("SGD", "AdamW") if not cfg["quick"] else ("SGD",):
            for backend in counted:
                if backend == "davda54" and name != "SAM":
                    continue
                meta = {"optimizer": name, "backend": backend, "base": base}
                items.append(
                    Item(
                        f"dispatch/{name}/{base}/{backend}",
                        "dispatch_counts",
                        lambda n=name, b=base, be=backend: dispatch_pair(n, be, b),
                        meta,
                    )
                )

    def step_items(cname: str, shapes: list, base: str) -> list[Item]:
        out = []
        for backend in [*fused, "eager", "davda54"]:
            for name in names:
                if backend == "davda54" and name not in ("SAM", "ASAM"):
                    continue
                meta = {"optimizer": name, "backend": backend, "base": base, "shapes": cname}
                meta["n_tensors"] = len(shapes)
                out.append(
                    Item(
                        f"step/{cname}/{name}/{backend}",
                        "optimizer_step",
                        lambda c=cname, s=shapes, b=base, n=name, be=backend: bench_step(
                            cfg, c, s, b, n, be
                        ),
                        meta,
                    )
                )
        return out

    # the first configuration's steps, then the graph captures on it, then the others' steps
    items += step_items(*configs[0])
    if device.type == "cuda":
        cname, shapes, base = configs[0]
        for backend in [*fused, "eager"]:
            for name in names:
                meta = {"optimizer": name, "backend": backend, "base": base, "shapes": cname}
                items.append(
                    Item(
                        f"graph/{cname}/{name}/{backend}",
                        "graph_capture",
                        lambda s=shapes, b=base, n=name, be=backend: capture_step(cfg, s, b, n, be),
                        meta,
                    )
                )
    for conf in configs[1:]:
        items += step_items(*conf)
    return items
