"""LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware
Minimization", CVPR 2022)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from python_api._base import check_nonneg
from python_api._switching import SwitchingSAM
from sam_kernels import LinComb, looksam_project_, looksam_reuse

#: per-parameter state key of LookSAM's stored component
GV_KEY = "gv"


def check_alpha(alpha: float) -> None:
    check_nonneg("alpha", alpha)


class LookSAM(SwitchingSAM):
    r"""LookSAM: a SAM step every ``k`` steps, the stored SAM direction reused in between.

    .. code-block:: text

        SAM step (t = 0, k, 2k, ...; t counts applied steps from 0):
            e    = rho / (||g0|| + 1e-12) * g0              (global norm, per-group rho)
            gs   = grad L(w + e)
            gv_i = gs_i - ||gs_i|| cos(theta_i) * g0_i / ||g0_i||
                 = gs_i - (<g0_i, gs_i> / ||g0_i||^2) * g0_i        (per tensor; stored)
            p.grad = gs;  base.step() at w
        reuse step (every other step; one forward/backward only):
            p.grad = g0 + alpha * (||g0_i|| / (||gv_i|| + 1e-8)) * gv_i   (per-tensor norms)
            base.step()

    Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware Minimization",
    CVPR 2022 (k = 5 in the paper, 10 in kozistr/pytorch_optimizer; alpha = 0.7).
    The reuse steps run no second evaluation (kozistr/pytorch_optimizer's version calls the
    closure on every step, which throws away the saving). A tensor that has no stored ``gv``
    yet (it had no gradient on the last SAM step) takes ``g0`` alone on a reuse step.

    Host reads: one per step, the decision ``t mod k == 0`` (``t`` lives on the device, since
    a skipped step must not advance it), folded with the finite check of ``g0``; see
    :mod:`python_api._switching`.

    Args:
        params: parameters or parameter groups (per-group ``rho``; ``rho=0`` groups are in the
            norm but not perturbed).
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius (>= 0).
        k: SAM step every ``k`` applied steps (>= 1; ``k=1`` is SAM).
        alpha: weight of the reused component (>= 0).
        model, on_nonfinite, backend: as :class:`python_api.SAM`.
    """

    _sharded_refusal = (
        "its projection uses per-tensor inner products of g0 and gs, of which a shard holds "
        "only a part"
    )
    #: the stored component is saved in ``state_dict`` beside the base's state
    _param_state_keys = (GV_KEY,)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.1,
        k: int = 5,
        alpha: float = 0.7,
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        check_alpha(alpha)
        self._init_switching(
            params,
            base_optimizer,
            rho,
            model,
            on_nonfinite,
            backend,
            base_kwargs,
            alpha,
            max_grad_norm,
        )
        self.k = k

    def _init_switching(
        self,
        params,
        base_optimizer,
        rho,
        model,
        on_nonfinite,
        backend,
        base_kwargs,
        alpha,
        max_grad_norm=None,
    ) -> None:
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
        self.alpha = float(alpha)

    @property
    def reuse_steps(self) -> int:
        """Applied reuse steps (host read)."""
        return self.cheap_steps

    # ----------------------------------------------------------------- hooks
    def _decide(self, params: list[torch.Tensor]) -> torch.Tensor:
        return self._decide_on_norm(lambda: torch.remainder(self._t, self.k) == 0)

    def _gv(self, params: list[torch.Tensor], create: bool) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for p in params:
            st = self.state[p]
            gv = st.get(GV_KEY)
            if gv is not None and (gv.shape != p.shape or gv.device != p.device):
                gv = None
            if gv is None and create:
                gv = torch.zeros_like(p, memory_format=torch.preserve_format)
                st[GV_KEY] = gv
            out.append(gv)
        return out

    def _init_param_state(self, params: list[torch.Tensor]) -> None:
        # a zero gv reuses as g0 alone, exactly as no stored gv does
        self._gv(params, create=True)

    def _after_sam_eval(self, params, g0, gs, ok) -> None:
        if params:
            gv = self._gv(params, create=True)
            looksam_project_(gv, g0, gs, ok, backend=self.backend)

    def _cheap_grad(self, params: list[torch.Tensor]):
        stored = self._gv(params, create=False)
        if all(v is None for v in stored):
            return None  # no gv stored (no SAM step yet): exactly ERM
        g0 = [p.grad for p in params]
        # a tensor without a stored gv uses a zero component (coefficient 0: g0 alone)
        gv = [v if v is not None else torch.zeros_like(g) for v, g in zip(stored, g0)]
        comb = looksam_reuse(g0, gv, self.alpha, backend=self.backend)
        pos = {id(p): i for i, p in enumerate(params)}

        def grad_of(ps: list[torch.Tensor]):
            i = pos[id(ps[0])]
            j = i + len(ps)
            return LinComb(tuple(list(term[i:j]) for term in comb.terms), comb.coefs[:, i:j])

        return grad_of
