"""Training augmentation: the paper's recipe (``default``) and the levels ``none``, ``light`` and ``heavy``.

``default`` is the paper's: in-plane 90-degree rotations and intensity scale and shift. ``light`` and ``heavy``
add MONAI transforms (small in-plane rotations and scaling, elastic deformation in ``heavy``, gamma, Gaussian
noise, blur, contrast, mirroring in ``heavy``). The image gets linear interpolation, the target nearest, so
target values stay those of the input.

**Left and right.** The last array axis (W) is the patient's left-right axis (the model's orientations, CT
``LAS`` and MR ``LPS``, put it there, and challenge npz store it so). Mirroring that axis would turn a left
organ into a right one, so the label would be wrong: when the sample's prompt names a side
(:func:`names_side`), W is never mirrored. Rotations do not mirror (a rotated patient keeps its left).

Randomness comes from a ``numpy.random.Generator`` that the trainer derives from (seed, sample position), so
a sample's augmentation does not depend on how many processes run or whether the run was resumed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from text3dsam_cli.errors import UsageError

#: ``--augment`` choices, weakest first.
AUGMENT_LEVELS = ("none", "light", "default", "heavy")
#: Words that give a prompt a side ("left kidney", "Rt. lung", "kidney_left", "lung sinister").
SIDE_WORDS = re.compile(r"(?<![a-z])(left|right|lt|rt|sinister|sinistra|dexter|dextra)(?![a-z])", re.IGNORECASE)


def names_side(prompt: str | None) -> bool:
    """Whether ``prompt`` names a left or right side (then the left-right axis must never be mirrored)."""
    return bool(prompt) and SIDE_WORDS.search(prompt.replace("_", " ")) is not None  # type: ignore[union-attr]


@dataclass
class AugmentConfig:
    """Probabilities and ranges of each augmentation (all off with :meth:`none`; levels by :meth:`from_level`).

    The paper's three (``default``, drawn first and always in the same way):

    * ``rotate_prob``: rotate the (H, W) plane by k x 90 degrees, k uniform in 1..3 (only k = 2 when H != W,
      so the shape is kept); image and target identically.
    * ``scale_prob`` / ``scale``: multiply intensities by ``1 + u``, u uniform in [-scale, scale].
    * ``shift_prob`` / ``shift``: add ``u * std(image)``, u uniform in [-shift, shift].

    MONAI transforms (``light`` / ``heavy``), applied after them in this order:

    * ``affine_prob``: ``RandAffine``, in-plane rotation by up to ``rotate_degrees`` and zoom by a factor in
      [1 - ``zoom``, 1 + ``zoom``] on every axis (the shape is kept).
    * ``elastic_prob``: ``Rand3DElastic`` with ``elastic_sigma`` (smoothing, voxels) and ``elastic_magnitude``.
    * ``flip_prob``: mirror each axis with this probability (never W when the prompt names a side).
    * ``gamma_prob`` / ``gamma``: ``RandAdjustContrast``, gamma in [1 - gamma, 1 + gamma] (range kept).
    * ``noise_prob`` / ``noise_std``: ``RandGaussianNoise``, std up to ``noise_std`` (image units, 0..255).
    * ``blur_prob`` / ``blur_sigma``: ``RandGaussianSmooth``, sigma in [0.5, blur_sigma] voxels per axis.
    * ``contrast_prob`` / ``contrast``: ``RandScaleIntensityFixedMean``, contrast x (1 +- contrast) about the
      mean, range kept.
    """

    rotate_prob: float = 0.5
    scale_prob: float = 0.5
    scale: float = 0.1
    shift_prob: float = 0.5
    shift: float = 0.1
    affine_prob: float = 0.0
    rotate_degrees: float = 0.0
    zoom: float = 0.0
    elastic_prob: float = 0.0
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    flip_prob: float = 0.0
    gamma_prob: float = 0.0
    gamma: float = 0.0
    noise_prob: float = 0.0
    noise_std: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: float = 1.0
    contrast_prob: float = 0.0
    contrast: float = 0.0
    level: str = "default"

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, level="none")

    @classmethod
    def from_level(cls, level: str) -> AugmentConfig:
        """``none``, ``light``, ``default`` (the paper's recipe) or ``heavy``; else a :class:`UsageError`."""
        name = str(level).strip().lower()
        if name == "none":
            return cls.none()
        if name == "default":
            return cls()
        if name == "light":
            return cls(rotate_prob=0.0, scale_prob=0.5, scale=0.1, shift_prob=0.5, shift=0.1,
                       affine_prob=0.2, rotate_degrees=10.0, zoom=0.1, gamma_prob=0.15, gamma=0.2, level="light")
        if name == "heavy":
            return cls(rotate_prob=0.5, scale_prob=0.5, scale=0.15, shift_prob=0.5, shift=0.15,
                       affine_prob=0.3, rotate_degrees=15.0, zoom=0.2, elastic_prob=0.2, flip_prob=0.5,
                       gamma_prob=0.3, gamma=0.3, noise_prob=0.15, noise_std=10.0, blur_prob=0.2, blur_sigma=1.0,
                       contrast_prob=0.15, contrast=0.25, level="heavy")
        raise UsageError(f"--augment {level!r}: choose {', '.join(AUGMENT_LEVELS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``training_args.json``)."""
        data = asdict(self)
        data["elastic_sigma"], data["elastic_magnitude"] = list(self.elastic_sigma), list(self.elastic_magnitude)
        return data

    def uses_monai(self) -> bool:
        """Whether any MONAI transform can apply (``light`` / ``heavy``)."""
        return any(p > 0 for p in (self.affine_prob, self.elastic_prob, self.gamma_prob, self.noise_prob,
                                   self.blur_prob, self.contrast_prob))


def _monai_spatial(config: AugmentConfig) -> Any:
    from monai.transforms import Compose, Rand3DElasticd, RandAffined

    keys, modes = ["image", "target"], ("bilinear", "nearest")
    parts: list[Any] = []
    if config.affine_prob > 0:
        zoom = (1.0 - config.zoom, 1.0 + config.zoom)
        parts.append(RandAffined(keys, prob=config.affine_prob, rotate_range=(math.radians(config.rotate_degrees),
                                 0.0, 0.0), scale_range=(zoom[0] - 1, zoom[1] - 1) if config.zoom else None,
                                 mode=modes, padding_mode="zeros"))
    if config.elastic_prob > 0:
        parts.append(Rand3DElasticd(keys, sigma_range=config.elastic_sigma, magnitude_range=config.elastic_magnitude,
                                    prob=config.elastic_prob, mode=modes, padding_mode="zeros"))
    return Compose(parts)


def _monai_intensity(config: AugmentConfig) -> Any:
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandScaleIntensityFixedMean,
    )

    parts: list[Any] = []
    if config.gamma_prob > 0:
        parts.append(RandAdjustContrast(prob=config.gamma_prob, gamma=(1.0 - config.gamma, 1.0 + config.gamma)))
    if config.noise_prob > 0:
        parts.append(RandGaussianNoise(prob=config.noise_prob, std=config.noise_std))
    if config.blur_prob > 0:
        sigma = (0.5, config.blur_sigma)
        parts.append(RandGaussianSmooth(sigma, sigma, sigma, prob=config.blur_prob))
    if config.contrast_prob > 0:
        parts.append(RandScaleIntensityFixedMean(prob=config.contrast_prob, factors=config.contrast,
                                                 preserve_range=True))
    return Compose(parts)


def _plain(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain float32 torch tensor."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x, dtype=torch.float32)


def augment(image: torch.Tensor, target: torch.Tensor, rng: np.random.Generator,
            config: AugmentConfig, prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one (C, D, H, W) image and its (C, D, H, W) target; returns new tensors (inputs untouched).

    ``prompt`` is the sample's phrasing: when it names a side, the left-right axis (W) is never mirrored.
    The paper's part always advances the generator by the same number of draws, whatever is applied (so
    ``default`` gives the same samples as before the levels existed); the MONAI part draws two more.
    """
    draws = rng.random(6)
    h, w = image.shape[-2], image.shape[-1]
    if config.flip_prob > 0:  # mirror first, in the stored frame, where W is left-right
        flips = rng.random(3)
        axes = [a for a, u in zip((-3, -2, -1), flips) if u < config.flip_prob
                and not (a == -1 and names_side(prompt))]
        if axes:
            image, target = torch.flip(image, axes), torch.flip(target, axes)
    if draws[0] < config.rotate_prob:
        k = 1 + int(draws[1] * 3) if h == w else 2
        image = torch.rot90(image, k, dims=(-2, -1))
        target = torch.rot90(target, k, dims=(-2, -1))
    if draws[2] < config.scale_prob and config.scale:
        image = image * float(1.0 + (2.0 * draws[3] - 1.0) * config.scale)
    if draws[4] < config.shift_prob and config.shift:
        image = image + float((2.0 * draws[5] - 1.0) * config.shift) * float(image.float().std())
    if config.uses_monai():
        seeds = rng.integers(0, 2**31 - 1, size=2)
        spatial = _monai_spatial(config)
        if spatial.transforms:
            spatial.set_random_state(seed=int(seeds[0]))
            out = spatial({"image": image.float(), "target": target.float()})
            image, target = _plain(out["image"]), _plain(out["target"]).to(target.dtype)
        intensity = _monai_intensity(config)
        if intensity.transforms:
            intensity.set_random_state(seed=int(seeds[1]))
            image = _plain(intensity(image.float()))
    return image.contiguous(), target.contiguous()
