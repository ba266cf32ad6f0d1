"""The skeleton every estimator runs in.

Each estimator is: validate its own arguments, then

1. :func:`measuring`: validate ``seed``, build the :class:`Objective` over the model and data,
   and leave the model exactly as it was found (train/eval flags, buffers) however the
   measurement ends;
2. a loop with a progress bar (:func:`progress_bar`): over batches, probes, iterations or
   examples; for the two Monte-Carlo estimators of Hessian-vector products this loop is
   :func:`probe_samples`;
3. assemble its result dataclass from the samples (mean, standard error, counts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from python_api.metrics._data import Data, DeviceLike, LossFn
from python_api.metrics._objective import Objective
from python_api.metrics._progress import progress_bar
from python_api.metrics._rng import local_generator

Probe = Callable[[Sequence[Tensor], torch.Generator], list[Tensor]]
Sample = Callable[[Sequence[Tensor], Sequence[Tensor]], float]


@contextlib.contextmanager
def preserved(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Save the model's train/eval flags and buffers, optionally switch to eval, restore after.

    The flags must come back because ``eval_mode`` switches them here. The objective writes no
    buffer (it runs on clones); restoring them anyway makes "the model is left as it was" a
    guarantee of this function rather than of :func:`torch.func.functional_call`.
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if eval_mode:
            for m, _ in flags:
                m.training = False
        with torch.enable_grad():  # the metrics differentiate even when called under no_grad
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


@contextlib.contextmanager
def measuring(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    seed: int,
    device: DeviceLike,
    eval_mode: bool,
) -> Iterator[Objective]:
    """Step 1 of the skeleton: the objective, with the model preserved around its use."""
    local_generator(seed)  # a bad seed is an error even for estimators that draw no probes
    obj = Objective(model, loss_fn, data, device, seed)
    with preserved(model, eval_mode):
        yield obj


def probe_samples(
    obj: Objective,
    n_probes: int,
    seed: int,
    probe: Probe,
    sample: Sample,
    progress: bool | None,
    desc: str,
) -> list[float]:
    """``sample(v, H v)`` for ``n_probes`` probes ``v = probe(w, gen)`` drawn in turn from one
    generator seeded from ``seed`` (so equal seeds give equal probes in every estimator)."""
    gen = local_generator(seed)
    samples: list[float] = []
    with progress_bar(progress, n_probes, desc) as tick:
        for _ in range(n_probes):
            v = probe(obj.w, gen)
            samples.append(sample(v, obj.hvp(v)))
            tick()
    return samples
