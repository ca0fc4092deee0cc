"""How plausible each label of a label map looks, and connected-component clean-up.

Per label value: ``components`` (26-connected), ``largest_component_ml`` and ``touches_border`` (some voxel
lies on the volume's outer face: the structure may continue outside the field of view). Optionally, before
anything is written, :func:`assess_labels` keeps only the largest component of each label and/or drops
components smaller than a volume in ml; removed voxels become background (0).

Each label is analysed inside its own bounding box (one ``scipy.ndimage.find_objects`` pass over the map),
never the whole volume per label; components are labelled with ``connected-components-3d`` (cc3d), measured
4-6x faster than ``scipy.ndimage.label`` on a 300x512x512 map (see ``docs/dependencies.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage

CONNECTIVITY = 26


def _boxes(labels: np.ndarray, values: Sequence[int]) -> dict[int, tuple[slice, ...]]:
    """Bounding box of each label value present (absent values are left out)."""
    top = max((int(v) for v in values), default=0)
    if top <= 0 or labels.size == 0:
        return {}
    found = ndimage.find_objects(labels, max_label=top)
    return {int(v): found[int(v) - 1] for v in values if 0 < int(v) <= top and found[int(v) - 1] is not None}


def _touches_border(box: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    return any(s.start == 0 or s.stop == n for s, n in zip(box, shape))


def assess_labels(labels: np.ndarray, values: Sequence[int], voxel_ml: float, largest_component: bool = False,
                  min_size_ml: float | None = None) -> dict[int, dict[str, Any]]:
    """Per label value: ``components``, ``largest_component_ml``, ``touches_border`` of ``labels``.

    With ``largest_component`` (keep one component per label) or ``min_size_ml`` (drop components smaller than
    that), ``labels`` is cleaned **in place** first and the figures describe the cleaned map; each entry then
    also gives ``removed_ml``. Ties for the largest component go to the first in raster order.
    """
    clean = largest_component or (min_size_ml is not None and min_size_ml > 0)
    report: dict[int, dict[str, Any]] = {}
    boxes = _boxes(labels, values)
    for value in (int(v) for v in values):
        entry: dict[str, Any] = {"components": 0, "largest_component_ml": 0.0, "touches_border": False}
        if clean:
            entry["removed_ml"] = 0.0
        report[value] = entry
        box = boxes.get(value)
        if box is None:
            continue
        region = labels[box]  # a view: clean-up writes through it
        components, count = cc3d.connected_components(region == value, connectivity=CONNECTIVITY, return_N=True)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        keep = np.ones(count, dtype=bool)
        if largest_component and count > 1:
            keep[:] = False
            keep[int(np.argmax(sizes))] = True
        if min_size_ml is not None and min_size_ml > 0:
            keep &= sizes * voxel_ml >= min_size_ml
        if not keep.all():
            drop = np.concatenate([[False], ~keep])
            region[drop[components]] = 0
            entry["removed_ml"] = round(float(sizes[~keep].sum()) * voxel_ml, 4)
            sizes = sizes[keep]
            remaining = ndimage.find_objects((region == value).astype(np.uint8))
            if not remaining or remaining[0] is None:
                continue
            box = tuple(slice(b.start + r.start, b.start + r.stop) for b, r in zip(box, remaining[0]))
        entry["components"] = int(sizes.size)
        entry["largest_component_ml"] = round(float(sizes.max()) * voxel_ml, 4)
        entry["touches_border"] = _touches_border(box, labels.shape)
    return report


def flags(entry: dict[str, Any]) -> list[str]:
    """Short words for a sidecar ``labels[i]`` entry: ``empty``, ``touches border``, ``removed X ml``."""
    out = []
    if not entry.get("voxels", entry.get("components", 0)):
        out.append("empty")
    if entry.get("touches_border"):
        out.append("touches border")
    if entry.get("removed_ml"):
        out.append(f"removed {entry['removed_ml']:g} ml")
    return out
