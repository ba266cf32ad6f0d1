"""torch's optimizer conventions for the SAM family: step hooks in the two-call form, ``repr``.

``opt.step(closure)`` goes through torch's own wrapper (``Optimizer.profile_hook_step``, put on
every optimizer class by ``Optimizer.__init__``): the step pre-hooks, the step, the post-hooks.
davda54/sam's two-call form is one step too, so :func:`step_started` (called by
``first_step``) runs the pre-hooks and :func:`step_finished` (called by ``second_step``, where
the step is complete) runs the post-hooks and marks the step as taken for LR schedulers
(``optimizer._opt_called``, which ``lr_scheduler.step()`` reads to warn about the wrong order).
In that form the hooks see ``args == (opt,)`` and ``kwargs == {}``, as for ``opt.step()``.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer


def owner(opt: Any) -> Any:
    """The optimizer itself behind a proxy that subclasses its class.

    Lightning's ``LightningOptimizer`` (what ``self.optimizers()`` returns) takes the wrapped
    optimizer's class as a base and forwards attribute reads to it, but an attribute written
    through it would land on the proxy: the two-call form would keep its state, and the
    scheduler's step mark, where neither the optimizer nor its scheduler looks.
    """
    inner = vars(opt).get("_optimizer")
    if isinstance(inner, Optimizer) and isinstance(opt, type(inner)):
        return inner
    return opt


def _global(name: str) -> dict:
    return getattr(_torch_optimizer, name, {})


def step_started(opt: Optimizer) -> None:
    """The step pre-hooks (global ones first, as torch runs them), for ``first_step``."""
    args: tuple = (opt,)
    kwargs: dict = {}
    for hook in chain(
        _global("_global_optimizer_pre_hooks").values(), opt._optimizer_step_pre_hooks.values()
    ):
        result = hook(opt, args, kwargs)
        if result is None:
            continue
        same = (
            isinstance(result, tuple)
            and len(result) == 2
            and tuple(result[0]) == args
            and dict(result[1]) == kwargs
        )
        if not same:
            raise RuntimeError(
                f"a step pre-hook of {type(opt).__name__} returned new arguments for step(), "
                f"but first_step() takes none (the two-call form has no closure); got {result!r}. "
                "Use opt.step(closure) with this hook"
            )


def step_finished(opt: Optimizer) -> None:
    """The end of a two-call step (``second_step``): scheduler mark, then the post-hooks."""
    # read by lr_scheduler.step(); the base's too (a scheduler built on it, SAM(None, base))
    opt._opt_called = True  # type: ignore[attr-defined]
    opt.base_optimizer._opt_called = True
    opt._optimizer_step_code()  # torch's profiler marker (a no-op)
    args: tuple = (opt,)
    kwargs: dict = {}
    for hook in chain(
        opt._optimizer_step_post_hooks.values(), _global("_global_optimizer_post_hooks").values()
    ):
        hook(opt, args, kwargs)


def optimizer_repr(opt: Any) -> str:
    """torch's ``Optimizer.__repr__`` (class name, every group's hyper-parameters) with the
    base optimizer's class on the line after the opening one."""
    text = Optimizer.__repr__(opt)
    head = type(opt).__name__ + " ("
    base = type(opt.base_optimizer)
    name = base.__qualname__
    if not base.__module__.startswith("torch.optim"):
        name = f"{base.__module__}.{name}"
    return f"{head}\nbase_optimizer: {name}{text[len(head) :]}"
