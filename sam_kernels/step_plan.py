"""The compiled extension's cached SAM step plan (``csrc/step_plan.h``), from Python.

A :class:`SamStepPlan` holds, once, everything of a SAM/ASAM step over a fused SGD or AdamW base
that does not change between steps: every parameter (and whether its gradient must be
present), the norm's and the ascent's lists, the backups, the per-tensor rho vector, the base
groups' state lists and the step/skip counters. A step is then two dispatched ops that take no
tensor list (the gradients are read from the parameters in C++):

.. code-block:: text

    ascent:   n = ||T(p) g0||;  ok = finite(n) [* finite(L0)];
              b = w;  p += rho / (n + 1e-12) * T(p)^2 * g0
    descent:  ok *= finite(||g1||) [* finite(L1)];  [g1 clipped by ||g1||];  per group: p = b,
              fused SGD/AdamW step gated by ok;  counters += (ok, 1 - ok);  the gradients
              marked (stale for the next step)

the same ops, in the same order, as the unplanned path of :class:`python_api.SAM` (so the same
bits), without its per-step Python (list building, validation, scalar glue). A distributed step
runs the descent as two ops, :meth:`SamStepPlan.descent_flag` (up to this rank's ``ok``) and
:meth:`SamStepPlan.descent_apply` (the rest, with the flag the caller all-reduced in between).
Each call first checks that every gradient is present exactly where the plan expects it and
that no parameter changed dtype, device or shape; if not it changes nothing and returns
``None`` / ``False``, and the caller drops the plan.

CR-SAM's step uses the same plan for three ops around its two perturbed evaluations
(:meth:`SamStepPlan.crsam_ascent`, :meth:`~SamStepPlan.crsam_middle`,
:meth:`~SamStepPlan.crsam_descent`; python_api/crsam.py has the sequence), the universal class's
(Frob-, Trace-, Det-SAM) for an ascent, one op per noisy sample and a descent
(:meth:`SamStepPlan.universal_ascent`, :meth:`~SamStepPlan.universal_sample`,
:meth:`~SamStepPlan.universal_descent`; python_api/_universal_plan.py).

Available where the extension is built (:func:`available`, :func:`crsam_available`,
:func:`universal_available`); import never fails without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sam_kernels._backend import available as _available

_NS = "sam_kernels_C"

# The plan's ops take the plan, a torch script object. Before running an op, torch asks each
# argument that is not a plain tensor for ``__torch_function__``; a script object answers by
# raising (and catching) a C++ exception, 3-7 us per op on a CPU core: 18 us of a 60 us SAM step
# on two tensors. With subclass torch functions disabled around the call torch does not ask.
# What that leaves out: a tensor subclass's ``__torch_function__`` for these ops (a loss of
# such a class is read below autograd as its data); torch-function modes still see the call
# and ``__torch_dispatch__`` is untouched.
_no_subclass_tf = torch._C.DisableTorchFunctionSubclass


def _call(op, *args):
    """``op(*args)`` without the per-argument ``__torch_function__`` lookups (see above)."""
    with _no_subclass_tf():
        return op(*args)


#: what :func:`available` and its variants found, per (variant, device): fixed for a process
#: once the library's load was tried, and asked on every planned step
_FOUND: dict[tuple[str, torch.device | str], bool] = {}


def _found(variant: str, device: torch.device | str, ops: tuple[str, ...]) -> bool:
    key = (variant, device)
    hit = _FOUND.get(key)
    if hit is None:
        # an extension built before the plan (or a part of it) existed lacks some of ``ops``
        lib = getattr(torch.ops, _NS)
        hit = _FOUND[key] = (
            _available("ext", device)
            and hasattr(torch.classes.sam_kernels_C, "SamStepPlan")
            and all(hasattr(lib, op) for op in ops)
        )
    return hit


def available(device: torch.device | str = "cpu") -> bool:
    """True when the built extension has the step plan and runs on ``device``'s tensors."""
    return _found("sam", device, ("plan_ascent", "plan_descent_apply"))


