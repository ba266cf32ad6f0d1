"""LookSAM against an independent float64 implementation of the spec's equations."""

from __future__ import annotations

import pytest
import torch
from _helpers import SCALAR_READS, HostReads, rel_err, same
from _switching_ref import (
    BASES,
    RHOS,
    RefSwitching,
    check_bn_untouched,
    check_exact_restore,
    check_host_reads,
    check_no_trace,
    check_raise_leaves_no_trace,
    check_resume,
    data,
    factory_of,
    look_project,
    look_reuse,
    make_closure,
    make_net,
    run_step,
    state_without_counters,
    weights,
)

import sam_kernels as sk
from python_api.looksam import LookSAM
from sam_kernels.ops.looksam import looksam_project_, looksam_reuse

BATCHES = [data(seed=s) for s in range(20)]  # the spec: 1e-6 over 20 steps


class RefLookSAM(RefSwitching):
    def __init__(self, model, base, hp, k, alpha, rhos=RHOS):
        super().__init__(model, base, hp, rhos)
        self.k, self.alpha, self.gv = k, alpha, {}

    def decide(self, g0):
        return self.t % self.k == 0

    def after_sam(self, g0, gs):
        for p in gs:
            self.gv[p] = look_project(g0[p], gs[p])

    def cheap(self, g0):
        return {p: look_reuse(g, self.gv.get(p), self.alpha) for p, g in g0.items()}


def factory(base="sgd", k=2, alpha=0.7, lr=None, **kw):
    return factory_of(LookSAM, base, lr, k=k, alpha=alpha, **kw)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("form", ["closure", "grads_present"])
@pytest.mark.parametrize("k", [1, 3])
def test_looksam_matches_reference(base, form, k):
    model, opt = factory(base, k=k, alpha=0.7)()
    ref_model = make_net(0)
    ref = RefLookSAM(ref_model, base, BASES[base][1], k, 0.7)
    for x, y in BATCHES:
        got = run_step(model, opt, x, y, form)
        want = ref.step(x, y)
        assert opt.last_decision == int(ref.decisions[-1])
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert ref.decisions == [t % k == 0 for t in range(len(BATCHES))]
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-10, name
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if q in ref.gv:
            assert rel_err(opt.state[p]["gv"], ref.gv[q]) < 1e-10
    assert "gv" not in opt.state[model.unused]  # never had a gradient
    assert opt.sam_steps == sum(ref.decisions) and opt.reuse_steps == len(BATCHES) - sum(
        ref.decisions
    )
    assert opt.sam_fraction == pytest.approx(sum(ref.decisions) / len(BATCHES))


@pytest.mark.parametrize("form", ["closure", "grads_present"])
def test_reuse_steps_run_one_closure_call(form):
    model, opt = factory(k=3)()
    per_step = []
    for x, y in BATCHES[:7]:
        calls = []
        closure = make_closure(model, x, y, calls=calls)
        opt.zero_grad()
        if form == "grads_present":
            closure()
            calls.clear()
        opt.step(closure)
        per_step.append(len(calls))
    sam, reuse = (2, 1) if form == "closure" else (1, 0)
    assert per_step == [sam, reuse, reuse, sam, reuse, reuse, sam]


def _lists(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (0,), (5,), (7,), (2, 3)]
    g0 = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    g0[0] = torch.randn(4, 3, generator=g, dtype=dtype).t()  # non-contiguous
    g0[2] = torch.zeros(5, dtype=dtype)  # ||g0|| = 0: gv = gs
    gs = [torch.randn(t.shape, generator=g, dtype=dtype) for t in g0]
    gs[4] = 3.0 * g0[4]  # parallel: gv = 0
    return g0, gs


#: the backends that run LookSAM's ops on CPU tensors here (the extension's own kernels, Triton's
#: under the interpreter; float64 tensors go to the eager reference on both)
OP_BACKENDS = [b for b in ("eager", "ext", "triton") if sk.available(b, "cpu")]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_looksam_ops_match_float64(dtype, backend):
    g0, gs = _lists(dtype)
    gv = [torch.full_like(t, 9.0) for t in g0]
    looksam_project_(gv, g0, gs, torch.ones(()), backend=backend)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for a, b, v in zip(g0, gs, gv):
        want = look_project(a.double(), b.double())
        assert (v.double() - want).norm() <= tol * max(b.double().norm().item(), 1e-30)
    # ok = 0: gv keeps its values even when gs holds NaN
    old = [v.clone() for v in gv]
    looksam_project_(gv, g0, [t * float("nan") for t in gs], torch.zeros(()), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(old, gv))
    comb = looksam_reuse(g0, gv, 0.7, backend=backend)
    for i, (a, v) in enumerate(zip(g0, gv)):
        got = comb.coefs[0, i] * comb.terms[0][i] + comb.coefs[1, i] * comb.terms[1][i]
        want = look_reuse(a.double(), v.double(), 0.7)
        if v.norm() == 0:
            want = a.double()  # a zero component contributes nothing
        assert (got.double() - want).norm() <= tol * max(want.norm().item(), 1e-30)


