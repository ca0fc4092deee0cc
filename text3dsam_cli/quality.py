"""How plausible each label of a label map looks, and connected-component clean-up.

Per label value: ``voxels``, ``components`` (26-connected), ``largest_component_ml`` and ``touches_border`` (some voxel
lies on the volume's outer face: the structure may continue outside the field of view). Optionally, before
anything is written, :func:`assess_labels` keeps only the largest component of each label and/or drops
components smaller than a volume in ml; removed voxels become background (0).

One pass labels the components of every label value at once (``connected-components-3d`` multi-label mode:
touching voxels of different values are different components), a second gives each component's size and
owner (a run-length pass over the component map). That costs the same whatever the labels look like; the earlier
per-label pass cost one whole-volume labelling per prompt when masks were scattered (see ``docs/performance.md``).
A report without clean-up on a large map labels it in slabs of slices joined across the cuts, so no whole-volume
component map (4 bytes per voxel) is ever allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cc3d
import numpy as np

from text3dsam_cli.parallel import map_shares, thread_budget

CONNECTIVITY = 26


#: Voxels per block of the run-length pass of :func:`_components` (16 M: a 16 MB mask and modest index arrays).
RUN_BLOCK = 1 << 24
#: Voxels per slab (whole slices) of the report-only labelling of large maps (:func:`_figures_by_slab`).
LABEL_SLAB_VOXELS = 1 << 24


def _run_figures(ids_flat: np.ndarray, labels_flat: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Owner (label value) and voxel count of each component id 0..count of a flat component map, from the runs of
    equal ids along the raster order (one comparison per voxel, then work per run only)."""
    owner = np.zeros(count + 1, dtype=labels_flat.dtype)
    # blocks of at most RUN_BLOCK voxels, and at least one per worker (so that a 16 M-voxel slab splits too)
    block = min(RUN_BLOCK, max(1, -(-ids_flat.size // thread_budget())))

    def runs(starts: Sequence[int]) -> np.ndarray:
        """Voxel counts per id over the blocks at ``starts``; owners written into ``owner`` (a component has
        one label, so workers that meet the same id write the same value)."""
        sizes = np.zeros(count + 1, dtype=np.int64)
        edge = np.empty(min(block, ids_flat.size), dtype=bool)
        for start in starts:
            ids = ids_flat[start:start + block]
            first = edge[: ids.size]
            first[0] = True
            np.not_equal(ids[1:], ids[:-1], out=first[1:])
            run_starts = np.flatnonzero(first)
            run_ids = ids[run_starts]
            lengths = np.diff(run_starts, append=ids.size)
            sizes += np.bincount(run_ids, weights=lengths, minlength=count + 1).astype(np.int64)
            owner[run_ids] = labels_flat[start:start + block][run_starts]
        return sizes

    # numpy releases the GIL in these passes: blocks are shared among parallel.thread_budget() threads
    # (0.59-0.64 s -> 0.36-0.42 s on 2 cores for a 198 M-voxel map, timed in one process)
    return owner, sum(map_shares(runs, range(0, ids_flat.size, block)))


def _components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Component map, and per component id (0 = background): owning label value, voxel count, border contact.

    cc3d numbers components in raster order of their first voxel, so a lower id is earlier in raster order.
    Sizes and owners come from :func:`_run_figures`, border contact from the ids found on the six faces.
    """
    labels = np.ascontiguousarray(labels)  # raster order = C order (a flipped view is copied once)
    components, count = cc3d.connected_components(labels, connectivity=CONNECTIVITY, return_N=True)
    components = np.ascontiguousarray(components)
    owner, sizes = _run_figures(components.reshape(-1), labels.reshape(-1), count)
    border = np.zeros(count + 1, dtype=bool)
    for axis in range(components.ndim):
        for index in (0, -1):
            border[np.take(components, index, axis=axis)] = True
    return components, owner, sizes, border


def _cut_links(ids_a: np.ndarray, labels_a: np.ndarray, ids_b: np.ndarray,
               labels_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Links across the cut between two adjacent planes (a above b): the two planes are labelled together
    (26-connected, one label value per component), and each voxel links its global component id (``ids_a`` /
    ``ids_b``) to its joint component (numbered 1..n here). Returns (global ids, joint ids, n), one link per
    run of equal links along the raster order."""
    joint, count = cc3d.connected_components(np.stack([labels_a, labels_b]), connectivity=CONNECTIVITY,
                                             return_N=True)
    u = np.concatenate([ids_a.reshape(-1), ids_b.reshape(-1)])
    v = joint.reshape(-1).astype(np.int64)
    on = v > 0
    u, v = u[on], v[on]
    if u.size:
        new = np.empty(u.size, dtype=bool)
        new[0] = True
        np.not_equal(u[1:], u[:-1], out=new[1:])
        new[1:] |= v[1:] != v[:-1]
        u, v = u[new], v[new]
    return u, v, int(count)


def _roots(count: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Union-find over ids 0..count with the edges (u, v): each id's representative, the smallest id of its set
    (hook both roots of every edge to the smaller one, then compress paths, until every edge is inside a set)."""
    parent = np.arange(count + 1, dtype=np.int64)
    while u.size:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        pu, pv = pu[differ], pv[differ]
        low = np.minimum(pu, pv)
        np.minimum.at(parent, pu, low)
        np.minimum.at(parent, pv, low)
        while True:  # path compression: every id points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def _figures_by_slab(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per component (index 0 = background): owning label value, voxel count, border contact; as
    :func:`_components` gives them, without a whole-volume component map.

    The map is labelled in slabs of whole slices (LABEL_SLAB_VOXELS each) whose components are joined across
    each cut (:func:`_cut_links`, :func:`_roots`). A whole-body map's component map is 0.8 GB of fresh memory;
    its first touches in a new process cost as much as the labelling itself (docs/performance.md). Component
    order differs from :func:`_components` (only the figures are reported, never ids).
    """
    depth = labels.shape[0]
    rows = max(1, LABEL_SLAB_VOXELS // max(1, labels[:1].size))
    owners, sizes, borders = [np.zeros(1, dtype=labels.dtype)], [np.zeros(1, dtype=np.int64)], [np.zeros(1, bool)]
    links: list[tuple[np.ndarray, np.ndarray, int]] = []
    offset = 0
    previous: tuple[np.ndarray, np.ndarray] | None = None
    for z0 in range(0, depth, rows):
        slab = np.ascontiguousarray(labels[z0:z0 + rows])
        local, count = cc3d.connected_components(slab, connectivity=CONNECTIVITY, return_N=True)
        local = np.ascontiguousarray(local)
        owner, size = _run_figures(local.reshape(-1), slab.reshape(-1), count)
        border = np.zeros(count + 1, dtype=bool)
        faces = [local[:, 0], local[:, -1], local[:, :, 0], local[:, :, -1]]
        if z0 == 0:
            faces.append(local[0])
        if z0 + rows >= depth:
            faces.append(local[-1])
        for face in faces:
            border[face] = True
        first = np.where(local[0] > 0, local[0].astype(np.int64) + offset, 0)
        if previous is not None:
            links.append(_cut_links(previous[0], previous[1], first, slab[0]))
        previous = (np.where(local[-1] > 0, local[-1].astype(np.int64) + offset, 0), slab[-1])
        owners.append(owner[1:])
        sizes.append(size[1:])
        borders.append(border[1:])
        offset += count
        del local  # freed before the next slab's labelling allocates its map
    owner, size, border = np.concatenate(owners), np.concatenate(sizes), np.concatenate(borders)
    # the joint components of the cuts become nodes offset+1, offset+2, ...: after every real component, so
    # that each set's representative (its smallest id) is a real one
    us, vs, extra = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)], offset
    for u, v, count in links:
        us.append(u)
        vs.append(v + extra)
        extra += count
    root = _roots(extra, np.concatenate(us), np.concatenate(vs))[: offset + 1]
    keep = np.flatnonzero(root == np.arange(offset + 1))  # one representative per component, 0 first
    index = np.zeros(offset + 1, dtype=np.int64)
    index[keep] = np.arange(keep.size)
    merged = index[root]
    total = np.bincount(merged, weights=size, minlength=keep.size).astype(np.int64)
    touches = np.bincount(merged, weights=border, minlength=keep.size) > 0
    total[0], touches[0] = 0, False
    return owner[keep], total, touches


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
    if present and not clean and labels.ndim == 3 and labels.size > LABEL_SLAB_VOXELS:
        owner, sizes, border = _figures_by_slab(labels)  # a report only: no component map needed
    elif present:
        components, owner, sizes, border = _components(labels)
    if present:
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
