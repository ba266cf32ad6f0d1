"""The six estimators, each written over the skeleton of :mod:`python_api.metrics._measure`:
argument checks, ``with measuring(...) as obj`` (objective built, model preserved), one loop with
a progress bar, then the result dataclass.

The formulas and references are in each docstring and in :mod:`python_api.metrics`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import torch
from torch import nn

from python_api.metrics._checks import check_int, check_positive
from python_api.metrics._data import Data, DeviceLike, LossFn, examples
from python_api.metrics._measure import measuring, probe_samples
from python_api.metrics._numerics import dot, mean_stderr, norm
from python_api.metrics._objective import Objective
from python_api.metrics._progress import progress_bar
from python_api.metrics._rng import gaussian, local_generator, rademacher
from python_api.metrics.results import (
    ApproximationRatioResult,
    GradientNormResult,
    HessianFrobeniusResult,
    HessianTraceResult,
    NormalizedHessianTraceResult,
    TopEigenvalueResult,
)


def gradient_norm(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> GradientNormResult:
    """Gradient norm of the full-data loss, ``||grad L(w)||_2`` (CR-SAM, Wu et al. 2024, Table 3).

    ``grad L = (1/N) sum_b n_b grad L_b`` over all trainable parameters together (the global L2
    norm). Exact: ``stderr = 0`` and ``n`` is the number of examples. ``seed`` only fixes the
    global random state seen by the data pass (shuffling, augmentation, dropout).
    """
    with measuring(model, loss_fn, data, seed=seed, device=device, eval_mode=eval_mode) as obj:
        loss, grad, count = obj.loss_and_grad(progress)  # the loop over batches
        return GradientNormResult(estimate=norm(grad), stderr=0.0, n=count, loss=loss)


def _hutchinson_samples(
    obj: Objective, n_probes: int, seed: int, progress: bool | None
) -> list[float]:
    """``v^T H v`` for Rademacher probes: shared by the trace and the normalized trace, so that
    both see the same probes for the same seed."""
    return probe_samples(obj, n_probes, seed, rademacher, dot, progress, "Hessian trace")


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    n_probes: int = 100,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> HessianTraceResult:
    """Hutchinson's estimate of the Hessian trace (Hutchinson 1989; as in PyHessian).

    ``Tr(H) = E_v[v^T H v]`` for Rademacher probes ``v`` (entries +-1); the estimate is the mean
    of ``v_i^T H v_i`` over ``n_probes`` probes and ``stderr`` their standard deviation over
    ``sqrt(n_probes)`` (``nan`` for one probe). The variance per probe is
    ``2 (||H||_F^2 - sum_i H_ii^2)``: exact for a diagonal Hessian. ``H v`` is a double-backward
    Hessian-vector product of the full-data loss.
    """
    check_int("n_probes", n_probes, 1)
    with measuring(model, loss_fn, data, seed=seed, device=device, eval_mode=eval_mode) as obj:
        samples = _hutchinson_samples(obj, n_probes, seed, progress)
        mean, se = mean_stderr(samples)
        return HessianTraceResult(
            estimate=mean,
            stderr=se,
            n=n_probes,
            n_examples=obj.n_examples or 0,
            samples=tuple(samples),
        )


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> TopEigenvalueResult:
    """Dominant Hessian eigenvalue by power iteration (as in PyHessian, Yao et al. 2020).

    From a Gaussian start ``v_0`` (seeded), iterate ``lambda_k = v_k^T H v_k``,
    ``v_{k+1} = H v_k / ||H v_k||`` until ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|``
    (``converged=True``) or ``max_iter`` HVPs. This finds the eigenvalue of largest **magnitude**,
    sign included (negative when the most curved direction is concave), which is the top
    eigenvalue near a minimum. ``stderr`` is the residual ``||H v - lambda v||`` (an eigenvalue
    of ``H`` lies within it of ``estimate``); ``n`` is the number of iterations.
    """
    tol = check_positive("tol", tol)
    check_int("max_iter", max_iter, 1)
    with measuring(model, loss_fn, data, seed=seed, device=device, eval_mode=eval_mode) as obj:
        v = gaussian(obj.w, local_generator(seed))
        nv = norm(v)
        v = [x / nv for x in v]
        lam, prev, residual, converged, it = 0.0, None, 0.0, False, 0
        with progress_bar(progress, max_iter, "top eigenvalue") as tick:
            for it in range(1, max_iter + 1):  # noqa: B007 (it is reported)
                hv = obj.hvp(v)
                lam = dot(v, hv)
                residual = norm([h - lam * x for h, x in zip(hv, v, strict=True)])
                tick()
                nh = norm(hv)
                if nh == 0.0:  # v in the null space: H = 0 (a random start misses it otherwise)
                    converged = True
                    break
                if prev is not None and abs(lam - prev) <= tol * abs(lam):
                    converged = True
                    break
                prev = lam
                v = [h / nh for h in hv]
        return TopEigenvalueResult(
            estimate=lam,
            stderr=residual,
            n=it,
            n_examples=obj.n_examples or 0,
            converged=converged,
            residual=residual,
        )


def hessian_frobenius_norm(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    n_probes: int = 100,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> HessianFrobeniusResult:
    """Hessian Frobenius norm, ``||H||_F = sqrt(E_v ||H v||^2)`` with ``v ~ N(0, I)``.

    The estimator of the universal-class paper (Tahmasebi et al. 2024, Appendix I):
    ``E||Hv||^2 = Tr(H^T H) = ||H||_F^2``. ``squared`` is the mean of ``||H v_i||^2`` over
    ``n_probes`` Gaussian probes (unbiased for ``||H||_F^2``, variance per probe ``2 Tr(H^4)``),
    ``estimate = sqrt(squared)`` and ``stderr = squared_stderr / (2 estimate)`` (delta method).
    """
    check_int("n_probes", n_probes, 1)
    with measuring(model, loss_fn, data, seed=seed, device=device, eval_mode=eval_mode) as obj:
        samples = probe_samples(
            obj,
            n_probes,
            seed,
            gaussian,
            lambda v, hv: norm(hv) ** 2,
            progress,
            "Hessian Frobenius norm",
        )
        sq, sq_se = mean_stderr(samples)
        est = math.sqrt(max(sq, 0.0))
        se = sq_se / (2.0 * est) if est > 0 else (0.0 if sq_se == 0 else math.nan)
        return HessianFrobeniusResult(
            estimate=est,
            stderr=se,
            n=n_probes,
            n_examples=obj.n_examples or 0,
            squared=sq,
            squared_stderr=sq_se,
            samples=tuple(samples),
        )


def normalized_hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    n_probes: int = 100,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> NormalizedHessianTraceResult:
    """Normalized Hessian trace ``C(w) = Tr(H) / ||grad L(w)||_2`` (CR-SAM, Wu et al. 2024, eq. 4).

    ``Tr(H)`` is :func:`hessian_trace` with the same ``n_probes`` and ``seed`` (same probes, same
    value) and ``||grad L||`` is :func:`gradient_norm`; ``stderr = trace_stderr / grad_norm``.
    A zero gradient gives ``inf`` (``nan`` when the trace is 0 too).
    """
    check_int("n_probes", n_probes, 1)
    with measuring(model, loss_fn, data, seed=seed, device=device, eval_mode=eval_mode) as obj:
        loss, grad, count = obj.loss_and_grad(False)
        gnorm = norm(grad)
        del grad  # free the gradient before the HVPs
        tr, tr_se = mean_stderr(_hutchinson_samples(obj, n_probes, seed, progress))
        if gnorm > 0:
            c, c_se = tr / gnorm, tr_se / gnorm
        else:
            c = math.copysign(math.inf, tr) if tr != 0 else math.nan
            c_se = math.nan
        return NormalizedHessianTraceResult(
            estimate=c,
            stderr=c_se,
            n=n_probes,
            n_examples=count,
            trace=tr,
            trace_stderr=tr_se,
            grad_norm=gnorm,
            loss=loss,
        )


def _ascent(
    obj: Objective,
    x: Any,
    y: Any,
    *,
    rho: float,
    steps: int,
    step_size: float,
    adaptive: bool,
    init: Literal["sam", "zero"],
) -> tuple[float, float, float] | None:
    """``(l(w), l(w + d_SAM), largest loss seen in the ball)`` for one example, or ``None`` when
    its gradient is zero or not finite (the ratio is undefined). See :func:`approximation_ratio`.
    """
    w = obj.w
    l0, g = obj.loss_and_grad_at(w, x, y)
    gn = norm(g)
    if gn == 0.0 or not math.isfinite(gn):
        return None
    scale = rho / (gn + 1e-12)
    d_sam = [scale * gi for gi in g]
    if init == "sam":
        d = d_sam
        cur, gd = obj.loss_and_grad_at([a + b for a, b in zip(w, d, strict=True)], x, y)
        l_sam = cur
    else:
        with torch.no_grad():
            l_sam = obj.loss([a + b for a, b in zip(w, d_sam, strict=True)], x, y).item()
        d, cur, gd = [torch.zeros_like(a) for a in w], l0, g
    best = max(l_sam, cur)
    eta = step_size * rho
    for _ in range(steps):
        gdn = norm(gd)
        if gdn == 0.0 or not math.isfinite(gdn):
            break
        cand = [a + (eta / gdn) * b for a, b in zip(d, gd, strict=True)]
        cn = norm(cand)
        if cn > rho:
            cand = [a * (rho / cn) for a in cand]
        val, gcand = obj.loss_and_grad_at([a + b for a, b in zip(w, cand, strict=True)], x, y)
        if math.isfinite(val):
            best = max(best, val)
        if adaptive and not val > cur:
            eta *= 0.5
            continue
        d, cur, gd = cand, val, gcand
        if adaptive:
            eta = min(1.5 * eta, 2.0 * rho)
    return l0, l_sam, best


def approximation_ratio(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    rho: float = 0.05,
    steps: int = 20,
    step_size: float = 0.5,
    adaptive: bool = True,
    init: Literal["sam", "zero"] = "sam",
    max_examples: int | None = None,
    seed: int = 0,
    device: DeviceLike = None,
    progress: bool | None = None,
    eval_mode: bool = True,
) -> ApproximationRatioResult:
    """Approximation ratio of one-step SAM ascent (CR-SAM, Wu et al. 2024, eq. 2).

    Per example ``(x, y)`` with loss ``l(w) = loss_fn(model(x), y)`` (a batch of one)::

        AR(x, y) = (l(w + d) - l(w)) / (l(w + d*) - l(w)),      AR = mean over examples,

    ``d = rho g / (||g|| + 1e-12)``, ``g = grad l(w)``: the one-step SAM perturbation.
    ``d*`` approximates ``argmax_{||d|| <= rho} l(w + d)`` by ``steps`` (K = 20 as in the paper)
    steps of normalized projected gradient ascent in the rho-ball::

        d_{k+1} = P(d_k + eta_k * grad l(w + d_k) / ||grad l(w + d_k)||),
        P(d) = d * min(1, rho / ||d||)     (projection onto the L2 ball of radius rho),

    starting from ``d_0 = d`` (``init="sam"``, the default) or ``d_0 = 0`` (``init="zero"``), with
    ``eta_0 = step_size * rho``. With ``adaptive=True`` (default) the ascent is monotone: a step
    that does not increase the loss is rejected and halves ``eta``, an accepted one multiplies it
    by 1.5 (capped at ``2 rho``, the ball's diameter); ``adaptive=False`` keeps ``eta = step_size *
    rho`` fixed. Each step costs one forward and backward pass. ``l(w + d*)`` is the largest loss
    seen, the SAM point included, so every ratio is ``<= 1``; an example whose largest increase is
    not above rounding level (``8 eps |l|``) or whose gradient is zero is skipped. The paper
    averages 5000 training examples; ``max_examples`` stops after that many (in data order).
    In eval mode (the default) an example's loss does not depend on the rest of its batch.
    """
    rho = check_positive("rho", rho)
    check_int("steps", steps, 1)
    step_size = check_positive("step_size", step_size)
    if init not in ("sam", "zero"):
        raise ValueError(f"init must be 'sam' or 'zero', got {init!r}")
    if max_examples is not None:
        check_int("max_examples", max_examples, 1)
    ratios: list[float] = []
    skipped = 0
    with measuring(model, loss_fn, data, seed=seed, device=device, eval_mode=eval_mode) as obj:
        eps = torch.finfo(obj.w[0].dtype).eps if obj.w[0].is_floating_point() else 0.0
        with (
            progress_bar(progress, max_examples, "approximation ratio") as tick,
            obj.batches() as batches,
        ):
            # an empty pass raises in obj.batches(), so at least one example is seen here
            for x, y in itertools.islice(examples(batches), max_examples):
                res = _ascent(
                    obj,
                    x,
                    y,
                    rho=rho,
                    steps=steps,
                    step_size=step_size,
                    adaptive=adaptive,
                    init=init,
                )
                tick()
                if res is None:
                    skipped += 1
                    continue
                l0, l_sam, best = res
                den = best - l0
                # an increase at rounding level of the loss is no measurable increase
                if not (den > 8 * eps * max(abs(l0), abs(best))):
                    skipped += 1
                else:
                    ratios.append((l_sam - l0) / den)
        mean, se = mean_stderr(ratios) if ratios else (math.nan, math.nan)
        return ApproximationRatioResult(
            estimate=mean,
            stderr=se,
            n=len(ratios),
            n_skipped=skipped,
            rho=rho,
            steps=steps,
            ratios=tuple(ratios),
        )
