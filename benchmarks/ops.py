"""Op microbenchmarks: every fused op of :mod:`sam_kernels.ops`, per provider.

Providers:
- ``loop``: a Python loop of per-tensor torch ops, the davda54/sam style (written here);
- ``eager``: the op's ``torch._foreach_*`` composition (``backend="eager"``);
- ``triton`` and ``ext`` (the compiled extension): the fused backends, when they can run and
  implement the op.

Bytes moved are counted by the op's definition (each input read once, each output written once),
per element of the tensor list, for tensors of ``s`` bytes per element:

====================  ===========================================================  =========
op                    reads / writes                                               bytes/el
====================  ===========================================================  =========
grad_norm             reads g                                                      1 s
grad_norm_asam        reads g, w                                                   2 s
perturb               reads w, g; writes w, backup                                 4 s
perturb_asam          reads w, g; writes w, backup                                 4 s
restore               reads backup; writes w                                       2 s
sgd_step              reads backup, g, buf; writes w, buf (restore fused, momentum) 5 s
adamw_step            reads backup, g, m, v; writes w, m, v (restore fused)         7 s
sgd_step_lc3          as sgd_step with g = LinComb of 3 gradients (CR-SAM)          7 s
adamw_step_lc3        as adamw_step with g = LinComb of 3 gradients                 9 s
lincomb3              reads 3 terms; writes out                                    4 s
frob_accumulate       reads cross, gsum, g; writes cross, gsum                     5 s
noise_perturb         reads w; writes backup, w (noise made in registers)          3 s
aesam_stats           reads g                                                      1 s
====================  ===========================================================  =========

The 0-d ``steps`` tensors, scales and flags are not counted (a few bytes per tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import (
    Item,
    Skip,
    backend_status,
    copy_bandwidth,
    implemented,
    l2_bytes,
    time_call,
)
from benchmarks.shapes import Shape, numel, shape_sets

LR = 1e-3  # small steps: thousands of timed calls must not drive the values to inf
MOMENTUM = 0.9
WD = 5e-4
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
SCALE = 1e-3

Inputs = dict  # lists of tensors and scalars, by name


def _rand(shapes: list[Shape], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    return [torch.randn(s, dtype=dtype, device=device) for s in shapes]


def _pos(shapes: list[Shape], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    return [torch.rand(s, dtype=dtype, device=device) * 1e-2 + 1e-4 for s in shapes]


def _steps(n: int, device: torch.device, value: float = 10.0) -> list[torch.Tensor]:
    return [torch.full((), value, dtype=torch.float32, device=device) for _ in range(n)]


def make_inputs(op: str, shapes: list[Shape], dtype: torch.dtype, device: torch.device) -> Inputs:
    """One input set for ``op`` (random values, never zeros)."""
    n = len(shapes)
    d: Inputs = {"one": torch.ones((), dtype=torch.float32, device=device)}
    d["scale"] = torch.full((), SCALE, dtype=torch.float32, device=device)
    d["w"] = _rand(shapes, dtype, device)
    need = {
        "grad_norm": ["g"],
        "grad_norm_asam": ["g"],
        "perturb": ["g", "b"],
        "perturb_asam": ["g", "b"],
        "restore": ["b"],
        "sgd_step": ["g", "b", "buf"],
        "adamw_step": ["g", "b", "m", "v"],
        "sgd_step_lc3": ["g", "g2", "g3", "b", "buf"],
        "adamw_step_lc3": ["g", "g2", "g3", "b", "m", "v"],
        "lincomb3": ["g", "g2", "g3"],
        "frob_accumulate": ["g", "cross", "gsum"],
        "noise_perturb": ["b"],
        "aesam_stats": ["g"],
    }[op]
    for name in need:
        d[name] = _pos(shapes, dtype, device) if name == "v" else _rand(shapes, dtype, device)
    if op in ("sgd_step", "adamw_step", "sgd_step_lc3", "adamw_step_lc3"):
        d["steps"] = _steps(n, device)
        d["py_step"] = [10]
    if op.endswith("lc3") or op == "lincomb3":
        d["coefs"] = torch.tensor([1.1, -0.3, 0.2], dtype=torch.float32, device=device)
    if op == "aesam_stats":
        d["stats"] = torch.tensor([1.0, 0.5], dtype=torch.float32, device=device)
    if op == "frob_accumulate":
        d["loss"] = torch.full((), 0.7, dtype=torch.float32, device=device)
    if op == "noise_perturb":
        # counter-based RNG state on the device, as the optimizers pass it (eager ignores it)
        d["seed"] = torch.full((), 1234, dtype=torch.int64, device=device)
        d["offset"] = torch.zeros((), dtype=torch.int64, device=device)
    return d


# ----------------------------------------------------------------------------- loop references
# davda54/sam style: one Python iteration per tensor, plain torch ops.


def _loop_grad_norm(d: Inputs, adaptive: bool = False) -> torch.Tensor:
    ws = d["w"] if adaptive else [None] * len(d["g"])
    return torch.norm(
        torch.stack(
            [((torch.abs(w) if adaptive else 1.0) * g).norm(p=2) for w, g in zip(ws, d["g"])]
        ),
        p=2,
    )


def _loop_perturb(d: Inputs, adaptive: bool = False) -> None:
    for w, g, b in zip(d["w"], d["g"], d["b"]):
        b.copy_(w)  # davda54 clones; a copy into a kept buffer moves the same bytes
        e = (torch.pow(w, 2) if adaptive else 1.0) * g * d["scale"].to(w)
        w.add_(e)


def _loop_restore(d: Inputs) -> None:
    for w, b in zip(d["w"], d["b"]):
        w.copy_(b)


def _loop_lincomb(d: Inputs, out_list: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    c = d["coefs"]
    res = []
    outs = out_list if out_list is not None else [None] * len(d["g"])
    for g1, g2, g3, o in zip(d["g"], d["g2"], d["g3"], outs):
        t = g1 * c[0].to(g1) + g2 * c[1].to(g1) + g3 * c[2].to(g1)
        if o is not None:
            o.copy_(t)
        res.append(t)
    return res


def _loop_sgd(d: Inputs, grads: list[torch.Tensor] | None = None) -> None:
    """Restore, then torch.optim.SGD's single-tensor step (momentum, weight decay)."""
    grads = grads if grads is not None else d["g"]
    for w, b, g, buf in zip(d["w"], d["b"], grads, d["buf"]):
        w.copy_(b)
        g = g.add(w, alpha=WD)
        buf.mul_(MOMENTUM).add_(g)
        w.add_(buf, alpha=-LR)


