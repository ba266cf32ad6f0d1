"""SS-SAM against an independent float64 implementation, and its counter-based coin stream."""

from __future__ import annotations

import pytest
import torch
from _helpers import SCALAR_READS, HostReads, rel_err
from _switching_ref import (
    BASES,
    RefSwitching,
    check_bn_untouched,
    check_exact_restore,
    check_host_reads,
    check_no_trace,
    check_raise_leaves_no_trace,
    check_resume,
    data,
    factory_of,
    make_closure,
    make_net,
    py_counter_uniform,
    run_step,
)

from python_api.sssam import SSSAM, SSSAM_STREAM
from sam_kernels.ops.counter_rng import counter_uniform, uniform_threshold

BATCHES = [data(seed=s) for s in range(20)]  # the spec: 1e-6 over 20 steps
SEED = 20240601


class RefSS(RefSwitching):
    def __init__(self, model, base, hp, p, seed):
        super().__init__(model, base, hp)
        self.p, self.seed = p, seed

    def decide(self, g0):
        return py_counter_uniform(self.seed, SSSAM_STREAM, self.t, 0) < self.p


def factory(base="sgd", lr=None, p=0.5, seed=SEED, **kw):
    return factory_of(SSSAM, base, lr, p=p, seed=seed, **kw)


# ---------------------------------------------------------------- the coin stream
def test_counter_uniform_matches_plain_python_copy():
    for seed in (0, 1, SEED, 2**40 + 12345, 2**64 - 1):
        for counter in (0, 1, 7, 2**33 + 5):
            for stream in (0, SSSAM_STREAM):
                got = counter_uniform(seed, torch.tensor(counter), 5, stream=stream).tolist()
                want = [py_counter_uniform(seed, stream, counter, i) for i in range(5)]
                assert got == want


def test_counter_uniform_is_uniform():
    u = torch.cat([counter_uniform(SEED, torch.tensor(t), 64) for t in range(200)])
    assert ((u >= 0) & (u < 1)).all()
    hist = torch.histc(u, 10, 0, 1)
    expected = u.numel() / 10
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 33.7  # 9 degrees of freedom: p < 1e-4 by chance
    # the coins of consecutive steps (SS-SAM's use: index 0, counter t) are Bernoulli(p)
    coins = torch.stack([counter_uniform(SEED, torch.tensor(t), 1)[0] for t in range(2000)])
    frac = float((coins < 0.3).float().mean())
    assert abs(frac - 0.3) < 5 * (0.3 * 0.7 / 2000) ** 0.5


def test_uniform_threshold_is_exact():
    u = torch.arange(0, 2**24, 4099, dtype=torch.float64) * 2.0**-24
    for p in (0.0, 1.0, 0.3, 1 / 3, 2.0**-24, 0.5 + 2.0**-30, 1 - 2.0**-25):
        thr = uniform_threshold(p)
        assert torch.equal(u.float() < thr, u < p)


# ---------------------------------------------------------------- the algorithm
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("form", ["closure", "grads_present"])
def test_sssam_matches_reference(base, form):
    model, opt = factory(base)()
    ref_model = make_net(0)
    ref = RefSS(ref_model, base, BASES[base][1], 0.5, SEED)
    for x, y in BATCHES:
        got = run_step(model, opt, x, y, form)
        want = ref.step(x, y)
        assert opt.last_decision == int(ref.decisions[-1])
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert True in ref.decisions and False in ref.decisions
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-10, name
    assert opt.sam_steps == sum(ref.decisions)
    assert opt.erm_steps == len(BATCHES) - sum(ref.decisions)
    assert opt.sam_fraction == pytest.approx(sum(ref.decisions) / len(BATCHES))


@pytest.mark.parametrize("p,per_step", [(0.0, 1), (1.0, 2)])
def test_p_zero_and_one(p, per_step):
    model, opt = factory(p=p)()
    for x, y in BATCHES[:5]:
        calls = []
        opt.zero_grad()
        opt.step(make_closure(model, x, y, calls=calls))
        assert len(calls) == per_step  # ERM: one forward/backward; SAM: two


