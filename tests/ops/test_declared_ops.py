"""Each fused op declared once (issue 14, item 1): ``torch.ops.sam_kernels.<op>``.

- every op with a fused implementation has one schema, with a fake, checked by
  ``torch.library.opcheck`` (mutation annotations, fake against real, the aot dispatch);
- backend parity through the one schema: each backend that runs here (eager, Triton under the
  interpreter, the compiled extension) called as ``torch.ops.sam_kernels.<op>(..., backend=b)``
  against the eager reference on fp32 copies of the same inputs, over shapes with empty,
  one-element, odd and non-contiguous tensors and fp32/bf16/fp16, every output element written;
- the hyper-parameters of the steps are one dataclass per base, its fields the schema's;
- a backend declines a call it cannot take and the chooser runs the next implementation; no
  backend module calls the eager reference itself;
- torch.compile: a function of fused ops on a fused backend compiles as one graph
  (``fullgraph=True``), each op one node, with the values of the eager call.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from _helpers import bits, unit_rows

import sam_kernels as sk
from sam_kernels import _backend
from sam_kernels.ops._declare import DECLARED
from sam_kernels.ops._step_args import AdamWHyper, SgdHyper

OPS = torch.ops.sam_kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: (relative, absolute) tolerances against the fp32 reference rounded once to the dtype
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}
#: empty, one element, odd sizes, a matrix, and a non-contiguous view (the last entry)
SHAPES = [(0,), (1,), (17,), (3, 5), (2, 3, 4)]
NONCONTIG = (5, 6)


def _backends(device: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [b for b in ("eager", "triton", "ext") if sk.available(b, device)]


BACKENDS = _backends("cpu")
FUSED = [b for b in BACKENDS if b != "eager"]
#: (device, backend) for every backend on every device here: a GPU run checks CUDA too
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PLACES = [(d, b) for d in DEVICES for b in _backends(d)]
FUSED_PLACES = [(d, b) for d, b in PLACES if b != "eager"]


def make(dtype, scale=1.0, positive=False):
    """A tensor per shape of :data:`SHAPES` plus a non-contiguous view, of ``dtype``."""
    out = [(torch.randn(s) * scale).to(dtype) for s in SHAPES]
    base = (torch.randn(NONCONTIG[0], 2 * NONCONTIG[1]) * scale).to(dtype)
    out.append(base[:, ::2])
    assert not out[-1].is_contiguous()
    return [t.abs() for t in out] if positive else out


def nans_like(ts):
    """Outputs that the op must write in full: NaN where it would leave them."""
    return [torch.full_like(t, float("nan")) for t in ts]


def f32(ts):
    return [t.float() for t in ts] if isinstance(ts, list) else ts


def assert_close_lists(actual, ref, what):
    """Each tensor against the fp32 reference rounded to its dtype, with the dtype's
    tolerance (state such as step counters stays fp32 whatever the parameters' dtype)."""
    assert len(actual) == len(ref)
    for i, (a, r) in enumerate(zip(actual, ref)):
        rtol, atol = TOL[a.dtype]
        assert a.shape == r.shape, (what, i)
        assert bool(torch.isfinite(a).all()), f"{what}[{i}]: not written in full"
        torch.testing.assert_close(
            a, r.to(a.dtype), rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what}[{i}]: {m}"
        )


