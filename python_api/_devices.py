"""Device following: the optimizer's own device tensors and the per-parameter state follow the
parameters when they are moved or re-typed after construction (HF accelerate builds the optimizer
on CPU parameters and moves the model afterwards; ``model.to(torch.bfloat16)``).

:class:`DeviceFollowing` is a part of :class:`python_api._base.SAMFamily` (first in its bases,
where these methods were defined before); separate because it is the one job of the core that
acts on everything the optimizer holds rather than on a step.
"""

from __future__ import annotations

import torch

from python_api._checks import check_real_params


class DeviceFollowing:
    """Where the parameters are, and the state following them (a part of ``SAMFamily``). Reads
    ``param_groups``, ``state``, ``base_optimizer``, ``_device``, ``_param_sig``, ``_followed``
    and the plan caches (``_rho_cache``, ``_plan``, ``_mode_plan``) that ``SAMFamily``
    creates."""

    def _find_device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

    def _follow_device(self) -> None:
        """Move the optimizer's own device tensors if the parameters moved since construction.

        Frameworks such as HF accelerate build the optimizer on CPU parameters and move the model
        afterwards. Counters, statistics, seeds and caches held as tensor attributes (or in
        tuples/lists of them) follow the parameters; one attribute compare per call otherwise.
        Groups added through the base optimizer get this optimizer's settings first.

        Done once per step: the step's later calls (its ascent, its base step) return at once,
        until the step ends or a new one starts (``_followed``, cleared by ``_mark_grads`` and
        at the start of ``step`` and ``first_step``). About 30 us over 161 parameters.
        """
        if self._followed:
            return
        self._fill_group_settings()
        self._follow_params()
        new = self._find_device()
        old = self._device
        if new == old:
            self._followed = True
            return

        def move(v):
            if isinstance(v, torch.Tensor) and v.device == old:
                return v.to(new)
            if isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v):
                return type(v)(move(x) for x in v)
            return v

        for k, v in list(vars(self).items()):
            if k not in ("state", "param_groups", "defaults", "base_optimizer", "model"):
                setattr(self, k, move(v))
        self._device = new
        self._followed = True

    def _follow_params(self) -> None:
        """Cast and move per-parameter state if parameters were re-typed or moved.

        ``model.to(torch.bfloat16)`` or ``.cuda()`` after construction changes the parameters in
        place; state follows them as torch's ``load_state_dict`` casts it: every floating-point
        tensor shaped like its parameter (momentum, Adam moments, LookSAM's ``gv``, ...) takes the
        parameter's dtype and device; step counters keep their dtype and move. One
        (dtype, device) compare per parameter per step otherwise.
        """
        sig = [(p.dtype, p.device) for g in self.param_groups for p in g["params"]]
        if sig == self._param_sig:
            return
        if any(dt.is_complex for dt, _ in sig):  # a model converted to complex since
            check_real_params(self)
        self._param_sig = sig
        self._rho_cache = None
        self._plan = None
        self._mode_plan = None
        for g in self.param_groups:
            for p in g["params"]:
                for states in (self.state, self.base_optimizer.state):
                    st = states.get(p)
                    if st:
                        for k, v in st.items():
                            if isinstance(v, torch.Tensor):
                                st[k] = _follow(v, p, k)


def _follow(v: torch.Tensor, p: torch.Tensor, key: str) -> torch.Tensor:
    """State tensor ``v`` of parameter ``p`` cast/moved to follow ``p`` (see _follow_params)."""
    if key != "step" and v.is_floating_point() and v.shape == p.shape:
        if v.dtype != p.dtype or v.device != p.device:
            return v.to(device=p.device, dtype=p.dtype)
        return v
    return v if v.device == p.device else v.to(p.device)
