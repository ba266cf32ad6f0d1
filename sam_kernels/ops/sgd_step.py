"""Restore fused with the SGD(-momentum) step, gated by a device-side finite flag.

With ``w = backups`` (restore fused in: the step reads the saved weights, not the perturbed
ones) or ``w = params`` (plain step), the update is ``torch.optim.SGD``'s:
```
g   = -g if maximize else g;      g = g + weight_decay * w
buf = g  (first step of this tensor)   else   momentum * buf + (1 - dampening) * g
d   = g + momentum * buf  if nesterov  else  buf        (d = g when momentum == 0)
p   = w - lr * d
```
``steps[i]`` (0-d float tensors) counts the steps applied to tensor i, so "first step" is a
device fact (zero-initialised buffers, coefficient 1 on the first step). When ``ok`` (0-d float,
1.0 or 0.0) is 0 the step changes nothing: ``p = w``, ``buf`` and ``steps`` keep their values.
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
    SgdHyper,
    grads_from_schema,
    grads_to_schema,
    step_lists,
)
from sam_kernels.ops.lincomb import LinComb, materialize


def sgd_step_(
    params: TensorList,
    grads: TensorList | LinComb,
    momentum_buffers: TensorList,
    steps: TensorList,
    *,
    backups: TensorList | None = None,
    lr: float | torch.Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    ok: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """SGD step of ``torch.optim.SGD`` from ``backups`` (or ``params``) into ``params``.

    ``momentum_buffers`` may be empty when ``momentum == 0``. ``grads`` may be a
    :class:`LinComb` (the gradient of CR-SAM / the universal class, combined in the pass).
    The declared op: ``torch.ops.sam_kernels.sgd_step_`` (:data:`DECLARED`).
    """
    hyper = SgdHyper(lr, momentum, dampening, nesterov, weight_decay, maximize)
    run(DECLARED, backend, params, grads, momentum_buffers, steps, backups, hyper, ok)


def _choose(backend, params, grads, momentum_buffers, steps, backups, hyper: SgdHyper, ok):
    bufs = momentum_buffers if hyper.momentum != 0.0 else None
    names, lists, outputs, scalars = step_lists(
        params, grads, [("steps", steps), ("momentum_buffers", bufs)], backups, hyper.lr, ok
    )
    return pick("sgd_step", backend, names, *lists, outputs=outputs, scalars=scalars)


def _to_schema(params, grads, momentum_buffers, steps, backups, hyper, ok) -> tuple:
    flat, coefs = grads_to_schema(grads)
    return (params, flat, coefs, momentum_buffers, steps, backups, *hyper_to_schema(hyper), ok)


def _from_schema(params, flat, coefs, momentum_buffers, steps, backups, *rest) -> tuple:
    hyper, i = hyper_from_schema(SgdHyper, rest)
    grads = grads_from_schema(flat, coefs, len(params))
    return (params, grads, momentum_buffers, steps, backups, hyper, rest[i])


DECLARED = declare(
    "sgd_step",
    "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor? grad_coefs, "
    "Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, Tensor(d!)[]? backups, "
    f"{schema_fields(SgdHyper)}, Tensor? ok, str? backend=None) -> ()",
    _choose,
    to_schema=_to_schema,
    from_schema=_from_schema,
)


@register("sgd_step", "eager")
def sgd_step_eager(params, grads, momentum_buffers, steps, backups, hyper: SgdHyper, ok) -> None:
    lr, momentum, dampening = hyper.lr, hyper.momentum, hyper.dampening
    nesterov, weight_decay, maximize = hyper.nesterov, hyper.weight_decay, hyper.maximize
    params = list(params)
    if not params:
        return
    if (
        backups is not None
        and ok is not None
        and momentum != 0.0
        and not nesterov
        and not isinstance(lr, torch.Tensor)
        and in_place_ok(params, grads, momentum_buffers, backups)
    ):
        return _sgd_in_place(
            params, grads, list(momentum_buffers), list(steps), list(backups), lr, momentum,
            dampening, weight_decay, maximize, ok,
        )  # fmt: skip
    w = list(backups) if backups is not None else params
    g = materialize(grads) if isinstance(grads, LinComb) else list(grads)
    if ok is not None:
        g = sanitize(g, ok)
    elif isinstance(grads, LinComb):
        pass  # already a fresh list
    else:
        g = torch._foreach_mul(g, 1.0)  # never modify the caller's gradients
    if maximize:
        torch._foreach_neg_(g)
    if weight_decay != 0.0:
        torch._foreach_add_(g, w, alpha=weight_decay)
    if momentum != 0.0:
        bufs = list(momentum_buffers)
        # first = 1 where no step has been applied yet: coefficient 1 instead of 1 - dampening
        first = torch._foreach_mul(list(steps), -1.0)
        torch._foreach_add_(first, 1.0)
        torch._foreach_clamp_min_(first, 0.0)
        coef = torch._foreach_mul(first, dampening)
        torch._foreach_add_(coef, 1.0 - dampening)
        new_buf = torch._foreach_mul(bufs, momentum)
        torch._foreach_add_(new_buf, torch._foreach_mul(g, coef))
        if nesterov:
            torch._foreach_add_(g, new_buf, alpha=momentum)
            d = g
        else:
            d = new_buf
        if ok is None:
            torch._foreach_copy_(bufs, new_buf)
        else:
            select_(bufs, new_buf, ok)
    else:
        d = g
    torch._foreach_add_(list(steps), repeat(ok, len(steps)) if ok is not None else 1.0)
    if isinstance(lr, torch.Tensor):
        new_w = torch._foreach_mul(d, -lr)
        torch._foreach_add_(new_w, w)
    else:
        new_w = torch._foreach_add(w, d, alpha=-lr)
    if ok is None:
        torch._foreach_copy_(params, new_w)
    else:
        if backups is not None:
            torch._foreach_copy_(params, w)
        select_(params, new_w, ok)


def _sgd_in_place(
    params, grads, bufs, steps, w, lr, momentum, dampening, weight_decay, maximize, ok
) -> None:  # fmt: skip
    """The step above with momentum, from backups, without temporary lists (CPU tensors).

    The same operations on the same values, in the memory the step owns: the perturbed
    parameters (rewritten at the end either way) hold the gradient, the buffers are updated in
    place, block by block (:func:`cpu_blocks`: each block's passes run while it is in the
    cache). The flag is applied through the coefficients instead of a final select: when
    ``ok == 0`` the gradient is 0 and the momentum 1 (``buf * 1 + 0 = buf``) and the step
    ``-lr * ok`` is 0 (``p = w + buf * 0 = w``); when ``ok == 1`` every value is the one above
    (``addcmul_(w, buf, -lr)`` is ATen's fused ``w + buf * -lr``, as ``add_(buf, alpha=-lr)``).
    """
    comb = isinstance(grads, LinComb)
    src = materialize(grads) if comb else list(grads)  # a LinComb: a new list, used in place
    coef = None
    if dampening != 0.0:  # else the coefficient is 1 on every step (g * 1 == g)
        first = torch._foreach_mul(steps, -1.0)
        torch._foreach_add_(first, 1.0)
        torch._foreach_clamp_min_(first, 0.0)
        coef = torch._foreach_mul(first, dampening)
        torch._foreach_add_(coef, 1.0 - dampening)
    on = ok != 0
    m_ok = pick_scalar(on, momentum, 1.0)
    step = pick_scalar(on, -lr, 0.0)
    masks: dict = {}
    for idx, (p, s, b, wb) in cpu_blocks([params, src, bufs, w]):
        if comb:
            g = s
        else:
            g = p  # the perturbed weights: overwritten below either way
            torch._foreach_copy_(g, s)
        if maximize:
            torch._foreach_neg_(g)
        if weight_decay != 0.0:
            torch._foreach_add_(g, wb, alpha=weight_decay)
        if coef is not None:
            torch._foreach_mul_(g, [coef[i] for i in idx])
        sanitize_(g, ok, masks)  # the buffer update reads g: no NaN * 0 when skipped
        torch._foreach_mul_(b, m_ok)
        torch._foreach_add_(b, g)
        torch._foreach_copy_(p, wb)
        torch._foreach_addcmul_(p, b, repeat(step, len(p)))
    torch._foreach_add_(steps, repeat(ok, len(steps)))
