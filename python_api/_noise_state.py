"""The counter-based noise stream's state, saved and loaded once for every class that draws
noise on a fused backend (the universal class, R-SAM).

Such a class holds ``_noise_seed`` and ``_noise_offset`` (int64 0-d device tensors; both
``None`` where its noise comes from the global generator instead) and advances the offset by
the elements it draws. :class:`NoiseStreamState` puts the pair among the algorithm's scalars in
``state_dict`` and loads it back in place, so a resumed run draws the noise it would have drawn.
"""

from __future__ import annotations

from typing import Any

import torch


class NoiseStreamState:
    """Mixin (before ``SAMFamily`` in the bases): the ``(seed, offset)`` pair in
    :meth:`_extra_state` / :meth:`_load_extra_state`. Reads ``_noise_seed``, ``_noise_offset``
    and ``_device``."""

    _noise_seed: torch.Tensor | None
    _noise_offset: torch.Tensor | None
    _device: torch.device

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()  # type: ignore[misc]
        if self._noise_seed is not None:
            extra["noise_seed"] = self._noise_seed.clone()
            extra["noise_offset"] = self._noise_offset.clone()
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)  # type: ignore[misc]
        if self._noise_seed is not None and "noise_seed" in extra:
            self._noise_seed.copy_(torch.as_tensor(extra["noise_seed"]).to(self._device))
        if self._noise_offset is not None and "noise_offset" in extra:
            self._noise_offset.copy_(torch.as_tensor(extra["noise_offset"]).to(self._device))