def test_looksam_ops_dispatch_count_independent_of_tensor_count():
    counts = []
    for n in (3, 30):
        g0 = [torch.randn(4) for _ in range(n)]
        gs = [torch.randn(4) for _ in range(n)]
        gv = [torch.zeros(4) for _ in range(n)]
        with HostReads(SCALAR_READS) as spy:
            looksam_project_(gv, g0, gs, torch.ones(()))
            looksam_reuse(g0, gv, 0.7)
        assert spy.reads == 0
        counts.append(spy.kernels())
    assert counts[0] == counts[1]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_exact_restore(base):
    model, opt = factory(base, k=2, lr=0.0, rho=0.5)()
    decisions = check_exact_restore(model, opt, BATCHES[:5])
    assert decisions == [1, 0, 1, 0, 1]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize(
    "poison,at,expect",
    [
        ("loss_w", 2, -1),
        ("grad_w", 2, -1),
        ("loss_w", 3, -1),  # a reuse step with a stored gv
        ("grad_w", 3, -1),
        ("loss_w_e", 2, 1),
        ("grad_w_e", 2, 1),
    ],
)
def test_nonfinite_step_leaves_no_trace(base, poison, at, expect):
    decision = check_no_trace(factory(base, k=2), BATCHES[:7], poison, at)
    assert decision == expect


def test_on_nonfinite_raise():
    model, opt = factory(k=2, on_nonfinite="raise")()
    run_step(model, opt, *BATCHES[0])
    run_step(model, opt, *BATCHES[1])
    cases = (("grad_w_e", "w \\+ e"), ("loss_w", "at w"))
    check_raise_leaves_no_trace(model, opt, BATCHES[2], cases)


@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
def test_at_most_one_host_read_per_step(base):
    if base == "rmsprop":
        model = make_net(0)
        opt = LookSAM(model.groups(), torch.optim.RMSprop, k=2, lr=0.01)
    else:
        model, opt = factory(base, k=2)()
    decisions = check_host_reads(model, opt, BATCHES[:4], generic=base == "rmsprop")
    assert decisions == [1, 0, 1, 0]


def test_bn_stats_untouched_by_perturbed_evaluations():
    model, opt = factory(k=2, model="bn")()
    assert check_bn_untouched(model, opt, BATCHES[:3]) == [1, 0, 1]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_bit_identical(base):
    # stop after t = 3 (a SAM step): the checkpoint holds gv, the resumed run reuses it
    check_resume(factory(base, k=3), BATCHES[:8], stop=4)


def test_bad_inputs():
    model = make_net(0)
    sgd = torch.optim.SGD
    for kw, name in [
        (dict(k=0), "k"),
        (dict(k=2.5), "k"),
        (dict(k=True), "k"),
        (dict(alpha=-0.1), "alpha"),
        (dict(rho=-1.0), "rho"),
    ]:
        with pytest.raises(ValueError, match=name):
            LookSAM(model.parameters(), sgd, lr=0.1, **kw)
    with pytest.raises(ValueError, match="rho"):
        LookSAM([{"params": [model.w1], "rho": -0.5}], sgd, lr=0.1)
    opt = LookSAM(model.parameters(), sgd, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("helper", [False, True])
def test_single_rank_process_group(tmp_path, helper):
    """With torch.distributed initialized: under plain DDP (no helper) a non-finite loss at w
    gates the step on the device (it is each rank's own, so it must not decide alone whether a
    second pass runs); under the helper the decision is voted on (MIN) and the step skipped."""
    import torch.distributed as dist

    from python_api.distributed import SAMDDPStep

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, opt = factory(k=2)()
        clean_model, clean_opt = factory(k=2)()
        call = SAMDDPStep(model, opt, mode="global") if helper else None
        for s, (x, y) in enumerate(BATCHES[:5]):
            poison = "loss_w" if s == 2 else None
            before = (weights(model), state_without_counters(opt))
            if call is not None:
                call(make_closure(model, x, y, poison))
            else:
                run_step(model, opt, x, y, poison=poison)
            if s == 2:
                assert opt.last_decision == (-1 if helper else 1)  # plain: SAM step, then gated
                assert same(before, (weights(model), state_without_counters(opt)), dtype=True)
                assert opt.skipped_steps == 1
                continue
            run_step(clean_model, clean_opt, x, y)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean_model.parameters()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_reuse_step_dispatch_count_independent_of_tensor_count(base):
    """A whole reuse step (gradients given: no closure call) dispatches the same ops for 4 and
    for 40 tensors, apart from the per-tensor output allocation (``empty_like``) of
    ``sam_kernels.ops.lincomb.materialize``, the eager step ops' form of a LinComb gradient."""
    counts = []
    for n in (4, 40):
        ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]
        cls, hp = BASES[base]
        opt = LookSAM(ps, cls, k=2, **hp)
        for _ in range(2):  # a SAM step (stores gv), then the reuse step
            sum((p**2).sum() for p in ps).backward()
            with HostReads(SCALAR_READS) as spy:
                opt.step(lambda: sum((p**3).sum() for p in ps).backward())
            opt.zero_grad()
        assert opt.last_decision == 0 and spy.reads == 1
        spy.by_op.pop("aten.empty_like.default", None)
        for op in ("aten.view.dtype", "aten.detach.default"):  # metadata only (METADATA_OPS)
            spy.by_op.pop(op, None)
        counts.append(spy.by_op)
    assert counts[0] == counts[1]
