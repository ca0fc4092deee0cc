"""How plausible each label of a label map looks, and connected-component clean-up.

Per label value: ``voxels``, ``components`` (26-connected), ``largest_component_ml`` and ``touches_border`` (some voxel
lies on the volume's outer face: the structure may continue outside the field of view). Optionally, before
anything is written, :func:`assess_labels` keeps only the largest component of each label and/or drops
components smaller than a volume in ml; removed voxels become background (0).

One pass labels the components of every label value at once (``connected-components-3d`` multi-label mode:
touching voxels of different values are different components), a second gives each component's size and
owner (a run-length pass over the component map). That costs the same whatever the labels look like; the earlier
per-label pass cost one whole-volume labelling per prompt when masks were scattered (see ``docs/performance.md``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cc3d
import numpy as np

CONNECTIVITY = 26


#: Threads of the run-length pass of :func:`_components` (at most; one per core).
RUN_WORKERS = 4
#: Voxels per block of the run-length pass of :func:`_components` (16 M: a 16 MB mask and modest index arrays).
RUN_BLOCK = 1 << 24


def _components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Component map, and per component id (0 = background): owning label value, voxel count, border contact.

    cc3d numbers components in raster order of their first voxel, so a lower id is earlier in raster order.
    Sizes and owners come from the runs of equal ids along the raster order (one comparison per voxel, then
    work per run only), border contact from the ids found on the six faces.
    """
    labels = np.ascontiguousarray(labels)  # raster order = C order (a flipped view is copied once)
    components, count = cc3d.connected_components(labels, connectivity=CONNECTIVITY, return_N=True)
    components = np.ascontiguousarray(components)
    ids_flat, labels_flat = components.reshape(-1), labels.reshape(-1)
    owner = np.zeros(count + 1, dtype=labels.dtype)

    def runs(starts: Sequence[int]) -> np.ndarray:
        """Voxel counts per id over the blocks at ``starts``; owners written into ``owner`` (a component has
        one label, so workers that meet the same id write the same value)."""
        sizes = np.zeros(count + 1, dtype=np.int64)
        edge = np.empty(min(RUN_BLOCK, ids_flat.size), dtype=bool)
        for start in starts:
            block = ids_flat[start:start + RUN_BLOCK]
            first = edge[: block.size]
            first[0] = True
            np.not_equal(block[1:], block[:-1], out=first[1:])
            run_starts = np.flatnonzero(first)
            run_ids = block[run_starts]
            lengths = np.diff(run_starts, append=block.size)
            sizes += np.bincount(run_ids, weights=lengths, minlength=count + 1).astype(np.int64)
            owner[run_ids] = labels_flat[start:start + RUN_BLOCK][run_starts]
        return sizes

    # numpy releases the GIL in these passes: blocks are shared among threads (0.59-0.64 s -> 0.36-0.42 s on
    # 2 cores for a 198 M-voxel map)
    starts = list(range(0, ids_flat.size, RUN_BLOCK))
    workers = min(RUN_WORKERS, len(starts), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            sizes = sum(pool.map(runs, [starts[i::workers] for i in range(workers)]))
    else:
        sizes = runs(starts)
    border = np.zeros(count + 1, dtype=bool)
    for axis in range(components.ndim):
        for index in (0, -1):
            border[np.take(components, index, axis=axis)] = True
    return components, owner, sizes, border


def assess_labels(labels: np.ndarray, values: Sequence[int], voxel_ml: float, largest_component: bool = False,
                  min_size_ml: float | None = None) -> dict[int, dict[str, Any]]:
    """Per label value: ``voxels``, ``components``, ``largest_component_ml``, ``touches_border`` of ``labels``.

    With ``largest_component`` (keep one component per label) or ``min_size_ml`` (drop components smaller than
    that), ``labels`` is cleaned **in place** first and the figures describe the cleaned map; each entry then
    also gives ``removed_ml``. Ties for the largest component go to the first in raster order.
    """
    clean = largest_component or (min_size_ml is not None and min_size_ml > 0)
    report: dict[int, dict[str, Any]] = {}
    wanted = [int(v) for v in values]
    present = labels.size > 0 and any(v > 0 for v in wanted)
    if present:
        components, owner, sizes, border = _components(labels)
        drop = np.zeros(owner.shape, dtype=bool)
    for value in wanted:
        entry: dict[str, Any] = {"voxels": 0, "components": 0, "largest_component_ml": 0.0, "touches_border": False}
        if clean:
            entry["removed_ml"] = 0.0
        report[value] = entry
        if not present or value <= 0:
            continue
        ids = np.flatnonzero(owner == value)
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        keep = np.ones(ids.size, dtype=bool)
        if largest_component and ids.size > 1:
            keep[:] = False
            keep[int(np.argmax(sizes[ids]))] = True  # first maximum = first in raster order
        if min_size_ml is not None and min_size_ml > 0:
            keep &= sizes[ids] * voxel_ml >= min_size_ml
        if not keep.all():
            drop[ids[~keep]] = True
            entry["removed_ml"] = round(float(sizes[ids[~keep]].sum()) * voxel_ml, 4)
            ids = ids[keep]
        if ids.size == 0:
            continue
        entry["voxels"] = int(sizes[ids].sum())
        entry["components"] = int(ids.size)
        entry["largest_component_ml"] = round(float(sizes[ids].max()) * voxel_ml, 4)
        entry["touches_border"] = bool(border[ids].any())
    if present and drop.any():
        labels[drop[components]] = 0
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