def test_sam_frequency_is_p():
    model, opt = factory(p=0.3, seed=7)()
    x, y = BATCHES[0]
    for _ in range(300):
        run_step(model, opt, x, y)
    assert abs(opt.sam_fraction - 0.3) < 5 * (0.3 * 0.7 / 300) ** 0.5


def test_same_seed_same_decisions_on_every_rank():
    """Replicas built with the same seed take the same decisions (no deadlock under DDP)."""
    runs = []
    for seed in (11, 11, 12):
        model, opt = factory(seed=seed)()
        runs.append([])
        for x, y in BATCHES:
            run_step(model, opt, x, y)
            runs[-1].append(opt.last_decision)
    assert runs[0] == runs[1] and runs[0] != runs[2]
    torch.manual_seed(3)
    a = SSSAM(make_net(0).parameters(), torch.optim.SGD, lr=0.1).seed
    torch.manual_seed(3)
    b = SSSAM(make_net(0).parameters(), torch.optim.SGD, lr=0.1).seed
    assert a == b  # seed=None: drawn once from torch's global generator


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_exact_restore(base):
    model, opt = factory(base, lr=0.0, rho=0.5)()
    decisions = check_exact_restore(model, opt, BATCHES[:6])
    assert 1 in decisions and 0 in decisions


def _seed_with(pattern):
    """A seed whose first coins (t = 0, 1, ...) are ``pattern`` (True = SAM) at p = 0.5."""
    for seed in range(10_000):
        coins = [py_counter_uniform(seed, SSSAM_STREAM, t, 0) < 0.5 for t in range(len(pattern))]
        if coins == pattern:
            return seed
    raise AssertionError("no seed found")


@pytest.mark.parametrize("poison", ["loss_w", "grad_w", "loss_w_e", "grad_w_e"])
def test_nonfinite_step_leaves_no_trace(poison):
    # t = 2 is a SAM step and t = 3, 4 are ERM: a skipped step that advanced the stream would
    # make the next steps differ from the clean run's
    seed = _seed_with([True, False, True, False, False, True])
    decision = check_no_trace(factory("adamw", seed=seed), BATCHES[:7], poison, at=2)
    assert decision == (1 if poison.endswith("_e") else -1)


def test_on_nonfinite_raise():
    model, opt = factory(p=1.0, on_nonfinite="raise")()
    run_step(model, opt, *BATCHES[0])
    cases = (("grad_w_e", "w \\+ e"), ("loss_w", "at w"))
    check_raise_leaves_no_trace(model, opt, BATCHES[1], cases)


@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
def test_at_most_one_host_read_per_step(base):
    if base == "rmsprop":
        model = make_net(0)
        opt = SSSAM(model.groups(), torch.optim.RMSprop, seed=SEED, lr=0.01)
    else:
        model, opt = factory(base)()
    decisions = check_host_reads(model, opt, BATCHES[:6], generic=base == "rmsprop")
    assert 1 in decisions and 0 in decisions


def test_coin_draw_reads_nothing_else():
    with HostReads(SCALAR_READS) as spy:
        counter_uniform(SEED, torch.tensor(3), 1)
    assert spy.reads == 0


def test_bn_stats_untouched_by_perturbed_evaluations():
    model, opt = factory(p=1.0, model="bn")()
    assert check_bn_untouched(model, opt, BATCHES[:2]) == [1, 1]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_bit_identical(base):
    # seed=None: the fresh optimizer draws another seed; load_state_dict must restore it
    check_resume(factory(base, seed=None), BATCHES, stop=4)


def test_bad_inputs():
    model = make_net(0)
    sgd = torch.optim.SGD
    for kw, arg in [
        (dict(p=-0.1), "p"),
        (dict(p=1.5), "p"),
        (dict(p=float("nan")), "p"),
        (dict(seed=-1), "seed"),
        (dict(seed="x"), "seed"),
        (dict(rho=-0.1), "rho"),
    ]:
        with pytest.raises(ValueError, match=arg):
            SSSAM(model.parameters(), sgd, lr=0.1, **kw)
