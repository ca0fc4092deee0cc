"""Training augmentation, as in the paper: in-plane 90-degree rotations and intensity scale and shift.

Randomness comes from a ``numpy.random.Generator`` that the trainer derives from (seed, sample position), so
a sample's augmentation does not depend on how many processes run or whether the run was resumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class AugmentConfig:
    """Probabilities and ranges of each augmentation (all off with :meth:`none`).

    * ``rotate_prob``: rotate the (H, W) plane by k x 90 degrees, k uniform in 1..3 (only k = 2 when H != W,
      so the shape is kept); image and target identically.
    * ``scale_prob`` / ``scale``: multiply intensities by ``1 + u``, u uniform in [-scale, scale].
    * ``shift_prob`` / ``shift``: add ``u * std(image)``, u uniform in [-shift, shift].
    """

    rotate_prob: float = 0.5
    scale_prob: float = 0.5
    scale: float = 0.1
    shift_prob: float = 0.5
    shift: float = 0.1

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``training_args.json``)."""
        return asdict(self)


def augment(image: torch.Tensor, target: torch.Tensor, rng: np.random.Generator,
            config: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one (C, D, H, W) image and its (C, D, H, W) target; returns new tensors (inputs untouched).

    The generator is always advanced by the same number of draws, whatever is applied.
    """
    draws = rng.random(6)
    h, w = image.shape[-2], image.shape[-1]
    if draws[0] < config.rotate_prob:
        k = 1 + int(draws[1] * 3) if h == w else 2
        image = torch.rot90(image, k, dims=(-2, -1))
        target = torch.rot90(target, k, dims=(-2, -1))
    if draws[2] < config.scale_prob and config.scale:
        image = image * float(1.0 + (2.0 * draws[3] - 1.0) * config.scale)
    if draws[4] < config.shift_prob and config.shift:
        image = image + float((2.0 * draws[5] - 1.0) * config.shift) * float(image.float().std())
    return image.contiguous(), target.contiguous()
