"""The objective every metric measures: the full-data loss, its gradient and its Hessian-vector
products, as functions of the model's trainable weights.

``L(w) = sum_b n_b L_b(w) / N`` over the batches ``b`` of ``n_b`` examples. The model is called
through :func:`torch.func.functional_call` with detached copies of its parameters and clones of
its buffers, and gradients come from :func:`torch.autograd.grad`, so nothing of the model is
written (BatchNorm in train mode updates the clones). ``H v`` is computed by double backward,
``d/dw <dL/dw, v>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from python_api.metrics._data import (
    Data,
    DeviceLike,
    LossFn,
    batch_size,
    is_single_batch,
    map_tensors,
)
from python_api.metrics._progress import progress_bar
from python_api.metrics._rng import rng_sandbox


def _tensor_vars(values: Sequence[Tensor]) -> list[Tensor]:
    """Fresh autograd leaves holding ``values`` (each call differentiates its own graph)."""
    return [v.detach().requires_grad_(True) for v in values]


class Objective:
    """The full-data loss ``L(w) = sum_b n_b L_b(w) / N`` as a function of the trainable weights.

    ``w`` holds the trainable weights on ``device``; ``n_examples`` is ``N`` once a pass over the
    data has completed.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        device: DeviceLike,
        seed: int,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(outputs, targets)")
        named = list(model.named_parameters())
        trainable = [(n, p) for n, p in named if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        self.device = torch.device(device) if device is not None else trainable[0][1].device
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.seed = seed
        self.single = is_single_batch(data)
        self.names = [n for n, _ in trainable]
        self.w = [p.detach().to(self.device) for _, p in trainable]
        self.frozen = {n: p.detach().to(self.device) for n, p in named if not p.requires_grad}
        self.buffers = {n: b.detach().to(self.device, copy=True) for n, b in model.named_buffers()}
        self._graph: tuple[list[Tensor], list[Tensor | None], int] | None = None
        self.n_examples: int | None = None

    # -- data --------------------------------------------------------------------------------
    def _prepare(self, batch: Any) -> tuple[Any, Any, int]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                "data must be an (inputs, targets) pair or an iterable of such pairs; "
                f"got a batch of type {type(batch).__name__}"
            )
        inputs, targets = batch
        n = batch_size(inputs, targets)
        move = lambda t: t.to(self.device)
        return map_tensors(inputs, move), map_tensors(targets, move), n

    def _iterate(self) -> Iterator[tuple[Any, Any, int]]:
        total = 0
        source: Iterable[Any] = [self.data] if self.single else self.data
        for batch in source:
            inputs, targets, n = self._prepare(batch)
            if n == 0:
                continue
            total += n
            yield inputs, targets, n
        if total == 0:
            raise ValueError("data is empty: it yielded no examples")
        self.n_examples = total

    @contextlib.contextmanager
    def batches(self) -> Iterator[Iterator[tuple[Any, Any, int]]]:
        """One pass over the data, with the global generators reseeded (same pass every time).

        A context manager, so that the global random state is restored even when the pass is
        left early or by an exception.
        """
        with rng_sandbox(self.seed, self.device):
            it = self._iterate()
            try:
                yield it
            finally:
                it.close()

    # -- evaluation --------------------------------------------------------------------------
    def loss(self, w: Sequence[Tensor], inputs: Any, targets: Any) -> Tensor:
        params = dict(zip(self.names, w, strict=True))
        params.update(self.frozen)
        out = functional_call(self.model, (params, self.buffers), (inputs,))
        loss = self.loss_fn(out, targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                "loss_fn must return a scalar (0-dim) tensor, e.g. with reduction='mean'; "
                f"got {shape}"
            )
        if not loss.is_floating_point():
            raise ValueError(f"loss_fn must return a floating-point tensor, got {loss.dtype}")
        return loss

    def _grad(self, loss: Tensor, leaves: Sequence[Tensor], create_graph: bool) -> list[Any]:
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn's result does not depend on the model's trainable parameters "
                "(was it detached or computed under torch.no_grad?)"
            )
        return list(torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True))

    def loss_and_grad_at(
        self, w: Sequence[Tensor], inputs: Any, targets: Any
    ) -> tuple[float, list[Tensor]]:
        """Loss and gradient of one batch at weights ``w`` (zeros for unused parameters)."""
        leaves = _tensor_vars(w)
        loss = self.loss(leaves, inputs, targets)
        grads = self._grad(loss, leaves, create_graph=False)
        return loss.item(), [
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)
        ]

    def loss_and_grad(self, progress: bool | None = False) -> tuple[float, list[Tensor], int]:
        """Full-data loss, its gradient and the number of examples (one pass)."""
        acc = [torch.zeros_like(x) for x in self.w]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        with progress_bar(progress, None, "gradient") as tick, self.batches() as batches:
            for inputs, targets, n in batches:
                leaves = _tensor_vars(self.w)
                loss = self.loss(leaves, inputs, targets)
                for a, g in zip(acc, self._grad(loss, leaves, create_graph=False), strict=True):
                    if g is not None:
                        a.add_(g, alpha=n)
                total += loss.detach().double() * n
                count += n
                tick()
        return total.item() / count, [a.div_(count) for a in acc], count

    @staticmethod
    def _hv(
        grads: Sequence[Tensor | None], leaves: Sequence[Tensor], v: Sequence[Tensor], retain: bool
    ) -> list[Tensor]:
        terms = [
            torch.sum(g * vi)
            for g, vi in zip(grads, v, strict=True)
            if g is not None and g.requires_grad
        ]
        if not terms:  # the gradient does not depend on w: H = 0
            return [torch.zeros_like(x) for x in leaves]
        dot = torch.stack(terms).sum()
        hv = torch.autograd.grad(dot, leaves, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(x) if h is None else h for h, x in zip(hv, leaves, strict=True)]

    def hvp(self, v: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` of the full-data loss, by double backward, batch by batch."""
        if self.single:  # one batch: build the gradient graph once and reuse it for every probe
            if self._graph is None:
                with self.batches() as batches:
                    for inputs, targets, n in batches:
                        leaves = _tensor_vars(self.w)
                        loss = self.loss(leaves, inputs, targets)
                        self._graph = (leaves, self._grad(loss, leaves, create_graph=True), n)
            assert self._graph is not None
            leaves, grads, _ = self._graph
            return self._hv(grads, leaves, v, retain=True)
        acc = [torch.zeros_like(x) for x in self.w]
        count = 0
        with self.batches() as batches:
            for inputs, targets, n in batches:
                leaves = _tensor_vars(self.w)
                loss = self.loss(leaves, inputs, targets)
                grads = self._grad(loss, leaves, create_graph=True)
                for a, h in zip(acc, self._hv(grads, leaves, v, retain=False), strict=True):
                    a.add_(h, alpha=n)
                count += n
        return [a.div_(count) for a in acc]
