"""Restore fused with the AdamW step, gated by a device-side finite flag.

With ``w = backups`` (restore fused in) or ``w = params``, ``t = steps + 1`` (device tensors),
the update is ``torch.optim.AdamW``'s (Loshchilov & Hutter 2019):
```
g   = -g if maximize else g
w   = w * (1 - lr * weight_decay)
m   = beta1 * m + (1 - beta1) * g                 (torch: m.lerp_(g, 1 - beta1))
v   = beta2 * v + (1 - beta2) * g^2
vm  = max(vm, v)  if amsgrad                      (max_exp_avg_sqs)
p   = w - lr / (1 - beta1^t) * m / (sqrt(v or vm) / sqrt(1 - beta2^t) + eps)
```
When ``ok`` (0-d float, 1.0 or 0.0) is 0 nothing changes: ``p = w``; ``m``, ``v``, ``vm`` and
``steps`` keep their values.
"""

from __future__ import annotations

import torch

from sam_kernels._backend import register
from sam_kernels.ops._common import (
    TensorList,
    cpu_blocks,
    in_place_ok,
    pick,
    pick_scalar,
    repeat,
    sanitize,
    sanitize_,
    select_,
)
from sam_kernels.ops._declare import (
    declare,
    hyper_from_schema,
    hyper_to_schema,
    run,
    schema_fields,
)
from sam_kernels.ops._step_args import (
    AdamWHyper,
    grads_from_schema,
    grads_to_schema,
    step_lists,
)
from sam_kernels.ops.lincomb import LinComb, materialize