# ----------------------------------------------------------------------------- declarations
def _fused_ops() -> set[str]:
    for b in ("triton", "ext"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _backend._load(b)
    return {op for op, impls in _backend._REGISTRY.items() if set(impls) - {"eager"}}


def test_every_fused_op_is_declared_once():
    fused = _fused_ops()
    assert fused, "no fused implementation registered"
    assert fused <= set(DECLARED), f"fused ops without a schema: {sorted(fused - set(DECLARED))}"
    names = [d.name for d in DECLARED.values()]
    assert len(names) == len(set(names))
    for op, decl in DECLARED.items():
        schema = decl.overload._schema
        assert str(schema).startswith(f"sam_kernels::{decl.name}(")
        # the chooser's argument, last, optional: the same call as the Python entry point
        last = schema.arguments[-1]
        assert last.name == "backend" and str(last.type) == "Optional[str]", (op, str(schema))
        assert getattr(OPS, decl.name).default is decl.overload


@pytest.mark.parametrize("cls", [SgdHyper, AdamWHyper])
def test_step_schemas_come_from_the_hyper_dataclass(cls):
    """The step ops' hyper-parameters are one frozen dataclass; the schema lists its fields
    in order (lr twice: as a tensor or a float)."""
    op = {SgdHyper: "sgd_step", AdamWHyper: "adamw_step"}[cls]
    args = [a.name for a in DECLARED[op].overload._schema.arguments]
    fields = [f.name for f in dataclasses.fields(cls)]
    expected = ["lr_tensor", "lr", *fields[1:]]
    start = args.index("lr_tensor")
    assert args[start : start + len(expected)] == expected
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls(0.1).lr = 0.2  # type: ignore[misc]


def test_no_backend_calls_the_eager_reference_itself():
    """The chooser is the one place that falls back (a backend raises ``Declined``)."""
    root = Path(sk.__file__).parent
    for path in sorted(root.glob("triton/*.py")) + [root / "cuda_ext.py"]:
        text = path.read_text()
        assert "_eager" not in text, f"{path.name} refers to an eager implementation"


# ----------------------------------------------------------------------------- cases
def _step_inputs(dtype, backups: bool):
    params = make(dtype)
    grads = make(dtype)
    bk = make(dtype) if backups else None
    if backups:
        params = nans_like(params)  # written in full from the backups
    return params, grads, bk


def case_grad_norm(dtype, weighted):
    g, p = make(dtype), make(dtype) if weighted else None
    return (g, p, 0.01 if weighted else 0.0), ()


def case_perturb(dtype, variant):
    """``variant``: ``(adaptive, save_backup)``. From the backups (no save), the parameters are
    written in full and the backups must come back unchanged."""
    adaptive, save = variant
    p, g = make(dtype), make(dtype)
    scale = torch.rand(len(p)) if adaptive else torch.rand(())
    p, b = (p, nans_like(p)) if save else (nans_like(p), p)
    return (p, g, b, scale, adaptive, 0.05, save), (0, 2)


def case_restore(dtype, _):
    return (nans_like(make(dtype)), make(dtype)), (0,)


def case_lincomb(dtype, per_tensor):
    t0, t1 = make(dtype), make(dtype)
    n = len(t0)
    coefs = torch.randn(2, n) if per_tensor else torch.randn(2)
    return (nans_like(t0), t0 + t1, coefs), (0,)


def case_frob_accumulate(dtype, init):
    """``init``: the sums start from zero, their inputs (NaN here) not read."""
    cross, gsum = (nans_like(make(dtype)) for _ in range(2)) if init else (make(dtype), make(dtype))
    return (cross, gsum, make(dtype), torch.tensor(0.37), init), (0, 1)


def case_sgd_step(dtype, backups):
    params, grads, bk = _step_inputs(dtype, backups)
    bufs = make(dtype)
    steps = [torch.zeros(()) for _ in params]
    hyper = (None, 0.1, 0.9, 0.1, False, 1e-3, False)
    ok = torch.tensor(1.0)
    return (params, grads, None, bufs, steps, bk, *hyper, ok), (0, 3, 4)


def case_adamw_step(dtype, backups):
    params, grads, bk = _step_inputs(dtype, backups)
    m, v = make(dtype), make(dtype, positive=True)
    steps = [torch.full((), 2.0) for _ in params]
    hyper = (None, 1e-2, 0.9, 0.999, 1e-8, 0.05, False, False)
    ok = torch.tensor(1.0)
    return (params, grads, None, m, v, [], steps, bk, *hyper, ok), (0, 3, 4, 6)


def case_aesam_stats(dtype, _):
    return (make(dtype), torch.tensor([1.5, 0.25]), 0.9, 1.0), (1,)


def case_dot(dtype, _):
    return (make(dtype), make(dtype)), ()


def case_looksam_project(dtype, ok):
    """``ok``: absent (gv copied from the result: NaN outputs must be written in full), 1.0
    (selected: random finite outputs, which stay only where an element is not written), or 0.0
    (gv keeps its values). g0's second tensor is zero (coefficient 0: gv = gs)."""
    g0, gs = make(dtype), make(dtype)
    g0[1] = torch.zeros_like(g0[1])
    gv = nans_like(g0) if ok is None else make(dtype)
    return (gv, g0, gs, None if ok is None else torch.tensor(ok)), (0,)


def case_looksam_reuse_coefs(dtype, alpha):
    """gv's second tensor is zero (coefficient 0)."""
    g0, gv = make(dtype), make(dtype)
    gv[1] = torch.zeros_like(gv[1])
    return (g0, gv, alpha), ()


def case_finite_and(dtype, variant):
    """Losses and norms of ``dtype`` (a one-element non-0-d one too); ``variant``: the flag
    given or not, every value finite or not."""
    values = [torch.tensor(1.5).to(dtype), torch.tensor([[0.25]]).to(dtype), torch.tensor(3)]
    if variant == "nonfinite":
        values.insert(1, torch.tensor(float("inf")).to(dtype))
    ok = None if variant == "no-ok" else torch.tensor(1.0)
    return (ok, values), ()


def case_ascent_scale(dtype, variant):
    """fp32 norm and radii (the dtypes a step gives them; fp64 in the bit test below): 17 radii,
    none, a factor as a float or a tensor, the negated scale, a norm that is not finite."""
    rho = torch.rand(0 if variant == "empty" else 17)
    norm = torch.tensor(float("nan") if variant == "nonfinite" else 2.75)
    factor = {"factor": 0.3, "factor-tensor": torch.tensor(0.6)}.get(variant, 1.0)
    factor_t = factor if isinstance(factor, torch.Tensor) else None
    return (norm, rho, factor_t, 1.0 if factor_t is not None else factor, variant == "negated"), ()


def case_count_step(dtype, ok):
    return (torch.tensor([5.0, 2.0]), torch.tensor(ok)), (0,)


def case_empty_like_list(dtype, _):
    return (make(dtype),), ()


def case_zero_unless(dtype, ok):
    return (make(dtype), torch.tensor(ok)), (0,)


CASES = {
    "finite_and": (case_finite_and, ["no-ok", "nonfinite", "ok"]),
    "ascent_scale": (
        case_ascent_scale,
        ["plain", "empty", "factor", "factor-tensor", "nonfinite", "negated"],
    ),
    "count_step": (case_count_step, [0.0, 1.0]),
    "grad_norm": (case_grad_norm, [False, True]),
    "perturb": (case_perturb, [(False, True), (True, True), (False, False), (True, False)]),
    "restore": (case_restore, [None]),
    "lincomb": (case_lincomb, [False, True]),
    "frob_accumulate": (case_frob_accumulate, [False, True]),
    "sgd_step": (case_sgd_step, [False, True]),
    "adamw_step": (case_adamw_step, [False, True]),
    "aesam_stats": (case_aesam_stats, [None]),
    "dot": (case_dot, [None]),
    "looksam_project": (case_looksam_project, [None, 1.0, 0.0]),
    "looksam_reuse_coefs": (case_looksam_reuse_coefs, [0.0, 0.7]),
    "empty_like_list": (case_empty_like_list, [None]),
    "zero_unless": (case_zero_unless, [0.0, 1.0]),
}
PARITY = [(op, v) for op, (_, variants) in CASES.items() for v in variants]


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, list):
        return [t.clone() if isinstance(t, torch.Tensor) else t for t in x]
    return x


