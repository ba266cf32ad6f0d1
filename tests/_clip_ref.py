"""Gradient clipping by hand, as ``torch.nn.utils.clip_grad_norm_`` defines it, for the tests
that check ``max_grad_norm=``: on copies of gradient lists, on a float64 reference's gradients,
a base optimizer that records the gradients its step is given, and an unclipped twin of an
optimizer over it."""

from __future__ import annotations

import copy

import torch


def clip_by_hand(grads: list[torch.Tensor], max_norm: float):
    """``torch.nn.utils.clip_grad_norm_`` applied to ``grads`` (copies); and the total norm."""
    holders = []
    for g in grads:
        t = torch.zeros_like(g)
        t.grad = g.clone()
        holders.append(t)
    total = torch.nn.utils.clip_grad_norm_(holders, max_norm)
    return [t.grad for t in holders], float(total)


def clip_grads(grads: dict, params, max_norm: float | None) -> dict:
    """``clip_grad_norm_``'s rule written out on ``{param: grad}`` over ``params`` (a float64
    reference's gradients): ``min(1, max_norm / (norm + 1e-6))``; as given if ``max_norm`` is
    None."""
    if max_norm is None:
        return grads
    total = torch.sqrt(sum((grads[p] ** 2).sum() for p in params))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    return {p: grads[p] * coef for p in params}


def recording(cls: type) -> type:
    """``cls`` (a torch optimizer) as a generic base, not the exact SGD/AdamW type the wrappers
    fuse: its step records ``p.grad`` of every parameter with one in ``seen``."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.seen: list[list[torch.Tensor]] = []

        @torch.no_grad()
        def step(self, closure=None):
            ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.seen.append([p.grad.clone() for p in ps])
            return super().step(closure)

    Recording.__name__ = f"Recording{cls.__name__}"
    return Recording


def unclipped_twin(model, opt):
    """A deep copy of ``model`` and ``opt`` (which clips, over a :func:`recording` base) that does
    not clip; both bases' records emptied. Step both alike: compare what their bases were given."""
    twin_model, twin = copy.deepcopy((model, opt))
    twin.max_grad_norm = None
    opt.base_optimizer.seen = []
    twin.base_optimizer.seen = []  # torch's optimizers deep-copy only their state
    return twin_model, twin
