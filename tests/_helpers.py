"""What the tests share, written once: a host-read counter, float64 references of the base
steps (SGD, AdamW), poisoned output lists for the ops tests and the comparison helpers."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ---------------------------------------------------------------- host reads
#: what ``.item()``, ``bool()``, ``float()`` dispatch: a scalar read on the host
SCALAR_READS = frozenset({"aten._local_scalar_dense", "aten.item"})
#: the scalar reads and ``nonzero`` (the size of its output is read on the host)
SCALAR_AND_NONZERO = SCALAR_READS | {"aten.nonzero"}
#: every op that reads a device value on the host: the above and ``masked_select``
HOST_READ_OPS = SCALAR_AND_NONZERO | {"aten.masked_select"}
#: metadata-only ops (no kernel, no memory pass; the eager skip views each gradient's bits as
#: integers, see ``sam_kernels.ops._common.sanitize``): left out of :meth:`HostReads.kernels`
METADATA_OPS = frozenset({"aten.view", "aten.detach"})


class DispatchedOps(TorchDispatchMode):
    """Records the overloads dispatched inside (``"aten.mm.default"``), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class HostReads(TorchDispatchMode):
    """Records every op dispatched inside, and counts the host reads among them.

    ``ops``: the ops' overload-packet names (``"aten.mm"``) in dispatch order; ``by_op``: how
    many times each overload ran (``"aten.view.dtype"``); ``reads``: how many ops were in
    ``counted`` (default :data:`HOST_READ_OPS`); ``found``: which of them ran.
    """

    def __init__(self, counted=HOST_READ_OPS) -> None:
        super().__init__()
        self.counted = frozenset(counted)
        self.ops: list[str] = []
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        self.by_op[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return sum(op in self.counted for op in self.ops)

    @property
    def found(self) -> set[str]:
        return self.counted & set(self.ops)

    def kernels(self, metadata=METADATA_OPS) -> int:
        """How many dispatched ops were not metadata-only (``metadata``: overload packets)."""
        return sum(op not in metadata for op in self.ops)


# ---------------------------------------------------------------- float64 base steps
def ref_sgd_step(
    p, g, st, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False
):
    """One ``torch.optim.SGD`` step of ``p`` (in place) by hand; ``st``: its state dict."""
    if maximize:
        g = -g
    d = g + weight_decay * p
    if momentum != 0:
        if "buf" not in st:
            st["buf"] = d.clone()
        elif dampening:
            st["buf"] = momentum * st["buf"] + (1 - dampening) * d
        else:
            st["buf"] = momentum * st["buf"] + d
        d = d + momentum * st["buf"] if nesterov else st["buf"]
    p.sub_(lr * d)


def ref_adamw_step(
    p, g, st, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False
):
    """One ``torch.optim.AdamW`` step of ``p`` (in place) by hand; ``st``: its state dict."""
    if maximize:
        g = -g
    b1, b2 = betas
    st["t"] = st.get("t", 0) + 1
    st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
    st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    v = st["v"]
    if amsgrad:
        st["vmax"] = v = torch.maximum(st.get("vmax", torch.zeros_like(p)), v)
    p.mul_(1 - lr * weight_decay)
    mhat = st["m"] / (1 - b1 ** st["t"])
    vhat = v / (1 - b2 ** st["t"])
    p.sub_(lr * mhat / (vhat.sqrt() + eps))


_SGD_KEYS = ("momentum", "dampening", "nesterov", "weight_decay", "maximize")
_ADAMW_KEYS = ("betas", "eps", "weight_decay", "amsgrad", "maximize")


class RefBase:
    """Per-parameter float64 SGD (momentum, dampening, nesterov, weight decay, maximize) or
    AdamW (amsgrad, maximize), as torch defines them. ``hp``: the torch optimizer's keyword
    arguments (``lr`` and those above; missing ones take torch's defaults)."""

    def __init__(self, base: str, hp: dict) -> None:
        if base not in ("sgd", "adamw"):
            raise ValueError(f"no float64 reference of {base!r}")
        self.base, self.hp, self.state = base, hp, {}
        keys = _SGD_KEYS if base == "sgd" else _ADAMW_KEYS
        self.kw = {k: hp[k] for k in keys if k in hp}

    @torch.no_grad()
    def step(self, p: torch.Tensor, g: torch.Tensor, lr=None) -> None:
        """Step ``p`` with gradient ``g``; ``lr``: this step's (scheduled) rate, else hp's."""
        lr = self.hp["lr"] if lr is None else lr
        st = self.state.setdefault(p, {})
        if self.base == "sgd":
            ref_sgd_step(p, g, st, lr, **self.kw)
        else:
            ref_adamw_step(p, g, st, lr, **self.kw)


# ---------------------------------------------------------------- comparisons
def same(a, b, dtype: bool = False) -> bool:
    """``a`` and ``b`` bit-identical, through dicts, lists and tuples (state dicts, snapshots).
    ``dtype``: tensors must also have the same dtype (``torch.equal`` compares values only)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and (not dtype or a.dtype == b.dtype)
            and torch.equal(a, b)  # also the shapes
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], dtype) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, dtype) for x, y in zip(a, b))
    return a == b


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return ((a - b).double().norm() / b.double().norm().clamp_min(1e-30)).item()


def like(ts, fill=float("nan")):
    """Same shapes and strides as ``ts``, filled with ``fill`` (poison for outputs)."""
    out = []
    for t in ts:
        u = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        out.append(u.fill_(fill))
    return out


#: the integer dtype of each float dtype's width: its bits, for bit-for-bit comparisons
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def bits(x: torch.Tensor) -> torch.Tensor:
    """The float bits as integers (the sign of a zero, NaN payloads included); a tensor of
    another dtype as it is."""
    return x.contiguous().view(INT_VIEW[x.dtype]) if x.dtype in INT_VIEW else x


def unit_rows(items, dtype=torch.float32, device=None):
    """Tensors of ``items``' ``(shape, layout)`` whose every output unit has norm exactly 1: one
    1 per row (dims 1.. of an ndim > 1 tensor; the whole tensor for 0-d/1-d), the rest 0. R-SAM's
    filter scale ``s(w)`` is then 1 on every backend, so ``filter_noise_perturb_``'s deltas are
    ``sigma * z``. Layouts: ``"c"`` contiguous, ``"t"`` transposed, ``"s"`` every other element
    of the last dim (non-contiguous), ``"cl"`` channels-last. ``device=None``: the default device
    (a ``torch.device`` context applies)."""
    out = []
    for shape, layout in items:
        w = torch.zeros(shape, device=device)
        if w.numel():
            flat = w.view(shape[0], -1) if w.dim() > 1 else w.view(1, -1)
            cols = torch.arange(flat.shape[0], device=w.device) * 7 % flat.shape[1]
            flat[torch.arange(flat.shape[0], device=w.device), cols] = 1.0
        w = w.to(dtype)
        if layout == "t":
            w = w.t().contiguous().t()
        elif layout == "s":
            base = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=w.device)
            base[..., ::2] = w
            w = base[..., ::2]
        elif layout == "cl":
            w = w.contiguous(memory_format=torch.channels_last)
        out.append(w)
    return out


#: the ops tests' max-abs error per unit of scale against a reference, by dtype
OP_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def close(a, b, dtype, tol_mul=1.0, ref_finite_only=False, alike=False) -> None:
    """``a`` finite and within ``OP_TOL[dtype] * tol_mul * max(max|b|, 1)`` of ``b`` (max abs).

    ``ref_finite_only``: compare where ``b`` is finite. ``alike``: ``a`` and ``b`` must also
    have the same shape, dtype and device.
    """
    if alike:
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    a64, b64 = a.double(), b.double()
    assert torch.isfinite(a64).all(), "output has non-finite values (not fully written?)"
    if ref_finite_only:
        keep = torch.isfinite(b64)
        a64, b64 = a64[keep], b64[keep]
    err = (a64 - b64).abs().max().item() if a.numel() else 0.0
    scale = max(b64.abs().max().item() if b.numel() else 0.0, 1.0)
    assert err <= OP_TOL[dtype] * tol_mul * scale, f"max abs err {err} (scale {scale})"


def assert_same_training(model, ref_model, opt, ref_opt) -> None:
    """Two copies trained alike: the same weights, base-optimizer state and step/skip counters,
    bit for bit (a planned step against the unplanned one)."""
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(model.parameters(), ref_model.parameters()):
        a, b = opt.base_optimizer.state.get(p, {}), ref_opt.base_optimizer.state.get(q, {})
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert torch.equal(opt._counters, ref_opt._counters)