def _loop_adamw(d: Inputs, grads: list[torch.Tensor] | None = None) -> None:
    """Restore, then torch.optim.AdamW's single-tensor step (host-side step count)."""
    grads = grads if grads is not None else d["g"]
    d["py_step"][0] += 1
    step = d["py_step"][0]
    bc1 = 1 - BETA1**step
    bc2 = 1 - BETA2**step
    for w, b, g, m, v in zip(d["w"], d["b"], grads, d["m"], d["v"]):
        w.copy_(b)
        w.mul_(1 - LR * WD)
        m.lerp_(g, 1 - BETA1)
        v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(EPS)
        w.addcdiv_(m, denom, value=-LR / bc1)


def _loop_frob(d: Inputs) -> None:
    for c, s, g in zip(d["cross"], d["gsum"], d["g"]):
        c.add_(g * d["loss"].to(g))
        s.add_(g)


def _loop_noise(d: Inputs) -> None:
    for w, b in zip(d["w"], d["b"]):
        b.copy_(w)
        w.add_(torch.randn_like(w) * d["scale"].to(w))


def _loop_aesam(d: Inputs) -> torch.Tensor:
    s = torch.stack([g.norm(2, dtype=torch.float32) for g in d["g"]]).square().sum()
    stats, delta, c = d["stats"], 0.9, 0.0
    mu = delta * stats[0] + (1 - delta) * s
    var = delta * stats[1] + (1 - delta) * (s - mu) ** 2
    stats.copy_(torch.stack([mu, var]))
    return (s >= mu + c * torch.sqrt(var)).to(torch.int32)


LOOP: dict[str, Callable[[Inputs], object]] = {
    "grad_norm": _loop_grad_norm,
    "grad_norm_asam": lambda d: _loop_grad_norm(d, adaptive=True),
    "perturb": _loop_perturb,
    "perturb_asam": lambda d: _loop_perturb(d, adaptive=True),
    "restore": _loop_restore,
    "sgd_step": _loop_sgd,
    "adamw_step": _loop_adamw,
    "sgd_step_lc3": lambda d: _loop_sgd(d, _loop_lincomb(d)),
    "adamw_step_lc3": lambda d: _loop_adamw(d, _loop_lincomb(d)),
    "lincomb3": lambda d: _loop_lincomb(d, d["w"]),
    "frob_accumulate": _loop_frob,
    "noise_perturb": _loop_noise,
    "aesam_stats": _loop_aesam,
}


