"""Voxel orientation: which way each index axis points, and reorienting a volume by permuting/flipping axes.

An orientation code has three letters, one per index axis in the order x, y, z (the array is (z, y, x)):
the direction in which that axis points in the patient, ``L``/``R``, ``P``/``A``, ``S``/``I``. This is
SimpleITK's ``DICOMOrient`` convention and nibabel's axis codes: an identity direction matrix in ITK's LPS
world is ``"LPS"``; a NIfTI with a diagonal ``diag(-1, 1, 1)`` RAS affine is ``"LAS"``.

:func:`reorientation` builds the pure permutation/flip that takes a volume to a target code, never a
resampling: the reoriented volume holds the same voxels at the same physical points, with origin, spacing
and direction updated to match. Oblique volumes get the closest axis-aligned code (:func:`closest_code`) and
keep their exact, oblique direction. :meth:`Reorientation.undo` maps arrays computed on the reoriented grid
(label maps (z, y, x), probabilities (K, z, y, x)) back onto the input grid exactly.

Which code the model expects per modality is a table in the checkpoint's ``config.json``
(``inference.orientation``); :data:`DEFAULT_ORIENTATION` is the table for the published model, whose config
has none (see ``docs/formats.md`` for the evidence behind each entry).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from text3dsam_cli.errors import UsageError
from text3dsam_cli.io.volume import Volume

#: Letter -> (LPS world axis, sign): the direction an index axis points to.
LETTERS: dict[str, tuple[int, int]] = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1),
                                       "S": (2, 1), "I": (2, -1)}
_OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}

#: The published model's table (its config.json has no ``inference.orientation``). CT: the challenge's CT
#: npz (AMOS) are stored LAS; MR: the BraTS npz are LPS; PT follows CT (an assumption: no PET case checked).
DEFAULT_ORIENTATION: dict[str, str] = {"CT": "LAS", "PT": "LAS", "MR": "LPS"}

#: ``--orientation`` keywords besides a code.
KEYWORDS = ("auto", "native")


def check_code(code: str) -> str:
    """An orientation code in upper case; anything but one letter from each of L/R, A/P, S/I raises UsageError."""
    text = str(code).strip().upper()
    if len(text) != 3 or any(c not in LETTERS for c in text) or len({LETTERS[c][0] for c in text}) != 3:
        raise UsageError(f"invalid orientation code {code!r}: use three letters, one of L/R, one of A/P and "
                         "one of S/I, each naming where the x, y and z index axes point (e.g. LAS, LPS, RAS)")
    return text


def check_request(request: str) -> str:
    """An ``--orientation`` value: ``auto``, ``native`` or a valid code (normalised); else UsageError."""
    text = str(request).strip()
    if text.lower() in KEYWORDS:
        return text.lower()
    return check_code(text)


def check_table(table: Mapping[str, Any], where: str = "inference.orientation") -> dict[str, str]:
    """A modality -> code table with normalised modality names and codes; bad entries raise UsageError."""
    from text3dsam_cli.preprocess import normalize_modality_name

    if not isinstance(table, Mapping):
        raise UsageError(f"{where} must map modalities to orientation codes, got {table!r}")
    out = {}
    for modality, code in table.items():
        try:
            out[normalize_modality_name(str(modality))] = check_code(code)
        except UsageError as exc:
            raise UsageError(f"{where}[{modality!r}]: {exc}") from None
    return out


def model_table(inference: Mapping[str, Any] | None) -> dict[str, str]:
    """The orientation table of a checkpoint's ``inference`` config: its own, else :data:`DEFAULT_ORIENTATION`."""
    recorded = (inference or {}).get("orientation")
    if recorded is None:
        return dict(DEFAULT_ORIENTATION)
    return check_table(recorded)


def _matrix(direction: Any) -> np.ndarray:
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"direction matrix has non-finite entries: {direction}")
    return matrix


def closest_code(direction: Any) -> str:
    """The axis-aligned orientation code closest to a (possibly oblique) row-major 3x3 direction matrix.

    Column j of the matrix is the LPS direction of index axis j. Each index axis is given a distinct world
    axis, choosing among the six assignments the one with the largest summed |cosine|; the letter's sign is
    that cosine's.
    """
    matrix = _matrix(direction)
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(matrix[p[j], j]) for j in range(3)))
    letters = []
    for j, axis in enumerate(best):
        positive = "LPS"[axis]
        letters.append(positive if matrix[axis, j] >= 0 else _OPPOSITE[positive])
    return "".join(letters)


