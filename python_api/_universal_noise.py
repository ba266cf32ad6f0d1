"""The universal class's noise bookkeeping (:mod:`python_api.universal`): the counter-based
``(seed, offset)`` pair among the algorithm's scalars in ``state_dict``, and the check of the noise
a step is given (the ``noise=`` test hook).

Separate from the class, which creates the pair in its constructor where a fused backend draws
the noise, and from the step (:mod:`python_api._universal_step`), which advances the offset: what
this module holds is only how the pair is saved and loaded and what a given noise must look like.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from python_api._noise_state import NoiseStreamState

Noise = Sequence[Sequence[torch.Tensor]]


class UniversalNoise(NoiseStreamState):
    """Mixin of :class:`python_api.universal._UniversalSAM` (before ``SAMFamily`` in its bases):
    the noise counters in ``state_dict`` (:class:`python_api._noise_state.NoiseStreamState`), and
    :meth:`_check_noise`. Reads the class's ``_noise_seed``, ``_noise_offset``, ``_device`` and
    ``n_samples``."""

    def _check_noise(self, noise: Noise, pert: list[torch.Tensor]) -> None:
        if len(noise) != self.n_samples:
            raise ValueError(f"noise has {len(noise)} samples, expected n_samples={self.n_samples}")
        for i, sample in enumerate(noise):
            if len(sample) != len(pert) or any(e.shape != p.shape for e, p in zip(sample, pert)):
                raise ValueError(
                    f"noise[{i}] must hold one tensor per perturbed parameter ({len(pert)}), "
                    "shaped like it, in parameter order"
                )