# ----------------------------------------------------------------------------- fused-op calls


def fused_call(op: str, d: Inputs, backend: str) -> object:
    """Call the sam_kernels op for ``op`` on input set ``d`` with ``backend``."""
    import sam_kernels as sk

    if op in ("grad_norm", "grad_norm_asam"):
        return sk.grad_norm(d["g"], d["w"] if op == "grad_norm_asam" else None, backend=backend)
    if op in ("perturb", "perturb_asam"):
        sk.perturb_(
            d["w"], d["g"], d["b"], d["scale"], adaptive=op == "perturb_asam", backend=backend
        )
        return None
    if op == "restore":
        sk.restore_(d["w"], d["b"], backend=backend)
        return None
    if op in ("sgd_step", "sgd_step_lc3"):
        g = d["g"] if op == "sgd_step" else sk.LinComb((d["g"], d["g2"], d["g3"]), d["coefs"])
        sk.sgd_step_(
            d["w"], g, d["buf"], d["steps"], backups=d["b"], lr=LR, momentum=MOMENTUM,
            weight_decay=WD, ok=d["one"], backend=backend,
        )  # fmt: skip
        return None
    if op in ("adamw_step", "adamw_step_lc3"):
        g = d["g"] if op == "adamw_step" else sk.LinComb((d["g"], d["g2"], d["g3"]), d["coefs"])
        sk.adamw_step_(
            d["w"], g, d["m"], d["v"], [], d["steps"], backups=d["b"], lr=LR, beta1=BETA1,
            beta2=BETA2, eps=EPS, weight_decay=WD, ok=d["one"], backend=backend,
        )  # fmt: skip
        return None
    if op == "lincomb3":
        sk.lincomb_(d["w"], (d["g"], d["g2"], d["g3"]), d["coefs"], backend=backend)
        return None
    if op == "frob_accumulate":
        sk.frob_accumulate_(d["cross"], d["gsum"], d["g"], d["loss"], backend=backend)
        return None
    if op == "noise_perturb":
        sk.noise_perturb_(
            d["w"], d["b"], d["scale"], kind="normal", seed=d["seed"], offset=d["offset"],
            backend=backend,
        )  # fmt: skip
        return None
    if op == "aesam_stats":
        return sk.aesam_stats_(d["g"], d["stats"], delta=0.9, c=0.0, backend=backend)
    raise KeyError(op)


@dataclass(frozen=True)
class OpSpec:
    """An op benchmark: registry op name, bytes per element (in units of s) and its I/O."""

    name: str
    registry: str
    elems: int  # bytes per element = elems * element size
    io: str