@dataclass(frozen=True)
class Reorientation:
    """A permutation/flip of the index axes taking a grid from ``source`` code to ``target`` code.

    ``source_axis[k]`` is the input index axis (0 = x, 1 = y, 2 = z) that becomes index axis k, and
    ``flip[k]`` says whether it runs backwards. ``shape`` is the input's (z, y, x) shape.
    """

    source: str
    target: str
    source_axis: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    shape: tuple[int, int, int]

    @property
    def is_identity(self) -> bool:
        """True when nothing moves (the input is already in the target code)."""
        return self.source_axis == (0, 1, 2) and not any(self.flip)

    @property
    def _array_axes(self) -> tuple[int, int, int]:
        # New array axis m holds index axis 2 - m, which comes from input index axis source_axis[2 - m],
        # i.e. input array axis 2 - source_axis[2 - m].
        return tuple(2 - self.source_axis[2 - m] for m in range(3))  # type: ignore[return-value]

    @property
    def _flipped_array_axes(self) -> tuple[int, ...]:
        return tuple(2 - k for k in range(3) if self.flip[k])

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(z, y, x) shape on the reoriented grid."""
        return tuple(self.shape[a] for a in self._array_axes)  # type: ignore[return-value]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Input-grid array (trailing axes z, y, x) -> reoriented grid, as a view (no copy)."""
        if tuple(array.shape[-3:]) != self.shape:
            raise ValueError(f"array shape {array.shape} does not end with the input shape {self.shape}")
        if self.is_identity:
            return array
        lead = array.ndim - 3
        view = np.transpose(array, (*range(lead), *(lead + a for a in self._array_axes)))
        flipped = tuple(lead + a for a in self._flipped_array_axes)
        return np.flip(view, flipped) if flipped else view

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Reoriented-grid array (trailing axes z, y, x) -> the input grid exactly, as a view (no copy)."""
        if tuple(array.shape[-3:]) != self.output_shape:
            raise ValueError(f"array shape {array.shape} does not end with the reoriented shape {self.output_shape}")
        if self.is_identity:
            return array
        lead = array.ndim - 3
        flipped = tuple(lead + a for a in self._flipped_array_axes)
        if flipped:
            array = np.flip(array, flipped)
        inverse = np.argsort(self._array_axes)
        return np.transpose(array, (*range(lead), *(lead + int(a) for a in inverse)))

    def geometry(self, volume: Volume) -> tuple[tuple[float, float, float], tuple[float, float, float],
                                                 tuple[float, ...]]:
        """(spacing, origin, direction) of ``volume`` on the reoriented grid: same physical voxels."""
        matrix = _matrix(volume.direction)
        spacing = np.asarray(volume.spacing, dtype=np.float64)
        size_xyz = self.shape[::-1]
        index = np.zeros(3)  # the input index of the reoriented grid's first voxel
        for k, j in enumerate(self.source_axis):
            index[j] = size_xyz[j] - 1 if self.flip[k] else 0
        origin = np.asarray(volume.origin, dtype=np.float64) + matrix @ (spacing * index)
        columns = [matrix[:, j] * (-1.0 if self.flip[k] else 1.0) for k, j in enumerate(self.source_axis)]
        direction = np.stack(columns, axis=1)
        new_spacing = tuple(float(spacing[j]) for j in self.source_axis)
        return (new_spacing, tuple(float(v) for v in origin),  # type: ignore[return-value]
                tuple(float(v) for v in direction.ravel()))

    def volume(self, volume: Volume) -> Volume:
        """``volume`` on the reoriented grid (the array a view of the input's), same physical voxels."""
        if self.is_identity:
            return volume
        spacing, origin, direction = self.geometry(volume)
        return Volume(self.apply(volume.array), spacing, origin, direction, volume.path, volume.source_format,
                      volume.modality, dict(volume.meta))


def reorientation(direction: Any, shape: tuple[int, int, int], target: str) -> Reorientation:
    """The permutation/flip taking a grid of ``shape`` (z, y, x) and ``direction`` to the ``target`` code."""
    target = check_code(target)
    source = closest_code(direction)
    axes, flips = [], []
    for letter in target:
        world = LETTERS[letter][0]
        j = next(i for i, c in enumerate(source) if LETTERS[c][0] == world)
        axes.append(j)
        flips.append(source[j] != letter)
    return Reorientation(source, target, tuple(axes), tuple(flips),  # type: ignore[arg-type]
                         tuple(int(s) for s in shape))  # type: ignore[arg-type]


def reorient(volume: Volume, target: str) -> tuple[Volume, Reorientation]:
    """``volume`` permuted/flipped to ``target`` (a view, same physical voxels) and the map to undo it."""
    change = reorientation(volume.direction, volume.shape, target)
    return change.volume(volume), change


def index_to_physical(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y, z) index -> physical (LPS mm) matrix of a volume, and its origin."""
    direction = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    return direction @ np.diag(np.asarray(volume.spacing, dtype=np.float64)), np.asarray(volume.origin, float)


def grid_reorientation(source: Volume, target: Volume) -> Reorientation | None:
    """The permutation/flip that puts ``source``'s voxels onto ``target``'s grid, when both grids hold the same
    voxel centres (same spacing and extent, axes stored in another order or direction); None otherwise
    (other spacing, shifted origin, rotation)."""
    ms, os_ = index_to_physical(source)
    mt, ot = index_to_physical(target)
    to_target = np.linalg.solve(mt, np.column_stack([ms, os_ - ot]))  # source index -> target continuous index
    linear, offset = to_target[:, :3], to_target[:, 3]
    size_s = np.array(source.shape[::-1])
    size_t = np.array(target.shape[::-1])
    unit = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    mapped = (unit * (size_s - 1)) @ linear.T + offset
    signed_permutation = np.allclose(np.abs(linear).sum(axis=0), 1, atol=1e-3) and np.allclose(
        np.abs(np.round(linear)), np.abs(linear), atol=1e-3)
    if not (signed_permutation and np.allclose(mapped, np.round(mapped), atol=1e-2)):
        return None
    if {tuple(c) for c in np.round(mapped).tolist()} != {tuple(c) for c in (unit * (size_t - 1)).tolist()}:
        return None
    # Target index axis k is source index axis j, running backwards when the entry is negative.
    rounded = np.round(linear).astype(int)
    axes = tuple(int(np.flatnonzero(rounded[k])[0]) for k in range(3))
    flips = tuple(bool(rounded[k, axes[k]] < 0) for k in range(3))
    return Reorientation(closest_code(source.direction), closest_code(target.direction), axes,  # type: ignore[arg-type]
                         flips, tuple(int(s) for s in source.shape))  # type: ignore[arg-type]

