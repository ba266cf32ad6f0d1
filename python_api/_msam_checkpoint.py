"""Momentum-SAM's copies and checkpoints (``python_api.msam``): pickling and deep copies that keep
the step counters, and torch-format ``state_dict`` / ``load_state_dict`` with the algorithm's
move-down coefficients, checked before anything is loaded.
"""

from __future__ import annotations

from typing import Any

import torch

#: per-parameter key of the move-down coefficient ``s`` (``w = w~ + s * direction``)
SCALE_KEY = "ascent_scale"
#: the algorithm's scalars in ``state_dict()["param_groups"][0]`` (as the SAM family's)
FORMAT_KEY = "sam_state"
FORMAT_VERSION = 1


def _scale_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class MomentumSAMCheckpoint:
    """Mixin of :class:`python_api._msam_core.MomentumSAMCore` (before ``torch.optim.Optimizer``
    in its bases): it reads the core's ``_saved``, ``_counters``, ``_buffer_keys``,
    ``_validate_group`` and ``_init_state``."""

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults/state/param_groups: a copy would lose the counters
        if self._saved is not None:
            raise RuntimeError(f"cannot copy or pickle {type(self).__name__} inside unperturbed()")
        st = super().__getstate__()
        st.update(
            on_nonfinite=self.on_nonfinite,
            backend=self.backend,
            max_grad_norm=self.max_grad_norm,
            _counters=self._counters,
        )
        return st

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("on_nonfinite", "skip")
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("max_grad_norm", None)
        if "_counters" not in self.__dict__:
            self._counters = torch.zeros(2, dtype=torch.float32)
        self._saved = None
        self._const_cache = None
        self._ready = True

    def state_dict(self) -> dict[str, Any]:
        """torch's format: ``state[i]`` holds parameter ``i``'s direction buffer(s), ``step``
        and ``ascent_scale`` (the move-down coefficient ``s``); ``param_groups[0]["sam_state"]``
        the class name and the step counters. Inside :meth:`unperturbed` ``ascent_scale`` is
        reported as 0 (the weights are ``w`` there)."""
        sd = super().state_dict()
        if self._saved is not None:
            sd["state"] = {
                k: ({**v, SCALE_KEY: torch.zeros_like(v[SCALE_KEY])} if SCALE_KEY in v else v)
                for k, v in sd["state"].items()
            }
        if sd["param_groups"]:
            sd["param_groups"][0][FORMAT_KEY] = {
                "class": type(self).__name__,
                "version": FORMAT_VERSION,
                "counters": self._counters.clone(),
            }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this class (or a plain torch dict with the same buffers).

        Checked first (a refused dict changes nothing): group and parameter counts, the class,
        buffer shapes, hyper-parameters. ``step`` and ``ascent_scale`` keep float32
        (float64 for float64 parameters) and move to the parameter's device.
        """
        if self._saved is not None:
            raise RuntimeError(f"{type(self).__name__}.load_state_dict() inside unperturbed()")
        me = type(self).__name__
        groups = [dict(g) for g in state_dict["param_groups"]]
        meta = groups[0].pop(FORMAT_KEY, None) if groups else None
        for g in groups[1:]:
            g.pop(FORMAT_KEY, None)
        if meta is not None and meta.get("class") != me:
            raise ValueError(f"a {meta.get('class')} state_dict cannot be loaded into {me}")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{me}: the state_dict has {len(groups)} parameter groups, the optimizer "
                f"{len(self.param_groups)}"
            )
        pairs: list[tuple[Any, torch.Tensor]] = []
        for i, (sg, g) in enumerate(zip(groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"{me}: param_groups[{i}] has {len(sg['params'])} parameters in the "
                    f"state_dict, {len(g['params'])} in the optimizer"
                )
            probe = {**g, **{k: v for k, v in sg.items() if k != "params"}}
            self._validate_group(probe, i)
            pairs.extend(zip(sg["params"], g["params"]))
        saved_state = state_dict["state"]
        for idx, p in pairs:
            st = saved_state.get(idx)
            if not st:
                continue
            for k in self._buffer_keys:
                if k in st and tuple(st[k].shape) != tuple(p.shape):
                    raise ValueError(
                        f"{me}: state of parameter {idx} has {k} of shape "
                        f"{tuple(st[k].shape)}, the parameter {tuple(p.shape)}"
                    )
        scalars = {
            idx: {k: saved_state[idx][k] for k in ("step", SCALE_KEY) if k in saved_state[idx]}
            for idx, _ in pairs
            if saved_state.get(idx)
        }
        super().load_state_dict({"state": saved_state, "param_groups": groups})
        for idx, p in pairs:
            st = self.state.get(p)
            if not st:
                continue
            saved = scalars.get(idx, {})
            dtypes = {"step": _scale_dtype(p), SCALE_KEY: _scale_dtype(p)}
            for k, dt in dtypes.items():
                v = saved.get(k)
                st[k] = (
                    torch.as_tensor(v).to(device=p.device, dtype=dt).clone()
                    if v is not None
                    else torch.zeros((), dtype=dt, device=p.device)
                )
            self._init_state(p)  # buffers a plain torch dict lacks start at zero
        counters = (meta or {}).get("counters")
        if counters is not None:
            self._counters = torch.as_tensor(counters).to(self._counters).clone()
        self._const_cache = None
