"""SS-SAM (Zhao, Zhang, Hu, "SS-SAM: Stochastic Scheduled Sharpness-Aware Minimization for
Efficiently Training Deep Neural Networks", 2022)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from python_api._base import check_nonneg, check_range
from python_api._switching import SwitchingSAM
from sam_kernels import counter_uniform, uniform_threshold

#: stream ids of :func:`sam_kernels.ops.counter_rng.counter_uniform` per algorithm
SSSAM_STREAM = 1
ESAM_STREAM = 2


def check_seed(seed: int | None) -> int:
    """A seed as an integer in [0, 2**63); ``None`` draws one from torch's global generator."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
    return seed


class SSSAM(SwitchingSAM):
    r"""SS-SAM: each step is a SAM step with probability ``p``, else an ERM step.

    .. code-block:: text

        u_t = U(seed, t)   (uniform in [0, 1); t = applied steps from 0)
        u_t < p:  SAM step (e = rho g0 / (||g0|| + 1e-12), gs at w + e, base step at w with gs)
        else:     ERM step (p.grad = g0; one forward/backward only)

    Zhao, Zhang, Hu, "SS-SAM: Stochastic Scheduled Sharpness-Aware Minimization for Efficiently
    Training Deep Neural Networks", 2022 (arXiv:2203.09962), with a constant probability.

    Random stream. ``U(seed, t)`` is a counter-based generator
    (:func:`sam_kernels.ops.counter_rng.counter_uniform`): a pure function of the optimizer's
    ``seed`` and its count of applied steps ``t`` (a device tensor). A step skipped for a
    non-finite value does not advance ``t``, so the coins that follow are those of a run that
    never saw it; ``state_dict`` carries ``seed`` and ``t``, so a resumed run draws the same
    coins. Distributed training: every rank must take the same decision (ranks that disagree on
    whether a second pass runs deadlock in its all-reduce). Give the same ``seed`` on every
    rank, or seed torch's global generator identically on every rank before constructing the
    optimizer (``seed=None`` draws the seed from it, once, at construction).

    Host reads: one per step, the decision, folded with the finite check of ``g0`` (see
    :mod:`python_api._switching`).

    Args:
        params: parameters or parameter groups (per-group ``rho``).
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius of the SAM steps (>= 0).
        p: probability of a SAM step, in [0, 1].
        seed: seed of the coin stream (``None``: drawn from torch's global generator).
        model, on_nonfinite, backend: as :class:`python_api.SAM`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        p: float = 0.5,
        seed: int | None = None,
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        check_range("p", p, 0.0, 1.0, lo_open=False, hi_open=False)
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
        self.p = float(p)
        self.seed = seed

    @property
    def erm_steps(self) -> int:
        """Applied ERM steps (host read)."""
        return self.cheap_steps

    #: the coin is the same on every rank (counter-based), the norm all-reduced over the shards
    sharded_safe = True

    def _decide(self, params: list[torch.Tensor]) -> torch.Tensor:
        return self._decide_on_norm(self._coin)

    def _coin(self) -> torch.Tensor:
        """1 (int32, on the device) for a SAM step: ``U(seed, t) < p``."""
        u = counter_uniform(self.seed, self._t, 1, stream=SSSAM_STREAM, backend=self.backend)
        return (u[0] < uniform_threshold(self.p)).to(torch.int32)

    _config_extra_state = ("seed",)

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra["seed"] = self.seed
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.seed = int(extra["seed"])