def adamw_step_(
    params: TensorList,
    grads: TensorList | LinComb,
    exp_avgs: TensorList,
    exp_avg_sqs: TensorList,
    max_exp_avg_sqs: TensorList,
    steps: TensorList,
    *,
    backups: TensorList | None = None,
    lr: float | torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    ok: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """AdamW step of ``torch.optim.AdamW`` from ``backups`` (or ``params``) into ``params``.

    ``max_exp_avg_sqs`` may be empty unless ``amsgrad``. ``grads`` may be a :class:`LinComb`.
    The declared op: ``torch.ops.sam_kernels.adamw_step_`` (:data:`DECLARED`).
    """
    hyper = AdamWHyper(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize)
    run(
        DECLARED, backend, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
        backups, hyper, ok,
    )  # fmt: skip


def _choose(
    backend, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups,
    hyper: AdamWHyper, ok,
):  # fmt: skip
    state = [
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("steps", steps),
        ("max_exp_avg_sqs", max_exp_avg_sqs if hyper.amsgrad else None),
    ]
    names, lists, outputs, scalars = step_lists(params, grads, state, backups, hyper.lr, ok)
    return pick("adamw_step", backend, names, *lists, outputs=outputs, scalars=scalars)


def _to_schema(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups, hyper, ok):
    flat, coefs = grads_to_schema(grads)
    return (
        params, flat, coefs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups,
        *hyper_to_schema(hyper), ok,
    )  # fmt: skip


def _from_schema(
    params, flat, coefs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups, *rest
):
    hyper, i = hyper_from_schema(AdamWHyper, rest)
    grads = grads_from_schema(flat, coefs, len(params))
    return (
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups, hyper, rest[i],
    )  # fmt: skip


DECLARED = declare(
    "adamw_step",
    "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor? grad_coefs, "
    "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
    "Tensor(e!)[] steps, Tensor(f!)[]? backups, "
    f"{schema_fields(AdamWHyper)}, Tensor? ok, str? backend=None) -> ()",
    _choose,
    to_schema=_to_schema,
    from_schema=_from_schema,
)


@register("adamw_step", "eager")
def adamw_step_eager(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups, hyper: AdamWHyper,
    ok,
) -> None:  # fmt: skip
    lr, beta1, beta2, eps = hyper.lr, hyper.beta1, hyper.beta2, hyper.eps
    weight_decay, amsgrad, maximize = hyper.weight_decay, hyper.amsgrad, hyper.maximize
    params = list(params)
    if not params:
        return
    if (
        backups is not None
        and ok is not None
        and not amsgrad
        and not isinstance(lr, torch.Tensor)
        and in_place_ok(params, grads, exp_avgs, exp_avg_sqs, backups)
    ):
        return _adamw_in_place(
            params, grads, list(exp_avgs), list(exp_avg_sqs), list(steps), list(backups), lr,
            beta1, beta2, eps, weight_decay, maximize, ok,
        )  # fmt: skip
    w = list(backups) if backups is not None else params
    steps = list(steps)
    g = materialize(grads) if isinstance(grads, LinComb) else list(grads)
    if ok is not None:
        g = sanitize(g, ok)
    if maximize:
        g = torch._foreach_neg(g)
    # step count after this step; >= 1 even when skipped so the bias corrections stay finite
    t = torch._foreach_add(steps, 1.0)
    if ok is not None:
        torch._foreach_add_(steps, repeat(ok, len(steps)))
    else:
        torch._foreach_add_(steps, 1.0)
    if isinstance(lr, torch.Tensor):
        decay = 1.0 - lr * weight_decay
        new_w = torch._foreach_mul(w, decay)
    else:
        new_w = torch._foreach_mul(w, 1.0 - lr * weight_decay)
    m = torch._foreach_lerp(list(exp_avgs), g, 1.0 - beta1)
    v = torch._foreach_mul(list(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
    bc1, bc2 = _bias_corrections(beta1, beta2, t)
    if amsgrad:
        vmax = torch._foreach_maximum(list(max_exp_avg_sqs), v)
        denom = torch._foreach_sqrt(vmax)
    else:
        denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)
    # step_size = lr / bc1, applied as -lr * m / (bc1 * denom)
    torch._foreach_mul_(denom, bc1)
    upd = torch._foreach_div(m, denom)
    torch._foreach_mul_(upd, -lr if not isinstance(lr, torch.Tensor) else -lr)
    torch._foreach_add_(new_w, upd)
    if ok is None:
        torch._foreach_copy_(list(exp_avgs), m)
        torch._foreach_copy_(list(exp_avg_sqs), v)
        if amsgrad:
            torch._foreach_copy_(list(max_exp_avg_sqs), vmax)
        torch._foreach_copy_(params, new_w)
        return
    select_(exp_avgs, m, ok)
    select_(exp_avg_sqs, v, ok)
    if amsgrad:
        select_(max_exp_avg_sqs, vmax, ok)
    if backups is not None:
        torch._foreach_copy_(params, w)
    select_(params, new_w, ok)


def _adamw_in_place(
    params, grads, exp_avgs, exp_avg_sqs, steps, w, lr, beta1, beta2, eps, weight_decay,
    maximize, ok,
) -> None:  # fmt: skip
    """The step above from backups, without temporary lists of the parameters' size (CPU).

    The perturbed parameters (rewritten at the end either way) hold the gradient, the moments
    are updated in place, block by block (:func:`cpu_blocks`: each block's passes run while it
    is in the cache, its denominator a block-sized temporary). The flag is applied through the
    coefficients instead of final selects: when ``ok == 0`` the gradient is 0, the lerp weight
    0 and ``beta2`` 1 (``m`` and ``v`` keep their values), the denominator infinite
    (``m / inf = 0``) and the decay 1, so ``p = w``. When ``ok == 1`` the moments, the
    denominator ``sqrt(v) / bc2 + eps`` and the decayed weight are the values above; the update
    is taken as torch's AdamW takes it, one ``addcdiv_(w * decay, m, denom * bc1 / -lr)``
    (within an ulp of the update above).
    """
    comb = isinstance(grads, LinComb)
    src = materialize(grads) if comb else list(grads)  # a LinComb: a new list, used in place
    on = ok != 0
    t = torch._foreach_add(steps, 1.0)  # >= 1 even when skipped: finite bias corrections
    torch._foreach_add_(steps, repeat(ok, len(steps)))
    bc1, bc2 = _bias_corrections(beta1, beta2, t)
    torch._foreach_div_(bc1, pick_scalar(on, -lr, 0.0))  # bc1 / -lr, or -inf when skipped
    w1 = pick_scalar(on, 1.0 - beta1, 0.0)
    b2 = pick_scalar(on, beta2, 1.0)
    decay = pick_scalar(on, 1.0 - lr * weight_decay, 1.0)
    masks: dict = {}
    for idx, (p, s, m, v, wb) in cpu_blocks([params, src, exp_avgs, exp_avg_sqs, w]):
        if comb:
            g = s
        else:
            g = p  # the perturbed weights: overwritten below either way
            torch._foreach_copy_(g, s)
        if maximize:
            torch._foreach_neg_(g)
        sanitize_(g, ok, masks)
        torch._foreach_lerp_(m, g, repeat(w1, len(m)))
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
        denom = torch._foreach_sqrt(v)  # one block
        torch._foreach_div_(denom, [bc2[i] for i in idx])
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(denom, [bc1[i] for i in idx])
        torch._foreach_copy_(p, wb)
        torch._foreach_mul_(p, decay)
        torch._foreach_addcdiv_(p, m, denom)


def _bias_corrections(beta1: float, beta2: float, t: list[torch.Tensor]):
    """``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per tensor, as 0-d tensors of the counters'
    dtype on their device (no host read).

    Computed in fp64 from the betas as given (torch's AdamW takes them as Python floats), then
    rounded once: from the fp32 rounding of ``beta2 = 0.9999`` (off by 2.5e-9), ``1 - beta2^t``
    would be off by up to 2e-4 relative at small ``t``. A fixed number of ops per dtype of the
    counters (one stacked vector), whatever the number of tensors.
    """
    dtypes = {x.dtype for x in t}
    if len(dtypes) > 1:  # counters of fp64 parameters beside fp32 ones: one vector per dtype
        bc1: list = [None] * len(t)
        bc2: list = [None] * len(t)
        for dt in dtypes:
            idx = [i for i, x in enumerate(t) if x.dtype == dt]
            a, b = _bias_corrections(beta1, beta2, [t[i] for i in idx])
            for i, x, y in zip(idx, a, b):
                bc1[i], bc2[i] = x, y
        return bc1, bc2
    tt = torch.stack(t)
    t64 = tt.to(torch.float64)
    bc1_v = (1.0 - torch.pow(float(beta1), t64)).to(tt.dtype)
    bc2_v = (1.0 - torch.pow(float(beta2), t64)).sqrt_().to(tt.dtype)
    return list(bc1_v.unbind(0)), list(bc2_v.unbind(0))
