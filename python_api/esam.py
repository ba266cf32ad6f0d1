"""ESAM (Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for
Improved Training of Neural Networks", ICLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api._base import SAMFamily, check_nonneg, check_range
from python_api.sssam import ESAM_STREAM, check_seed
from sam_kernels import counter_uniform, uniform_threshold

LossesClosure = Callable[[], torch.Tensor]


def selected_count(gamma: float, batch: int) -> int:
    """``ceil(gamma * B)`` computed exactly (``0.3 * 10`` is 3, not 4), at least 1."""
    return min(batch, max(1, math.ceil(Fraction(gamma) * batch)))


class ESAM(SAMFamily):
    r"""ESAM: SAM with stochastic weight perturbation and sharpness-sensitive data selection.

    .. code-block:: text

        l(w)    = closure()                      per-example losses (reduction='none')
        g0      = grad mean_i l_i(w)
        e(p)    = m_p / beta * rho / (||g0|| + 1e-12) * g0(p),   m_p ~ Bernoulli(beta) per tensor
        l(w+e)  = closure()
        S       = the ceil(gamma * B) examples with the largest l_i(w + e) - l_i(w)
                  (ties to the lower index; a static-shape sort on the device)
        g       = grad mean_{i in S} l_i(w + e)
        restore w exactly;  base.step() with g

    Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for Improved
    Training of Neural Networks", ICLR 2022. This follows the paper where the public code
    differs: exactly ``ceil(gamma * B)`` examples are kept (the code's strict comparison keeps
    one fewer), the coins come from the optimizer's own seeded generator (kept in
    ``state_dict``), and frozen parameters (``requires_grad=False``) stay frozen (the code sets
    ``requires_grad=True`` on every parameter).

    Closure contract: ``closure()`` runs a forward pass only and returns the per-example losses
    (``reduction='none'``, shape ``[B]`` or any shape holding one loss per element, with their
    graph). The optimizer runs every backward itself (``loss.backward()``, scaled under a
    GradScaler) and ignores gradients already present (it clears its parameters' gradients
    first). ``step`` returns the mean loss at ``w``.

    Random stream. The coin ``m_p`` of the ``j``-th parameter of the optimizer (counting every
    parameter of every group, in order) at applied step ``t`` is
    ``counter_uniform(seed, t, j) < beta`` (:func:`sam_kernels.ops.counter_rng.counter_uniform`,
    stream 2): a pure function of the seed and the device step count, so there is no host read,
    a skipped step does not advance the stream, and ``state_dict`` holds it (seed and ``t``).
    A tensor that is not chosen is still passed through the perturb op with scale 0, so the
    step needs no host read at all (with SGD or AdamW as the base).

    Data selection is among each rank's own examples (DDP averages the selected gradients).

    Args:
        params: parameters or parameter groups (per-group ``rho``; ``rho=0`` groups are in the
            norm but not perturbed).
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius (>= 0).
        beta: probability that a tensor is perturbed, in (0, 1] (1: every tensor, as SAM).
        gamma: fraction of the batch used for the second gradient, in (0, 1].
        seed: seed of the coin stream (``None``: drawn from torch's global generator).
        model, on_nonfinite, backend: as :class:`python_api.SAM`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: int | None = None,
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        check_range("beta", beta, 0.0, 1.0, lo_open=True, hi_open=False)
        check_range("gamma", gamma, 0.0, 1.0, lo_open=True, hi_open=False)
        seed = check_seed(seed)
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho),
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.seed = seed
        # applied steps (the counter of the coin stream)
        self._t = torch.zeros((), dtype=torch.int64, device=self._device)
        self._index_cache: tuple[tuple, torch.Tensor] | None = None

    # ----------------------------------------------------------------- helpers
    def _eval_losses(self, closure: LossesClosure, what: str) -> torch.Tensor:
        """Run the forward-only closure; per-example losses (flattened, with their graph)."""
        with torch.enable_grad(), self._eval_context(what):
            losses = closure()
        if not isinstance(losses, torch.Tensor):
            raise TypeError(
                f"ESAM's closure must return a tensor of per-example losses at {what}, got "
                f"{type(losses).__name__}"
            )
        if losses.dim() == 0 or losses.numel() == 0:
            raise ValueError(
                f"ESAM's closure returned a loss of shape {tuple(losses.shape)} at {what}; "
                "it must return the per-example losses (reduction='none'), one per example"
            )
        if not losses.requires_grad:
            raise TypeError(
                f"ESAM's closure returned losses without a graph at {what}; compute them "
                "with grad enabled and do not detach them (the optimizer runs the backward)"
            )
        return losses.reshape(-1)

    def _coins(self, flat: list[torch.Tensor]) -> torch.Tensor:
        """0/1 per tensor of ``flat``: chosen for perturbation with probability beta."""
        # keyed on every parameter's place too: a coin is the j-th parameter's (of all groups,
        # in order), which moves when a group's list changes in place (a parameter removed)
        order = tuple(id(p) for g in self.param_groups for p in g["params"])
        key = (tuple(id(p) for p in flat), order)
        if self._index_cache is None or self._index_cache[0] != key:
            pos = {i: j for j, i in enumerate(order)}
            idx = torch.tensor([pos[id(p)] for p in flat], dtype=torch.int64, device=self._device)
            self._index_cache = (key, idx)
        u = counter_uniform(
            self.seed, self._t, self._index_cache[1], stream=ESAM_STREAM, backend=self.backend
        )
        return u < uniform_threshold(self.beta)

    def _perturb_swp(self, norm: torch.Tensor) -> list[torch.Tensor]:
        """``p += m_p / beta * rho / (norm + 1e-12) * g0`` with exact backups (no host read)."""
        groups = self._perturbed_groups()
        if not groups:
            return []
        flat = [p for _, ps in groups for p in ps]
        rho = self._rho_vector(groups)
        coins = self._coins(flat).to(rho.dtype)
        (scale,) = sk.ascent_scale(norm, rho, backend=self.backend)  # rho/(norm + 1e-12), fused
        scale = scale * coins / self.beta
        sk.perturb_(flat, [p.grad for p in flat], self._backups(flat), scale, backend=self.backend)
        self._live.extend(flat)
        return flat

    # ----------------------------------------------------------------- the step
    def step(self, closure: LossesClosure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One ESAM step; ``closure()`` returns per-example losses (forward only).

        Returns the mean loss at ``w`` (detached).
        """
        if closure is None:
            raise TypeError(
                "ESAM.step requires a closure that runs a forward pass and returns the "
                "per-example losses (reduction='none')"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._follow_device()
        self._drop_grads()
        l0 = self._eval_losses(closure, "w")
        mean0 = l0.mean()
        self._backward(mean0)
        with torch.no_grad():
            ps = self._params_with_grad()
            l0 = l0.detach()
            mean0 = mean0.detach()
            norm = self._grad_norm()
            ok = (torch.isfinite(norm) & torch.isfinite(l0).all()).to(torch.float32)
            self._check_raise(ok, "w (the first evaluation)")
            perturbed = self._perturb_swp(norm)
            self._drop_grads()
        # BN buffers are put back after the backward of the perturbed pass (batch norm saves
        # its running statistics for the backward: restoring them earlier breaks autograd)
        if self._bn is not None:
            self._bn.save()
        try:
            l1 = self._eval_losses(closure, "w + e")
            if l1.shape != l0.shape:
                raise ValueError(
                    f"ESAM's closure returned {l0.numel()} losses at w and {l1.numel()} at "
                    "w + e; it must evaluate the same batch"
                )
            with torch.no_grad():
                k = selected_count(self.gamma, l0.numel())
                # the k largest differences; a stable sort breaks ties (e.g. no tensor chosen
                # by the coins: every difference is 0) towards the lower example index, so
                # the choice is defined (torch.topk leaves it to the implementation)
                order = torch.sort(l1.detach() - l0, descending=True, stable=True).indices
                idx = order[:k]
            self._backward(l1.index_select(0, idx).mean())
        except BaseException:
            self._restore(perturbed)
            raise
        finally:
            if self._bn is not None:
                self._bn.restore()
        with torch.no_grad():
            _, gs = self._grads_at_perturbed(ps)  # one without a gradient there: not stepped
            ok = ok * torch.isfinite(l1.detach()).all().to(torch.float32)
            fin, n1 = self._finite_and_norm(gs)  # the norm: reused by clipping
            ok = ok * fin
            self._check_raise(ok, "w + e (the perturbed evaluation)", perturbed)
            ok = self._base_step(ok, perturbed, norm=n1)  # as gated (GradScaler, DDP helper's vote)
            self._t.add_(ok.to(torch.int64))
        return mean0

    # ----------------------------------------------------------------- state
    _config_extra_state = ("seed",)
    _sharded_refusal = (
        "it runs its backward passes inside the step (the sharded helper moves the gradients "
        "after the closure) and selects examples per rank"
    )

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra["t"] = self._t.clone()
        extra["seed"] = self.seed
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._t.copy_(extra["t"].to(self._t.device))
        self.seed = int(extra["seed"])
