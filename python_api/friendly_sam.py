"""FriendlySAM (Li, Zhou, Huang, Yang, Huang, Yan, Yang, "Friendly Sharpness-Aware
Minimization", CVPR 2024).

Reference code: nblt/F-SAM ``utils.py::FriendlySAM`` (the class the paper's results come from).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import sam_kernels as sk
from python_api._base import (
    Closure,
    SAMFamily,
    _dense_grads,
    check_nonneg,
    check_range,
)
from python_api._checks import check_sigma

#: per-parameter state key of the gradient's moving average (saved in ``state_dict``)
M_KEY = "m"
#: key of the per-parameter "m holds a value" flags in the algorithm's scalars
INIT_KEY = "m_initialized"


def _check_lmbda(value: Any) -> None:
    check_range("lmbda", value, 0.0, 1.0, False, True)


class FriendlySAM(SAMFamily):
    r"""FriendlySAM: SAM whose ascent drops the full-batch component of the gradient.

    .. code-block:: text

        T(p) = |p| if adaptive else 1
        first step of a parameter:  m = g0 (copy);  d = g0
        later steps:                d = g0 - sigma * m;  m = lmbda * m + (1 - lmbda) * g0
                                    (m updated after d is formed)
        e(p) = rho / (||T d|| + 1e-12) * T(p)^2 * d(p)      (global norm over every parameter
                                                             with a gradient, all groups)
        g1   = grad L(w + e)
        base.step() at w (restored bit for bit) with g1

    Li, Zhou, Huang, Yang, Huang, Yan, Yang, "Friendly Sharpness-Aware Minimization", CVPR 2024.
    The equations are the reference code's (nblt/F-SAM ``utils.py::FriendlySAM``), including its
    first step: a parameter's moving average ``m`` starts as a copy of its first gradient, and
    that step perturbs along ``g0`` itself (plain SAM). "First" is per parameter, as in the
    reference: a parameter that gets its first gradient at a later step starts its ``m`` then.
    The reference's defaults are kept (``sigma=1, lmbda=0.9, rho=0.05``; its CIFAR script uses
    ``rho=0.2, lmbda=0.6``). Differences, by the package's shared rules: ``w`` is restored from
    an exact copy (the reference assigns its saved ``p.data`` back, which is exact too, but
    keeps a copy of every parameter between steps), a non-finite step is skipped on the device
    and leaves ``m`` and the first-step flags unchanged (a skipped first step stays a first
    step), and ``sigma`` / ``lmbda`` are per-group values (the reference: one each).

    Two forward/backward passes per step. ``d`` is formed by one fused linear combination into
    step-local scratch (freed before the second pass), its norm and the ascent are the package's
    fused norm and perturbation; ``m`` is updated after the base step by one fused linear
    combination whose coefficients are device scalars (the first-step flags and the step's
    finite flag): no host read in a step over SGD or AdamW.

    Memory (bytes per fp32 parameter, besides the base optimizer's state and the gradients):
    ``m`` 4, persistent (saved in ``state_dict``), and the backup of ``w`` 4 (kept between
    steps like SAM's, not saved); inside a step ``d`` 4 until the second pass starts, and
    ``g0`` (the gradient tensor of the evaluation at ``w``, kept without a copy) until the end.

    Args:
        params: parameters or parameter groups. A group may set its own ``rho``, ``sigma``,
            ``lmbda`` and ``adaptive``; ``rho=0`` (or ``sam=False``) keeps a group unperturbed
            (its ``m`` is still updated and its ``d`` is in the norm, as in the reference).
        base_optimizer: an optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius (>= 0).
        sigma: weight of the moving average removed from the gradient (>= 0; 0 is SAM).
        lmbda: decay of the moving average ``m`` (in [0, 1)).
        adaptive: ASAM's scale-invariant neighbourhood (``T(p) = |p|``, as the reference).
        model: if given, the evaluation at ``w + e`` leaves BN running statistics as they were.
        on_nonfinite: ``"skip"`` (default; the step changes nothing, decided on the device) or
            ``"raise"`` (a host read per evaluation, then :class:`NonFiniteError`).
        backend: force ``"eager"``, ``"triton"`` or ``"cuda"`` for the fused ops.
        max_grad_norm: clip ``g1`` (the base step's gradient) by its global norm, as
            ``torch.nn.utils.clip_grad_norm_``, on the device (None: no clipping).
        **base_kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).

    ``step(closure, loss=None)``: gradients already present are ``g0`` (davda54/sam's loop);
    otherwise the closure is first run at ``w``. Returns ``L0`` when it evaluated it or was
    given it, else the loss at ``w + e``. After a step ``p.grad`` holds ``g1``.
    """

    _transient_state = ("backup",)
    #: the moving average is saved in ``state_dict`` beside the base's state
    _param_state_keys = (M_KEY,)
    #: ``d`` is elementwise, its norm goes through ``_grad_norm`` (all-reduced over shards)
    sharded_safe = True
    #: not per-replica: ``m`` averages the first pass's gradient, which stays local to each
    #: replica in that mode, so the replicas' ``m`` (and checkpoints) would drift apart
    per_replica_safe = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        *,
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        backend: str | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        check_sigma(sigma)
        _check_lmbda(lmbda)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive),
            model=model,
            on_nonfinite=on_nonfinite,
            backend=backend,
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        n = sum(len(g["params"]) for g in self.param_groups)
        # 1.0 where the parameter's m holds a value (its first step has been applied)
        self._m_init = torch.zeros(n, dtype=torch.float32, device=self._device)
        # the parameters whose flags _m_init holds, in its order (_sync_flags)
        self._m_params: tuple[torch.Tensor, ...] | None = self._order()
        self._index_cache: tuple[tuple, torch.Tensor] | None = None
        self._hyper_cache: tuple[tuple, torch.Tensor] | None = None

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_sigma(group.get("sigma", 1.0))
        _check_lmbda(group.get("lmbda", 0.9))
        if not isinstance(group.get("adaptive", False), bool):
            raise TypeError(f"adaptive must be a bool, got {group['adaptive']!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_m_params"):  # after __init__: flags for the new parameters now
            self._sync_flags()

    def _order(self) -> tuple[torch.Tensor, ...]:
        return tuple(p for g in self.param_groups for p in g["params"])

    def _sync_flags(self) -> None:
        """Keep each parameter's flag when the parameter order changes (a group added, here or
        through the base optimizer; a parameter removed from a group's list in place): the
        flags are by position, so they are moved with their parameters, new ones 0."""
        order = self._order()
        held = self._m_params
        if held is None:  # a copy (pickle, deepcopy): its flags are in its groups' order
            self._m_params = order
            return
        if len(held) == len(order) and all(map(operator.is_, held, order)):
            return
        old = {id(p): i for i, p in enumerate(held)}
        pairs = [(j, old[id(p)]) for j, p in enumerate(order) if id(p) in old]
        flags = self._m_init.new_zeros(len(order))
        if pairs:
            dst = torch.tensor([j for j, _ in pairs], dtype=torch.int64, device=flags.device)
            src = torch.tensor([i for _, i in pairs], dtype=torch.int64, device=flags.device)
            flags.index_copy_(0, dst, self._m_init.index_select(0, src))
        self._m_init, self._m_params, self._index_cache = flags, order, None

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        self._sync_flags()
        extra[INIT_KEY] = self._m_init.clone()
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._m_params = order = self._order()  # the dict's flags are in the groups' order
        if self._m_init.numel() != len(order):
            self._m_init = self._m_init.new_zeros(len(order))
        self._m_init.copy_(torch.as_tensor(extra[INIT_KEY]).to(self._m_init))

    def _init_param_state(self, params: list[torch.Tensor]) -> None:
        self._moving_averages(params)

    def _moving_averages(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``state[p]["m"]`` of ``params``, zero-initialised where missing (a zero ``m`` with
        its flag at 0 is exactly "no m yet": the coefficients then ignore it)."""
        return self._buffers(params, M_KEY, zeros=True)

    # ----------------------------------------------------------------- per-tensor scalars
    def _index(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Positions of ``params`` in the parameter order (an int64 device tensor, cached)."""
        self._sync_flags()
        order = tuple(id(p) for g in self.param_groups for p in g["params"])
        key = (order, tuple(map(id, params)))
        cache = self._index_cache
        if cache is None or cache[0] != key or cache[1].device != self._device:
            pos = {pid: i for i, pid in enumerate(order)}
            idx = torch.tensor([pos[id(p)] for p in params], dtype=torch.int64)
            cache = self._index_cache = (key, idx.to(self._device))
        return cache[1]

    def _hyper(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-tensor ``[sigma, lmbda]`` (shape [2, n], fp64 device tensor), cached by value."""
        of = {}
        for g in self.param_groups:
            for p in g["params"]:
                of[id(p)] = (float(g["sigma"]), float(g["lmbda"]))
        vals = tuple(of[id(p)] for p in params)
        key = (vals, tuple(map(id, params)))
        cache = self._hyper_cache
        if cache is None or cache[0] != key or cache[1].device != self._device:
            t = torch.tensor(vals, dtype=torch.float64).reshape(len(params), 2).t()
            cache = self._hyper_cache = (key, t.contiguous().to(self._device))
        return cache[1]

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Closure | None = None, loss: torch.Tensor | float | None = None
    ) -> torch.Tensor | None:
        """One FriendlySAM step: gradients at ``w`` and ``w + e``, one base step at ``w``."""
        closure = self._require_closure(closure)
        l0, ps = self._evaluate_w(closure, loss, need_loss=False)
        if not ps:  # nothing to perturb: the base step has been taken
            return l0

        # g0: the gradient tensors themselves, kept (not copied) until m is updated
        _dense_grads(self, ps)
        g0 = self._take_grads(ps)
        m = self._moving_averages(ps)
        idx = self._index(ps)
        first_done = self._m_init.index_select(0, idx).to(torch.float64)  # 0: first step
        sigma, lmbda = self._hyper(ps)
        f64 = any(p.dtype == torch.float64 for p in ps)
        cdtype = torch.float64 if f64 else torch.float32

        # d = g0 - sigma * m (later steps) or g0 (first step), into step-local scratch put in
        # p.grad, so the fused norm and ascent of the base class read it
        d = self._scratch(ps)
        coefs_d = torch.stack([torch.ones_like(sigma), -sigma * first_done]).to(cdtype)
        sk.lincomb_(d, (g0, m), coefs_d, backend=self.backend)
        for p, di in zip(ps, d):
            p.grad = di
        del d
        norm = self._grad_norm()
        ok = self._and_finite(None, norm, l0)
        self._check_raise(ok, "the evaluation at w (loss L0, gradient g0)")
        pert = self._perturb_along_grad(norm)

        # w + e: g1 in p.grad (the parameters of g0 that got one; the others are restored and
        # not stepped, as the reference's base.step() leaves them)
        at = "the evaluation at w + e (gradient g1)"
        l1, _, ok, n1 = self._evaluate_perturbed(
            closure, ps, pert, ok, "w + e", False, at, zeros=False
        )
        ok = self._base_step(ok, pert, norm=n1)  # clipping reuses ||g1||

        # m = lmbda m + (1 - lmbda) g0 (later) or g0 (first), only if the step was applied:
        # a skipped step gives coefficients (1, 0) on (m, g0) and g0 zeroed bit for bit (a
        # non-finite g0 times 0 would be NaN)
        okd = ok.to(torch.float64)
        keep = 1.0 - okd
        coefs_m = torch.stack(
            [okd * lmbda * first_done + keep, okd * (1.0 - lmbda * first_done)]
        ).to(cdtype)
        # g0 = g0 if ok else +0, bit for bit (NaN and inf too); one op for the list
        sk.zero_unless_(g0, ok, backend=self.backend)
        sk.lincomb_(m, (m, g0), coefs_m, backend=self.backend)
        self._m_init.index_copy_(0, idx, torch.maximum(first_done.to(torch.float32), ok))
        return l0 if l0 is not None else l1
