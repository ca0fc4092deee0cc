"""``Volume``: a 3-D image array in (z, y, x) order with the geometry needed to write results back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    """A shape in array order with its axes named, as every shape message shows it: ``"19x138x168 (z, y, x)"``
    (``(y, x)`` for two axes, ``(t, z, y, x)`` for four). ITK sizes are (x, y, z): reverse them first."""
    names = ("c", "t", "z", "y", "x")[-len(shape):] if 0 < len(shape) <= 5 else ()
    axes = f" ({', '.join(names)})" if names else ""
    return "x".join(str(int(s)) for s in shape) + axes


@dataclass
class Volume:
    """An image as SimpleITK lays it out: ``array`` is (z, y, x); geometry is in SimpleITK's (x, y, z) terms.

    ``spacing`` and ``origin`` are (x, y, z) in mm (LPS world coordinates, as ITK uses them), ``direction`` the
    9 numbers of the row-major 3x3 direction cosine matrix. ``modality`` is "CT", "MR", "PT", "US", ... or
    None when unknown. ``meta`` carries format-specific extras (npz ``text_prompts``, DICOM series UID, ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    path: Path | None = None
    source_format: str = "array"
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry around another array of the same spatial shape."""
        if tuple(array.shape[-3:]) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match volume shape {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction, self.path, self.source_format,
                      self.modality, dict(self.meta))

    def geometry(self) -> dict[str, Any]:
        """JSON-friendly geometry summary (for sidecars)."""
        return {
            "shape_zyx": list(self.shape),
            "spacing_xyz": [float(s) for s in self.spacing],
            "origin_xyz": [float(s) for s in self.origin],
            "direction": [float(s) for s in self.direction],
        }
