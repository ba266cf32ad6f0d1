"""Fused ops called directly refuse what they cannot run correctly (issue 13, item 10).

For every op of :mod:`sam_kernels.ops`:

- an output tensor passed twice (in one list, or in two lists the op writes), or overlapping
  views of one storage among the written tensors, are refused with a ``ValueError`` naming the
  arguments (backends disagreed on the result before);
- a meta tensor among real ones (in a list, or as a tensor coefficient: scale, ok flag, lr,
  loss, coefficients, stats) is refused naming the argument (it silently did nothing before);
- a refused call changes nothing;
- legitimate aliasing still works and matches the eager reference: non-overlapping views of
  one storage (two halves of one buffer, inside a list or across written lists), and inputs
  aliasing each other or an output (``lincomb_``'s ``out`` may be a term).

An all-meta call is accepted (it traces shapes and does nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import sam_kernels as sk
from sam_kernels import LinComb

N = 8  # elements per tensor; two tensors per list
BACKENDS = [b for b in ("eager", "triton", "cuda") if sk.available(b, "cpu")]


def t(seed: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def pair(seed: int) -> list[torch.Tensor]:
    return [t(seed), t(seed + 1)]


@dataclass
class Spec:
    """One op: how to build fresh arguments and call it, and which arguments are what."""

    build: Callable[[], dict]
    call: Callable[..., object]
    outputs: tuple[str, ...] = ()  # written lists (and state lists kept separate from them)
    inputs: tuple[str, ...] = ()  # read-only lists
    coefs: tuple[str, ...] = ()  # tensor-valued coefficients


def _steps() -> list[torch.Tensor]:
    return [torch.zeros(()), torch.zeros(())]


SPECS: dict[str, Spec] = {
    "perturb_": Spec(
        lambda: dict(params=pair(1), grads=pair(3), backups=pair(5), scale=torch.tensor(0.1)),
        lambda kw, backend: sk.perturb_(**kw, adaptive=True, eta=0.01, backend=backend),
        outputs=("params", "backups"),
        inputs=("grads",),
        coefs=("scale",),
    ),
    "noise_perturb_": Spec(
        lambda: dict(
            params=pair(1),
            backups=pair(5),
            scale=torch.tensor([0.1, 0.2]),
            seed=torch.tensor(7),
            offset=torch.tensor(0),
        ),
        lambda kw, backend: sk.noise_perturb_(**kw, backend=backend),
        outputs=("params", "backups"),
        coefs=("scale", "seed", "offset"),
    ),
    "restore_": Spec(
        lambda: dict(params=pair(1), backups=pair(5)),
        lambda kw, backend: sk.restore_(**kw, backend=backend),
        outputs=("params", "backups"),
    ),
    "lincomb_": Spec(
        lambda: dict(out=pair(1), terms=(pair(3), pair(5)), coefs=torch.tensor([0.5, -2.0])),
        lambda kw, backend: sk.lincomb_(**kw, backend=backend),
        outputs=("out",),
        inputs=("terms.0", "terms.1"),
        coefs=("coefs",),
    ),
    "frob_accumulate_": Spec(
        lambda: dict(cross=pair(1), gsum=pair(3), grads=pair(5), loss=torch.tensor(0.7)),
        lambda kw, backend: sk.frob_accumulate_(**kw, backend=backend),
        outputs=("cross", "gsum"),
        inputs=("grads",),
        coefs=("loss",),
    ),
    "sgd_step_": Spec(
        lambda: dict(
            params=pair(1),
            grads=pair(3),
            momentum_buffers=pair(5),
            steps=_steps(),
            backups=pair(7),
            lr=torch.tensor(0.1),
            ok=torch.tensor(1.0),
        ),
        lambda kw, backend: sk.sgd_step_(**kw, momentum=0.9, weight_decay=0.01, backend=backend),
        outputs=("params", "momentum_buffers", "steps", "backups"),
        inputs=("grads",),
        coefs=("lr", "ok"),
    ),
    "adamw_step_": Spec(
        lambda: dict(
            params=pair(1),
            grads=pair(3),
            exp_avgs=pair(5),
            exp_avg_sqs=[x.abs() for x in pair(7)],
            max_exp_avg_sqs=[x.abs() for x in pair(9)],
            steps=_steps(),
            backups=pair(11),
            lr=torch.tensor(0.01),
            ok=torch.tensor(1.0),
        ),
        lambda kw, backend: sk.adamw_step_(**kw, amsgrad=True, backend=backend),
        outputs=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "backups"),
        inputs=("grads",),
        coefs=("lr", "ok"),
    ),
    "looksam_project_": Spec(
        lambda: dict(gv=pair(1), g0=pair(3), gs=pair(5), ok=torch.tensor(1.0)),
        lambda kw, backend: sk.looksam_project_(**kw, backend=backend),
        outputs=("gv",),
        inputs=("g0", "gs"),
        coefs=("ok",),
    ),
    "looksam_reuse": Spec(
        lambda: dict(g0=pair(1), gv=pair(3)),
        lambda kw, backend: sk.looksam_reuse(**kw, alpha=0.7, backend=backend),
        inputs=("g0", "gv"),
    ),
    "grad_norm": Spec(
        lambda: dict(grads=pair(1), params=pair(3)),
        lambda kw, backend: sk.grad_norm(**kw, eta=0.1, backend=backend),
        inputs=("grads", "params"),
    ),
    "finite_flag": Spec(
        lambda: dict(grads=pair(1)),
        lambda kw, backend: sk.finite_flag(**kw, backend=backend),
        inputs=("grads",),
    ),
    "aesam_stats_": Spec(
        lambda: dict(grads=pair(1), stats=torch.tensor([0.5, 0.1])),
        lambda kw, backend: sk.aesam_stats_(**kw, delta=0.9, c=0.5, backend=backend),
        inputs=("grads",),
        coefs=("stats",),
    ),
}
OPS = sorted(SPECS)
WRITERS = [op for op in OPS if SPECS[op].outputs]


def get(kw: dict, name: str) -> list[torch.Tensor]:
    if "." in name:
        key, k = name.split(".")
        return kw[key][int(k)]
    return kw[name]


def label(name: str) -> str:
    """The argument name the error message gives: ``terms.0`` -> ``terms[0]``."""
    if "." in name:
        key, k = name.split(".")
        return f"{key}[{k}]"
    return name


def tensors(kw: dict) -> list[torch.Tensor]:
    out = []
    for v in kw.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                out.extend(x if isinstance(x, (list, tuple)) else [x])
    return out


def refused(op: str, kw: dict, *needles: str, exc: type[Exception] = ValueError) -> None:
    """The call raises ``exc`` naming ``needles`` and changes no tensor."""
    spec = SPECS[op]
    ts = [x for x in tensors(kw) if x.device.type != "meta"]
    before = [x.clone() for x in ts]
    with pytest.raises(exc) as info:
        spec.call(kw, None)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{op}: {needle!r} not in {msg!r}"
    for i, (x, b) in enumerate(zip(ts, before)):
        assert torch.equal(x, b), f"{op}: tensor {i} changed by a refused call"


# ------------------------------------------------------------------------ aliased outputs
@pytest.mark.parametrize("op", WRITERS)
def test_output_passed_twice_in_one_list(op):
    for name in SPECS[op].outputs:
        kw = SPECS[op].build()
        lst = get(kw, name)
        lst[1] = lst[0]
        refused(op, kw, f"{label(name)}[0]", f"{label(name)}[1]")


@pytest.mark.parametrize("op", [op for op in WRITERS if len(SPECS[op].outputs) > 1])
def test_output_passed_in_two_written_lists(op):
    outs = SPECS[op].outputs
    for a, b in zip(outs, outs[1:]):
        kw = SPECS[op].build()
        get(kw, b)[0] = get(kw, a)[0]
        refused(op, kw, f"{label(a)}[0]", f"{label(b)}[0]")


@pytest.mark.parametrize("op", WRITERS)
def test_overlapping_views_refused(op):
    for name in SPECS[op].outputs:
        kw = SPECS[op].build()
        lst = get(kw, name)
        if lst[0].dim() == 0:  # 0-d step counters: two views of one element
            buf = torch.zeros(1)
            lst[0], lst[1] = buf[0], buf.view(())
        else:
            buf = torch.randn(N + N // 2)
            lst[0], lst[1] = buf[:N], buf[N // 2 :]  # 4 elements in common
        refused(op, kw, f"{label(name)}[0]", f"{label(name)}[1]")
    # views overlapping across two written lists
    outs = [o for o in SPECS[op].outputs if get(SPECS[op].build(), o)[0].dim() > 0]
    for a, b in zip(outs, outs[1:]):
        kw = SPECS[op].build()
        buf = torch.randn(N + 1)
        get(kw, a)[1], get(kw, b)[0] = buf[:N], buf[1:]
        refused(op, kw, f"{label(a)}[1]", f"{label(b)}[0]")


def test_interleaved_and_expanded_outputs_refused():
    buf = torch.randn(2 * N)
    kw = SPECS["restore_"].build()
    kw["params"] = [buf[::2], buf[1::2]]  # no common element, but intersecting byte ranges
    refused("restore_", kw, "params[0]", "params[1]")
    kw = SPECS["restore_"].build()
    kw["params"][0] = torch.zeros(1).expand(N)
    refused("restore_", kw, "params[0]", "stride 0")


# ------------------------------------------------------------------------ complex tensors
@pytest.mark.parametrize("op", OPS)
def test_complex_tensor_in_a_list_refused(op):
    """A complex tensor (read as its real parts before, with only a cast warning) is refused
    naming the list and index, on every backend."""
    spec = SPECS[op]
    for name in spec.outputs + spec.inputs:
        kw = spec.build()
        lst = get(kw, name)
        if lst[1].dim() == 0:
            continue  # 0-d step counters: not a parameter's dtype
        lst[1] = torch.randn(N, dtype=torch.complex64)
        refused(op, kw, f"{label(name)}[1] has dtype torch.complex64", exc=TypeError)


# ------------------------------------------------------------------------ meta tensors
@pytest.mark.parametrize("op", OPS)
def test_meta_tensor_in_a_list_refused(op):
    spec = SPECS[op]
    for name in spec.outputs + spec.inputs:
        kw = spec.build()
        lst = get(kw, name)
        lst[1] = torch.empty(N, device="meta")
        refused(op, kw, f"{label(name)}[1] is on meta")


@pytest.mark.parametrize("op", [op for op in OPS if SPECS[op].coefs])
def test_meta_coefficient_refused(op):
    spec = SPECS[op]
    for name in spec.coefs:
        kw = spec.build()
        kw[name] = torch.empty_like(kw[name], device="meta")
        refused(op, kw, name, "meta")


@pytest.mark.parametrize("op", ["sgd_step_", "adamw_step_"])
def test_meta_lincomb_coefficients_refused(op):
    kw = SPECS[op].build()
    kw["grads"] = LinComb((pair(20), pair(22)), torch.empty(2, device="meta"))
    refused(op, kw, "grads.coefs", "meta")


def test_meta_index_refused_by_counter_uniform():
    with pytest.raises(ValueError, match="index"):
        sk.counter_uniform(1, torch.tensor(0), torch.arange(4, device="meta"))


def test_all_meta_call_is_accepted():
    """Only shapes: nothing to check for aliasing, nothing run."""
    m = [torch.empty(N, device="meta") for _ in range(2)]
    sk.restore_(m, [torch.empty(N, device="meta") for _ in range(2)])
    sk.perturb_(m, m, [torch.empty(N, device="meta")] * 2, torch.empty((), device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_coefficient_on_another_device_refused_cpu_scalar_accepted():
    p = [torch.randn(N, device="cuda") for _ in range(2)]
    b = [torch.empty_like(x) for x in p]
    with pytest.raises(ValueError, match="scale"):
        sk.perturb_(p, p, b, torch.ones(2))  # a 2-element CPU tensor
    sk.perturb_(p, p, b, torch.tensor(0.1))  # a CPU scalar: copied, as torch's ops do


def test_cuda_coefficient_with_cpu_lists_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    kw = SPECS["perturb_"].build()
    kw["scale"] = torch.tensor(0.1, device="cuda")
    refused("perturb_", kw, "scale")


# ------------------------------------------------------------------------ legitimate aliasing
def halves(kw: dict, names: tuple[str, ...]) -> dict:
    """The lists ``names`` rewritten as halves of one buffer per list, with the same values."""
    out = dict(kw)
    for name in names:
        lst = get(kw, name)
        if lst[0].dim() == 0:
            buf = torch.stack([x.clone() for x in lst])
            new = [buf[0], buf[1]]
        else:
            buf = torch.cat([x.clone() for x in lst])
            new = [buf[:N], buf[N:]]
        if "." in name:
            key, k = name.split(".")
            terms = list(out[key])
            terms[int(k)] = new
            out[key] = tuple(terms)
        else:
            out[name] = new
    return out


def across(kw: dict, names: tuple[str, ...]) -> dict:
    """Tensor 0 of every written list in one buffer (one storage across the lists)."""
    names = [n for n in names if get(kw, n)[0].dim() > 0]
    out = dict(kw)
    buf = torch.cat([get(kw, n)[0].clone() for n in names])
    for k, n in enumerate(names):
        out[n] = [buf[k * N : (k + 1) * N], get(kw, n)[1].clone()]
    return out


def clone_kw(kw: dict) -> dict:
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.clone()
        elif isinstance(v, tuple):
            out[k] = tuple([x.clone() for x in lst] for lst in v)
        elif isinstance(v, list):
            out[k] = [x.clone() for x in v]
        else:
            out[k] = v
    return out


def results(op: str, kw: dict, ret) -> list[torch.Tensor]:
    spec = SPECS[op]
    got = [x for name in spec.outputs for x in get(kw, name)]
    if isinstance(ret, torch.Tensor):
        got.append(ret)
    elif isinstance(ret, LinComb):
        got.append(ret.coefs)
    if op == "aesam_stats_":
        got.append(kw["stats"])
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_views_of_one_storage_work(op, backend):
    spec = SPECS[op]
    base = spec.build()
    ref_kw = clone_kw(base)
    if op == "noise_perturb_" and backend == "eager":
        ref_kw["noise"] = pair(40)
    ref = results(op, ref_kw, spec.call(ref_kw, "eager" if op != "noise_perturb_" else backend))
    variants = [halves(clone_kw(base), spec.outputs + spec.inputs)]
    if len(spec.outputs) > 1:
        variants.append(across(clone_kw(base), spec.outputs))
    for kw in variants:
        if op == "noise_perturb_" and backend == "eager":
            kw["noise"] = pair(40)
        got = results(op, kw, spec.call(kw, backend))
        assert len(got) == len(ref)
        for i, (a, b) in enumerate(zip(got, ref)):
            torch.testing.assert_close(
                a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{op} {backend} [{i}]: {m}"
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_may_alias(backend):
    """Inputs aliasing each other, and lincomb's out aliasing a term, are accepted."""
    g = pair(1)
    want = sk.grad_norm(pair(1), pair(1), eta=0.1, backend="eager")
    torch.testing.assert_close(sk.grad_norm(g, g, eta=0.1, backend=backend), want)
    terms = (pair(3), pair(5))
    expect = [0.5 * a - 2.0 * b for a, b in zip(*terms)]
    sk.lincomb_(terms[0], terms, torch.tensor([0.5, -2.0]), backend=backend)
    for a, b in zip(terms[0], expect):
        torch.testing.assert_close(a, b)


def test_overlap_check_at_scale():
    """3 x 2000 disjoint views of one buffer pass (and perturb runs on them); shifting one
    backup view by one element onto a parameter's bytes, 4000 tensors apart in the lists, is
    found and named. (The check's cost, one ``data_ptr`` and one sort, is the host benchmark's
    business: no timing is asserted here.)"""
    from sam_kernels.ops._common import check_no_overlap

    n = 2000
    buf = torch.zeros(3 * n * 4)
    views = [buf[k * 4 : (k + 1) * 4] for k in range(3 * n)]
    params, backups, grads = views[:n], views[n : 2 * n], [torch.zeros(4)] * n
    sk.perturb_(params, grads, backups, torch.tensor(0.0))  # legit: disjoint views of one buffer
    check_no_overlap([("params", params), ("backups", backups)])
    shifted = list(backups)
    shifted[-1] = buf[4 * (n - 1) + 1 : 4 * n + 1]  # the last param's last 3 elements, and one more
    with pytest.raises(ValueError, match=rf"params\[{n - 1}\] and backups\[{n - 1}\] alias"):
        check_no_overlap([("params", params), ("backups", shifted)])