class SamStepPlan:
    """One optimizer's SAM step plan (a thin holder of the C++ object and its two ops).

    Build it with :meth:`watch`, :meth:`ascent_lists` and one ``add_*_group`` per base group;
    then call :meth:`ascent` and :meth:`descent` once per step.
    """

    __slots__ = (
        "_plan",
        "_counters",
        "_ascent",
        "_descent",
        "_descent_flag",
        "_descent_apply",
        "_crsam",
        "_universal",
    )

    def __init__(self, counters: torch.Tensor) -> None:
        self._plan = torch.classes.sam_kernels_C.SamStepPlan()
        self._counters = counters
        ops = getattr(torch.ops, _NS)
        # the overloads' C++ callables: OpOverload.__call__ scans the arguments for fake script
        # objects on every call (torch.compile's tracing of script objects; this plan is never
        # traced), about as long as the C++ side of a small step
        self._ascent = ops.plan_ascent.default._op
        self._descent = ops.plan_descent.default._op
        self._descent_flag = ops.plan_descent_flag.default._op
        self._descent_apply = ops.plan_descent_apply.default._op
        self._crsam = (
            (
                ops.crsam_ascent.default._op,
                ops.crsam_middle.default._op,
                ops.crsam_descent.default._op,
            )
            if hasattr(ops, "crsam_ascent")
            else None
        )
        self._universal = (
            (
                ops.universal_ascent.default._op,
                ops.universal_sample.default._op,
                ops.universal_descent.default._op,
            )
            if hasattr(ops, "universal_ascent")
            else None
        )

    def watch(self, params: Sequence[torch.Tensor]) -> None:
        """Every parameter of every group; the gradients present now are the ones expected."""
        ps = list(params)
        self._plan.set_watch(ps, [int(p.grad is not None) for p in ps])

    def ascent_lists(
        self,
        norm_params: Sequence[torch.Tensor],
        adaptive: bool,
        eta: float,
        pert_params: Sequence[torch.Tensor],
        backups: Sequence[torch.Tensor],
        rho: torch.Tensor,
    ) -> None:
        """The norm's parameters (every one with a gradient), ASAM's setting, the perturbed
        parameters with their backups and per-tensor ``rho`` (a device tensor)."""
        self._plan.set_ascent(
            list(norm_params),
            bool(adaptive),
            float(eta),
            list(pert_params),
            list(backups),
            rho,
            self._counters,
        )

    def add_sgd_group(self, params, momentum_buffers, steps, backups, has_momentum: bool) -> None:
        """A fused SGD group (``momentum_buffers`` empty without momentum, ``backups`` empty
        when the group is not perturbed)."""
        self._plan.add_sgd_group(
            list(params), list(momentum_buffers), list(steps), list(backups), bool(has_momentum)
        )

    def add_adamw_group(
        self, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups, amsgrad: bool
    ) -> None:
        """A fused AdamW group (``max_exp_avg_sqs`` empty without amsgrad)."""
        self._plan.add_adamw_group(
            list(params),
            list(exp_avgs),
            list(exp_avg_sqs),
            list(max_exp_avg_sqs),
            list(steps),
            list(backups),
            bool(amsgrad),
        )

    def matches(self) -> bool:
        """Whether the gradients and parameters are as the plan expects (no op run)."""
        return bool(self._plan.matches())

    def drop_stale(self, params: Sequence[torch.Tensor]) -> bool:
        """Set to None each gradient of ``params`` that is still the tensor the last
        :meth:`descent` marked, at most one in-place write later; True if any of ``params``
        keeps a gradient."""
        return bool(self._plan.drop_stale(list(params)))

    def drop_stale_watched(self) -> bool:
        """:meth:`drop_stale` over every parameter the plan watches."""
        return bool(self._plan.drop_stale_watched())

    def same_params(self) -> bool:
        """No watched parameter changed dtype, device or shape since the plan was built."""
        return bool(self._plan.same_params())

    def drop_grads(self) -> None:
        """``p.grad = None`` for every watched parameter."""
        self._plan.drop_grads()

    def ascent(
        self, loss: torch.Tensor | None = None, drop_grads: bool = False
    ) -> torch.Tensor | None:
        """The ascent; returns the step's finite flag ``ok`` (0-d float32), or ``None`` when the
        plan does not match (nothing was changed). ``drop_grads``: then ``p.grad = None`` for
        every watched parameter (:meth:`drop_grads`, in the same call)."""
        out = _call(self._ascent, self._counters, self._plan, loss, bool(drop_grads))
        return out[0] if out else None

    def descent(
        self,
        ok: torch.Tensor,
        hyper: list[float],
        loss: torch.Tensor | None = None,
        max_grad_norm: float | None = None,
    ) -> bool:
        """The base step from the backups, gated by ``ok``; ``hyper``: six floats per group
        (SGD: lr, momentum, dampening, nesterov, weight_decay, maximize; AdamW: lr, beta1,
        beta2, eps, weight_decay, maximize). ``max_grad_norm``: the gradient clipped by its
        global norm (``torch.nn.utils.clip_grad_norm_``'s rule, ``min(1, c / (||g1|| + 1e-6))``,
        a non-finite norm skipping the step). False when the plan does not match (nothing was
        changed)."""
        clip = float(max_grad_norm) if max_grad_norm is not None else 0.0
        return _call(self._descent, self._counters, self._plan, ok, loss, hyper, clip)

    def descent_flag(
        self, ok: torch.Tensor, loss: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The descent's first part: ``(ok * finite(||g1||) [* finite(L1)], ||g1||)``, this
        rank's flag before the gate and the norm of ``g1``; ``None`` when the plan does not
        match (nothing was changed). A distributed step reduces the flag over the ranks, then
        calls :meth:`descent_apply`."""
        out = _call(self._descent_flag, self._counters, self._plan, ok, loss)
        return (out[0], out[1]) if out else None

    def descent_apply(
        self,
        ok: torch.Tensor,
        norm: torch.Tensor,
        hyper: list[float],
        max_grad_norm: float | None = None,
    ) -> bool:
        """The descent's second part with the gated flag ``ok`` and the ``norm`` of
        :meth:`descent_flag`: clipping, the base steps, the counters and the marks, as
        :meth:`descent` runs them. False when the plan does not match (nothing was changed)."""
        clip = float(max_grad_norm) if max_grad_norm is not None else 0.0
        return _call(self._descent_apply, self._counters, self._plan, ok, norm, hyper, clip)

    # ----------------------------------------------------------------- CR-SAM
    def crsam_ascent(self, loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """CR-SAM's first call: ``ok = finite(||g0||) [* finite(L0)]``, ``b = w``,
        ``w += rho g0 / (||g0|| + 1e-12)``, ``g0`` kept, ``p.grad = None``. ``None`` when the
        plan does not match (nothing was changed)."""
        out = _call(self._crsam[0], self._counters, self._plan, loss)
        return out[0] if out else None

    def crsam_middle(self) -> torch.Tensor:
        """After the evaluation at ``w + e``: ``g+`` kept, ``w = b - e``, ``p.grad = None``;
        returns ``||g+||`` (its finite flag is folded into the descent's)."""
        return _call(self._crsam[1], self._counters, self._plan)[0]

    def crsam_descent(
        self,
        ok: torch.Tensor,
        n_plus: torch.Tensor,
        loss_plus: torch.Tensor | None,
        loss_minus: torch.Tensor | None,
        coefs: torch.Tensor,
        hyper: list[float],
    ) -> None:
        """After the evaluation at ``w - e``: the base step from the backups with
        ``g = coefs . (g+, g-, g0)``, gated by ``ok * finite(||g+||, L+, ||g-||, L-)``; the
        counters; the kept gradients dropped; the marks."""
        _call(
            self._crsam[2],
            self._counters,
            self._plan,
            ok,
            n_plus,
            loss_plus,
            loss_minus,
            coefs,
            hyper,
        )

    def kept(self) -> list[torch.Tensor]:
        """The gradients a CR-SAM step keeps: ``[g0..., g+...]`` over the norm's parameters (as
        far as taken)."""
        return list(self._plan.kept())

    def release(self) -> None:
        """Drop what a CR-SAM or universal-class step kept."""
        self._plan.release()

    # ----------------------------------------------------------------- the universal class
    def set_universal(
        self,
        estimator: int,
        scale: torch.Tensor,
        kind: int,
        half_cube_len: float,
        reference_stream: bool = False,
    ) -> None:
        """The universal class's step, once per plan: its ``estimator`` (0 Frob-SAM, 1
        Trace-SAM, 2 Det-SAM) and noise, ``eps`` scaled by ``scale`` (rho: 0-d, or one per
        perturbed tensor), of ``kind`` (0 normal, 1 uniform on ``[-half_cube_len, a]``): the
        counter-based contract, or with ``reference_stream`` the global generator's stream (one
        draw per tensor, as the eager implementation draws without a seed)."""
        self._plan.set_universal(
            int(estimator), scale, int(kind), float(half_cube_len), bool(reference_stream)
        )

    def universal_ascent(
        self, loss: torch.Tensor | None, seed: torch.Tensor | None, offset: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The first call: ``ok = finite(||g0||) [* finite(L0)]``, ``g0`` kept, ``b = w``,
        ``w = b + rho * eps_1`` (counter noise at ``offset``, which advances), ``p.grad = None``.
        ``None`` when the plan does not match or not every parameter with a gradient is
        perturbed (nothing was changed)."""
        out = _call(self._universal[0], self._counters, self._plan, loss, seed, offset)
        return out[0] if out else None

    def universal_sample(
        self,
        loss: torch.Tensor | None,
        coef: torch.Tensor | None,
        seed: torch.Tensor | None,
        offset: torch.Tensor | None,
        n: int,
        more: bool,
    ) -> None:
        """After a noisy evaluation: its gradient (and loss) folded into the estimator's sums
        (the first one starts them); ``coef``: Trace-SAM's ``1/n``, Det-SAM's ``1/rho^2``; with
        ``more`` the next sample's weights drawn and ``p.grad = None``."""
        _call(
            self._universal[1],
            self._counters,
            self._plan,
            loss,
            coef,
            seed,
            offset,
            int(n),
            bool(more),
        )

    def universal_descent(
        self,
        ok: torch.Tensor,
        offset: torch.Tensor | None,
        consts: list[torch.Tensor],
        lams: list[float],
        hyper: list[float],
    ) -> None:
        """After the last sample: the base step from the backups with each group's combination
        (``consts``: Frob-SAM's ``a, b`` per group, Trace-SAM's ``lam``; ``lams``: Det-SAM's),
        gated by ``ok``, every sample's flags and the coefficients'; the counters; the offset
        rolled back on a skipped step; what the step kept dropped; the marks."""
        _call(self._universal[2], self._counters, self._plan, ok, offset, consts, lams, hyper)

    def universal_kept(self) -> list[torch.Tensor]:
        """What a step of the universal class kept (``csrc/step_plan.h``): ``[offset0]`` before
        its first sample, then the samples' flags, ``g0`` and the estimator's sums; empty
        outside a step."""
        return list(self._plan.universal_kept())


def crsam_available(device: torch.device | str = "cpu") -> bool:
    """True when the built extension has CR-SAM's planned step too."""
    return _found("crsam", device, ("plan_ascent", "plan_descent_apply", "crsam_ascent"))


def universal_available(device: torch.device | str = "cpu") -> bool:
    """True when the built extension has the universal class's planned step too."""
    return _found("universal", device, ("plan_ascent", "plan_descent_apply", "universal_ascent"))