def _upcast(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
        return x.float()
    if isinstance(x, list):
        return [_upcast(t) for t in x]
    return x


def _call(op, args, backend):
    return DECLARED[op].overload(*args, backend)


def test_every_declared_op_has_a_parity_case():
    assert set(CASES) | set(NOISE_OPS) == set(DECLARED)


@pytest.mark.parametrize("device,backend", PLACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,variant", PARITY)
def test_backend_parity_through_the_schema(op, variant, dtype, device, backend):
    make_case = CASES[op][0]
    with torch.device(device):  # the factories of the case build on ``device``
        args, written = make_case(dtype, variant)
    got_args = [_clone(a) for a in args]
    got = _call(op, got_args, backend)
    if backend == "eager":
        # the reference itself rounds in the tensors' dtype (bf16 T^2 g in ASAM's perturb,
        # ...): through the schema it must give the Python entry point's bits
        ref_args = [_clone(a) for a in args]
        ref = _backend.eager_impl(op)(*DECLARED[op].from_schema(*ref_args))
        for k in written:
            for i, (x, y) in enumerate(zip(got_args[k], ref_args[k])):
                assert torch.equal(x, y), f"{op} arg {k}[{i}]"
                assert bool(torch.isfinite(x).all()), f"{op} arg {k}[{i}]: not written in full"
    else:
        # fused backends compute in fp32: the eager reference on fp32 copies, rounded once
        ref_args = [_upcast(_clone(a)) for a in args]
        ref = _call(op, ref_args, "eager")
        for k in written:
            assert_close_lists(got_args[k], ref_args[k], f"{op} arg {k}")
    if op == "empty_like_list":  # allocations: the layout of the inputs' own dtype
        ref = _call(op, [_clone(a) for a in args], "eager")
    if isinstance(ref, list):  # ascent_scale's scales; empty_like_list's new tensors
        assert len(got) == len(ref)
        for x, y in zip(got, ref):
            assert x.shape == y.shape and x.dtype == y.dtype
            if op == "empty_like_list":  # uninitialised: the layout is what is compared
                assert x.stride() == y.stride() and x.device == y.device, op
            else:
                assert torch.equal(x, y), op
    if isinstance(ref, torch.Tensor):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        if op in ("aesam_stats", "finite_and"):
            assert torch.equal(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", PLACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_from_backups_is_restore_then_perturb(adaptive, dtype, device, backend):
    """``perturb_(save_backup=False)`` (CR-SAM's ``w - e``) writes, on each backend, the bits of
    that backend's ``restore_`` followed by ``perturb_``, and leaves the backups as they were."""
    with torch.device(device):
        w, b, g = make(dtype), make(dtype), make(dtype)
        scale = torch.rand(len(w)) - 0.5 if adaptive else -torch.rand(())
    b_before = [t.clone() for t in b]
    w_ref, b_ref = [t.clone() for t in w], [t.clone() for t in b]
    sk.restore_(w_ref, b_ref, backend=backend)
    sk.perturb_(w_ref, g, b_ref, scale, adaptive=adaptive, eta=0.05, backend=backend)
    sk.perturb_(w, g, b, scale, adaptive=adaptive, eta=0.05, save_backup=False, backend=backend)
    for i, (x, y) in enumerate(zip(w, w_ref)):
        assert torch.equal(bits(x), bits(y)), f"params[{i}]"
    for i, (x, y) in enumerate(zip(b, b_before)):
        assert torch.equal(bits(x), bits(y)), f"backups[{i}] changed"


@pytest.mark.parametrize("device,backend", PLACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frob_accumulate_init_is_zero_then_accumulate(dtype, device, backend):
    """``frob_accumulate_(init=True)`` (Frob-SAM's first sample) writes, on each backend, the
    bits of zeroing the sums and then accumulating, whatever the sums held (NaN here)."""
    with torch.device(device):
        g, loss = make(dtype), torch.tensor(-0.37)
        cross, gsum = nans_like(g), nans_like(g)
        ref_c, ref_s = [torch.zeros_like(t) for t in g], [torch.zeros_like(t) for t in g]
    g[1].fill_(-0.0)  # 0 + (-0) is +0: the sign of a zero as the zeroed sums give it
    sk.frob_accumulate_(ref_c, ref_s, g, loss, backend=backend)
    sk.frob_accumulate_(cross, gsum, g, loss, init=True, backend=backend)
    for name, got, ref in (("cross", cross, ref_c), ("gsum", gsum, ref_s)):
        for i, (x, y) in enumerate(zip(got, ref)):
            assert torch.equal(bits(x), bits(y)), f"{name}[{i}]"


# ----------------------------------------------------------------------------- noise ops
#: the noise ops: one counter-based contract (sam_kernels.ops.philox), so the same (seed, offset)
#: gives the same bits on every backend, not only close values
NOISE_OPS = ("noise_perturb", "filter_noise_perturb")
SEED_OFFSETS = [(0, 0), (20261204, 977), (-(2**62) + 12345, 2**40 + 3)]
#: a few thousand elements more, so that a one-ulp slip in the noise math shows in fp16/bf16 too
BIG = (61, 67)


def assert_same_bits(actual, ref, what):
    assert len(actual) == len(ref)
    for i, (a, r) in enumerate(zip(actual, ref)):
        assert a.shape == r.shape and a.dtype == r.dtype, (what, i)
        assert bool(torch.isfinite(a).all()), f"{what}[{i}]: not written in full"
        diff = int((bits(a) != bits(r)).sum())
        assert diff == 0, f"{what}[{i}]: {diff} of {a.numel()} elements differ in their bits"


def _seed_offset(seed, offset):
    return torch.tensor(seed, dtype=torch.int64), torch.tensor(offset, dtype=torch.int64)


@pytest.mark.parametrize("device,backend", FUSED_PLACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "uniform"])
@pytest.mark.parametrize("save_backup,per_tensor", [(True, False), (False, True)])
@pytest.mark.parametrize("seed,offset", SEED_OFFSETS)
def test_noise_perturb_is_bit_identical_across_backends(
    seed, offset, save_backup, per_tensor, kind, dtype, device, backend
):
    """``noise_perturb_`` through the schema: every fused backend writes the eager backend's
    bits, for the same ``(seed, offset)``, in every dtype (not a tolerance: the contract)."""
    with torch.device(device):
        params = [torch.randn(BIG).to(dtype), *make(dtype)]
        backups = nans_like(params) if save_backup else [torch.randn(BIG).to(dtype), *make(dtype)]
        scale = torch.rand(len(params)) + 0.5 if per_tensor else torch.tensor(0.7)
        seed_t, offset_t = _seed_offset(seed, offset)
    args = (params, backups, scale, kind, 0.03, save_backup, seed_t, offset_t)
    got = [_clone(a) for a in args]
    ref = [_clone(a) for a in args]
    _call("noise_perturb", got, backend)
    _call("noise_perturb", ref, "eager")
    assert_same_bits(got[0], ref[0], "params")
    assert_same_bits(got[1], ref[1], "backups")
    # and the noise is there: params moved off the backups (the sizes > 1 at least)
    moved = [bool((p != b).any()) for p, b in zip(got[0], got[1]) if p.numel() > 1]
    assert moved and all(moved)


@pytest.mark.parametrize("device,backend", FUSED_PLACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed,offset", SEED_OFFSETS)
def test_filter_noise_perturb_is_bit_identical_across_backends(
    seed, offset, dtype, device, backend
):
    """``filter_noise_perturb_`` (R-SAM) through the schema: with rows of norm exactly 1 the
    scale is exact everywhere, so every fused backend writes the eager backend's bits."""
    if backend not in {
        b
        for b in _backends(device)
        if "filter_noise_perturb" in _backend._REGISTRY
        and b in _backend._REGISTRY["filter_noise_perturb"]
    }:
        pytest.skip(f"{backend} has no filter_noise_perturb_ (the chooser runs eager)")
    with torch.device(device):
        # rows of norm exactly 1: the filter's scale is exact on every backend, so its deltas
        # are sigma * z and the op's bits are the noise contract's
        params = unit_rows([(s, "c") for s in [BIG, *SHAPES]] + [(NONCONTIG, "s")], dtype)
        seed_t, offset_t = _seed_offset(seed, offset)
    sigmas = [0.5 + 0.25 * i for i in range(len(params))]
    args = (params, nans_like(params), nans_like(params), None, sigmas, seed_t, offset_t, 0.0)
    got = [_clone(a) for a in args]
    ref = [_clone(a) for a in args]
    _call("filter_noise_perturb", got, backend)
    _call("filter_noise_perturb", ref, "eager")
    for k, name in enumerate(("params", "backups", "deltas")):
        assert_same_bits(got[k], ref[k], name)
    assert any(bool((d != 0).any()) for d in got[2])


@pytest.mark.parametrize("device,backend", PLACES)
def test_schema_call_equals_the_python_entry_point(device, backend):
    """``torch.ops.sam_kernels.sgd_step_`` and ``sam_kernels.sgd_step_`` run the same code."""
    with torch.device(device):
        args, _ = case_sgd_step(torch.float32, True)
    a = [_clone(x) for x in args]
    b = [_clone(x) for x in args]
    _call("sgd_step", a, backend)
    params, grads, _, bufs, steps, bk, _, lr, mom, damp, nest, wd, maxi, ok = b
    sk.sgd_step_(
        params, grads, bufs, steps, backups=bk, lr=lr, momentum=mom, dampening=damp,
        nesterov=nest, weight_decay=wd, maximize=maxi, ok=ok, backend=backend,
    )  # fmt: skip
    for x, y in zip(a[0] + a[3] + a[4], params + bufs + steps):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- scalar glue
#: norms and losses at the edges: signed zeros, around -1e-12 (where norm + 1e-12 is 0), the
#: smallest subnormal, the largest float32, infinities and NaN
EDGE_VALUES = [0.0, -0.0, 1.0, 2.5, 1e-12, -1e-12, -1.0000001e-12, 7e-13, 1e-45, 1e-38, 3.4e38,
               float("inf"), -float("inf"), float("nan")]  # fmt: skip


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("device,backend", FUSED_PLACES)
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rho_dtype", [torch.float32, torch.float64], ids=str)
def test_ascent_scale_is_bit_identical_to_eager(device, backend, norm_dtype, rho_dtype):
    """The fused scale has the eager chain's bits (fp64 rho for fp64 parameters, a norm of
    either dtype), for every edge value, factor kind and sign."""
    with torch.device(device):
        rho = torch.tensor([0.05, 0.1, 1e-30, 3.0, 0.0, 2.0**-20], dtype=rho_dtype)
        factors = [1.0, 0.37, torch.tensor(0.61, dtype=norm_dtype)]
        for v in EDGE_VALUES:
            norm = torch.tensor(v, dtype=norm_dtype)
            for factor in factors:
                for negated in (False, True):
                    args = (norm, rho, factor)
                    ref = sk.ascent_scale(*args, negated=negated, backend="eager")
                    got = sk.ascent_scale(*args, negated=negated, backend=backend)
                    assert len(got) == len(ref) == 1 + negated
                    for x, y in zip(got, ref):
                        assert _same_bits(x, y), (v, factor, negated, x, y)


@pytest.mark.parametrize("device,backend", FUSED_PLACES)
def test_finite_and_and_count_step_are_bit_identical_to_eager(device, backend):
    """The flag and the counters: every dtype of value (a NaN flag stays NaN), any flag."""
    with torch.device(device):
        dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
        values = [torch.tensor(v, dtype=d) for v in EDGE_VALUES for d in dtypes]
        values += [torch.tensor([[1]]), torch.tensor(5, dtype=torch.int32)]
        for ok in (None, torch.tensor(1.0), torch.tensor(0.0), torch.tensor(float("nan"))):
            assert _same_bits(
                sk.finite_and(ok, [], backend=backend), sk.finite_and(ok, [], backend="eager")
            )
            for i in range(len(values)):
                pair = [values[i], values[(7 * i + 3) % len(values)]]
                ref = sk.finite_and(ok, pair, backend="eager")
                assert _same_bits(sk.finite_and(ok, pair, backend=backend), ref), (ok, pair)
            # more values than one CUDA launch takes (8): launches chained, the same products
            for start in (0, 36):
                many = values[start : start + 19]
                ref = sk.finite_and(ok, many, backend="eager")
                assert _same_bits(sk.finite_and(ok, many, backend=backend), ref), (ok, start)
        for ok in (0.0, 1.0, 0.5, float("nan")):
            c_ref, c_got = torch.tensor([7.0, 3.0]), torch.tensor([7.0, 3.0])
            sk.count_step_(c_ref, torch.tensor(ok), backend="eager")
            sk.count_step_(c_got, torch.tensor(ok), backend=backend)
            assert _same_bits(c_got, c_ref), ok


def test_scalar_glue_ops_refuse_wrong_shapes():
    with pytest.raises(ValueError, match="one-element"):
        sk.finite_and(None, [torch.zeros(2)])
    with pytest.raises(ValueError, match="0-d norm"):
        sk.ascent_scale(torch.zeros(1), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        sk.count_step_(torch.zeros(3), torch.tensor(1.0))


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("op", sorted(CASES))
def test_opcheck(op):
    """Schema annotations (what is written), the fake against the real op, aot dispatch."""
    make_case, variants = CASES[op]
    args, _ = make_case(torch.float32, variants[-1])
    # opcheck runs the op several times: NaN outputs of a first run would be inputs later
    args = [torch.zeros_like(a) if isinstance(a, torch.Tensor) and a.isnan().any() else a
            for a in args]  # fmt: skip
    args = [[torch.nan_to_num(t) for t in a] if isinstance(a, list) else a for a in args]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if op != "empty_like_list":  # whose outputs are uninitialised: the aot check compares values
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(DECLARED[op].overload, (*args, None), test_utils=utils)


# ----------------------------------------------------------------------------- declining
def test_a_declined_call_runs_on_the_next_implementation(monkeypatch):
    """An implementation raising ``Declined`` before writing: the chooser runs eager."""
    calls = []

    def refuses(*args):
        calls.append(len(args))
        raise sk.Declined("not these arguments")

    monkeypatch.setitem(_backend._REGISTRY["restore"], "ext", refuses)
    monkeypatch.setattr(_backend, "available", lambda name, device="cpu": True)
    monkeypatch.setattr(_backend, "_RESOLVED", {})  # the choices made before the patches
    p, b = nans_like(make(torch.float32)), make(torch.float32)
    sk.restore_(p, b, backend="ext")
    assert calls == [2]
    assert all(torch.equal(x, y) for x, y in zip(p, b))


@pytest.mark.skipif("ext" not in BACKENDS, reason="compiled extension not built")
def test_the_extension_declines_more_terms_than_its_kernels_combine():
    from sam_kernels import cuda_ext

    k = cuda_ext.MAX_STEP_GRAD_TERMS + 1
    params = make(torch.float32)
    terms = tuple(make(torch.float32) for _ in range(k))
    comb = sk.LinComb(terms, torch.randn(k))
    runs = {}
    for backend in ("ext", "eager"):
        p = [t.clone() for t in params]
        bufs, steps = [torch.zeros_like(t) for t in p], [torch.zeros(()) for _ in p]
        sk.sgd_step_(p, comb, bufs, steps, lr=0.1, momentum=0.9, backend=backend)
        runs[backend] = p + bufs
    assert all(torch.equal(x, y) for x, y in zip(runs["ext"], runs["eager"]))
    with pytest.raises(sk.Declined):
        cuda_ext.sgd_step_ext(params, comb, bufs, steps, None, SgdHyper(0.1, momentum=0.9), None)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("device,backend", FUSED_PLACES)
def test_fused_ops_compile_as_one_graph(device, backend):
    """A SAM ascent + descent of fused ops compiles with ``fullgraph=True`` (Triton's
    pointer-table launches are not traceable: the declared ops are opaque nodes), one node
    per op, and gives the eager call's values."""
    torch._dynamo.reset()
    nodes = []

    def count(gm, example_inputs):
        nodes.extend(
            str(n.target) for n in gm.graph.nodes if "sam_kernels" in str(getattr(n, "target", ""))
        )
        return gm.forward

    def step(params, grads, backups, bufs, steps):
        norm = sk.grad_norm(grads, backend=backend)
        scale = 0.05 / (norm + 1e-12)
        sk.perturb_(params, grads, backups, scale, backend=backend)
        sk.sgd_step_(
            params, grads, bufs, steps, backups=backups, lr=0.1, momentum=0.9, backend=backend
        )
        return norm

    def inputs():
        torch.manual_seed(3)
        with torch.device(device):
            p, g = make(torch.float32), make(torch.float32)
            steps = [torch.zeros(()) for _ in p]
        return (
            p,
            g,
            [torch.empty_like(t) for t in p],
            [torch.zeros_like(t) for t in p],
            steps,
        )

    ref_in, got_in = inputs(), inputs()
    ref = step(*ref_in)
    got = torch.compile(step, backend=count, fullgraph=True)(*got_in)
    assert torch.equal(got, ref)
    for a, b in zip(ref_in, got_in):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(nodes) == sorted(
        ["sam_kernels.grad_norm.default", "sam_kernels.perturb_.default",
         "sam_kernels.sgd_step_.default"]
    ), nodes  # fmt: skip


def test_the_eager_backend_is_traced_not_wrapped():
    """With the eager reference chosen, torch.compile traces its torch ops (the compiler fuses
    them), so no declared op is left in the graph."""
    torch._dynamo.reset()
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    p, b = make(torch.float32), make(torch.float32)
    torch.compile(lambda p, b: sk.restore_(p, b, backend="eager"), backend=record)(p, b)
    assert targets and not any("sam_kernels" in t for t in targets), targets
    assert all(torch.equal(x, y) for x, y in zip(p, b))


def test_entry_points_keep_their_signatures():
    """The public functions keep their keyword arguments (the dataclass is internal)."""
    sig = inspect.signature(sk.sgd_step_)
    for name in ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize", "ok"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("backend", FUSED)
def test_a_first_call_under_compile_loads_the_backend(backend, tmp_path):
    """In a fresh process, the first fused call is the compiled one: the backend's lazy import
    happens while torch.compile traces (it is run, not traced) and the graph is still whole."""
    import os
    import subprocess
    import sys

    script = tmp_path / "first.py"
    script.write_text(
        "import torch, sam_kernels as sk\n"
        "p, g, b = [torch.randn(5)], [torch.randn(5)], [torch.empty(5)]\n"
        "w = p[0].clone()\n"
        "nodes = []\n"
        "def record(gm, example_inputs):\n"
        "    nodes.extend(str(n.target) for n in gm.graph.nodes)\n"
        "    return gm.forward\n"
        "def f(p, g, b):\n"
        f"    sk.perturb_(p, g, b, torch.tensor(0.5), backend={backend!r})\n"
        "torch.compile(f, backend=record, fullgraph=True)(p, g, b)\n"
        "assert torch.equal(b[0], w), 'backup'\n"
        "torch.testing.assert_close(p[0], w + 0.5 * g[0])\n"
        "assert [n for n in nodes if 'sam_kernels' in n] == ['sam_kernels.perturb_.default']\n"
        "print('ok')\n"
    )
    root = Path(sk.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