OPS: list[OpSpec] = [
    OpSpec("grad_norm", "grad_norm", 1, "reads g"),
    OpSpec("perturb", "perturb", 4, "reads w, g; writes w, backup"),
    OpSpec("restore", "restore", 2, "reads backup; writes w"),
    OpSpec("sgd_step", "sgd_step", 5, "reads backup, g, buf; writes w, buf"),
    OpSpec("adamw_step", "adamw_step", 7, "reads backup, g, m, v; writes w, m, v"),
    OpSpec("sgd_step_lc3", "sgd_step", 7, "reads backup, g1, g2, g3, buf; writes w, buf"),
    OpSpec("adamw_step_lc3", "adamw_step", 9, "reads backup, g1..g3, m, v; writes w, m, v"),
    OpSpec("lincomb3", "lincomb", 4, "reads g1, g2, g3; writes out"),
    OpSpec("frob_accumulate", "frob_accumulate", 5, "reads cross, gsum, g; writes cross, gsum"),
    OpSpec("noise_perturb", "noise_perturb", 3, "reads w; writes backup, w"),
    OpSpec("aesam_stats", "aesam_stats", 1, "reads g"),
    OpSpec("grad_norm_asam", "grad_norm", 2, "reads g, w"),
    OpSpec("perturb_asam", "perturb", 4, "reads w, g; writes w, backup"),
]
QUICK_OPS = ("grad_norm", "perturb", "restore", "sgd_step", "adamw_step", "sgd_step_lc3")
SPEC = {s.name: s for s in OPS}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _InputCache:
    """The input sets of the last (op, shapes, dtype): consecutive providers share them."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.sets: list[Inputs] = []

    def get(self, key: tuple, build: Callable[[], list[Inputs]]) -> list[Inputs]:
        if key != self.key:
            self.sets = []
            self.key = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.sets = build()
            self.key = key
        return self.sets


_CACHE = _InputCache()


def _elem_size(dtype_name: str) -> int:
    return torch.finfo(DTYPES[dtype_name]).bits // 8


def n_copies(bytes_per_call: int, device: torch.device, smoke: bool) -> int:
    """Input sets to rotate over: together at least 4x the L2, at least 2, at most 6."""
    if smoke:
        return 2
    return int(min(6, max(2, math.ceil(4 * l2_bytes(device) / max(1, bytes_per_call)))))


def bench_op(cfg: dict, op: str, shape_name: str, shapes: list[Shape], dtype_name: str, prov: str):
    """Time one op on one tensor list with one provider."""
    device = torch.device(cfg["device"])
    spec = SPEC[op]
    if prov in ("triton", "ext"):
        import sam_kernels as sk

        if not sk.available(prov, device):
            raise Skip(f"{prov} backend unavailable: {sk.why_unavailable(prov, device)}")
        if not implemented(spec.registry, prov):
            raise Skip(f"{prov} backend has no {spec.registry} (it would run the eager code)")
    dtype = DTYPES[dtype_name]
    n_el = numel(shapes)
    elem = _elem_size(dtype_name)
    nbytes = spec.elems * elem * n_el
    copies = n_copies(nbytes, device, cfg["smoke"])
    sets = _CACHE.get(
        (op, shape_name, dtype_name),
        lambda: [make_inputs(op, shapes, dtype, device) for _ in range(copies)],
    )
    if prov == "loop":
        fn = LOOP[op]
        call = lambda i: fn(sets[i])
    else:
        call = lambda i: fused_call(op, sets[i], prov)
    t = time_call(
        call,
        device,
        n_inputs=len(sets),
        warmup_ms=cfg.get("warmup_ms", 10.0),
        rep_ms=cfg.get("rep_ms", 50.0),
        min_reps=cfg.get("min_reps", 8),
    )
    return {
        **t,
        "bytes": nbytes,
        "gbps": nbytes / (t["median_ms"] * 1e-3) / 1e9,
        "n_tensors": len(shapes),
        "numel": n_el,
        "input_sets": len(sets),
    }


def plan(cfg: dict) -> list[Item]:
    """The op items, most important first (fp32 before bf16, the model lists before flat)."""
    device = torch.device(cfg["device"])
    items = [
        Item(
            "copy_bandwidth",
            "copy",
            lambda: copy_bandwidth(device, cfg.get("copy_bytes", 2**30)),
        )
    ]
    items.append(Item("backends", "backends", lambda: backend_status(device)))
    sets = shape_sets(cfg["smoke"], cfg["quick"])
    ops = [s.name for s in OPS if not cfg["quick"] or s.name in QUICK_OPS]
    if cfg.get("ops"):
        ops = [o for o in ops if o in cfg["ops"]]
    providers = cfg["providers"]
    # the model-shaped lists (the targets) in every dtype first, the flat tensor last
    order = [(d, n) for n in sets if not n.startswith("flat") for d in cfg["dtypes"]]
    order += [(d, n) for n in sets if n.startswith("flat") for d in cfg["dtypes"]]
    for dtype_name, shape_name in order:
        shapes, source = sets[shape_name]
        for op in ops:
            for prov in providers:
                meta = {
                    "op": op,
                    "shape": shape_name,
                    "shape_source": source,
                    "dtype": dtype_name,
                    "provider": prov,
                    "io": SPEC[op].io,
                    "bytes_per_elem": SPEC[op].elems * _elem_size(dtype_name),
                }
                items.append(
                    Item(
                        f"{op}/{shape_name}/{dtype_name}/{prov}",
                        "ops",
                        lambda op=op, sn=shape_name, sh=shapes, dn=dtype_name, p=prov: bench_op(
                            cfg, op, sn, sh, dn, p
                        ),
                        meta,
                    )
                )
    items.append(
        Item(
            "copy_bandwidth_end",
            "copy",
            lambda: copy_bandwidth(device, cfg.get("copy_bytes", 2**30)),
            {"note": "measured again after the ops: the spread between the two is noise"},
        )
    )
    return items
