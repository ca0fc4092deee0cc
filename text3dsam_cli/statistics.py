"""Intensity statistics per label (``segment --statistics``, TotalSegmentator's ``--statistics``).

For each label value: ``mean``, ``std`` (population, ddof 0), ``min``, ``p5``, ``median``, ``p95`` and ``max``
of the input image's own values inside the label, on the input grid: the values as read (Hounsfield units
for a CT, after the DICOM/NIfTI rescale slope and intercept), never the model's normalised 0..255 copy.
Percentiles follow numpy's default (linear interpolation). An empty label gets ``None`` for every figure.

One pass over the image serves every label; no full-size mask per label is ever made:

* integer images of at most 16 bits (CT in HU, most MR): one histogram per label, filled slab by slab with one
  ``bincount`` of ``label index * value range + value``; every figure comes from the histograms (exactly the
  sorted values' figures: mean and percentiles equal numpy's on the values, std to rounding);
* other images (float, 32-bit): the foreground voxels are gathered once, grouped by label with one stable sort
  of their label values (a radix sort for uint8/uint16 label maps), and each label's figures come from its
  run of values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Keys of each label's ``intensity`` entry, in this order.
INTENSITY_KEYS = ("mean", "std", "min", "p5", "median", "p95", "max")
#: Decimals kept in the sidecar.
DECIMALS = 4
PERCENTILES = (5.0, 50.0, 95.0)
#: Largest histogram table (labels x value range) of the integer path; beyond it the sorting path is used.
HISTOGRAM_BINS = 1 << 22
#: Voxels per slab of the histogram pass (bounds its temporary arrays: about 12 bytes per voxel of a slab).
SLAB_VOXELS = 1 << 22


def _rounded(figures: Sequence[float]) -> dict[str, float | None]:
    return {key: round(float(v), DECIMALS) for key, v in zip(INTENSITY_KEYS, figures)}


def _figures(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return dict.fromkeys(INTENSITY_KEYS)
    wide = values.astype(np.float64, copy=False)
    p5, median, p95 = np.percentile(wide, PERCENTILES)
    return _rounded((wide.mean(), wide.std(), wide.min(), p5, median, p95, wide.max()))


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's linear interpolation between neighbours, rounding as numpy does (from the nearer end)."""
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def _histogram_figures(counts: np.ndarray, low: int) -> dict[str, float | None]:
    """The figures of the values ``low + i`` repeated ``counts[i]`` times."""
    n = int(counts.sum())
    if n == 0:
        return dict.fromkeys(INTENSITY_KEYS)
    present = np.flatnonzero(counts)
    values = (present + low).astype(np.float64)
    weights = counts[present].astype(np.float64)
    mean = float(np.dot(weights, values)) / n  # integer sums are exact in float64 (< 2**53)
    std = float(np.sqrt(np.dot(weights, (values - mean) ** 2) / n))
    ends = np.cumsum(counts[present])  # sorted position k holds values[searchsorted(ends, k, "right")]

    def at(k: int) -> float:
        return float(values[int(np.searchsorted(ends, k, side="right"))])

    quantiles = []
    for q in PERCENTILES:
        position = q / 100.0 * (n - 1)
        below = int(np.floor(position))
        quantiles.append(_lerp(at(below), at(min(below + 1, n - 1)), position - below))
    return _rounded((mean, std, values[0], *quantiles, values[-1]))


def _by_histograms(image: np.ndarray, labels: np.ndarray, wanted: list[int], low: int,
                   span: int) -> dict[int, dict[str, float | None]]:
    index = np.zeros(max(wanted) + 1, dtype=np.int32)  # label value -> row 1..K (0: not wanted / background)
    index[wanted] = np.arange(1, len(wanted) + 1, dtype=np.int32)
    flat_image, flat_labels = image.reshape(-1), labels.reshape(-1)
    table = np.zeros((len(wanted) + 1) * span, dtype=np.int64)
    for start in range(0, flat_labels.size, SLAB_VOXELS):
        part = flat_labels[start:start + SLAB_VOXELS]
        rows = index[np.minimum(part, len(index) - 1)] if part.dtype.kind == "u" else \
            index[np.clip(part, 0, len(index) - 1)]
        rows[part >= len(index)] = 0
        rows *= span
        rows += flat_image[start:start + SLAB_VOXELS]
        if low:
            rows -= low
        table += np.bincount(rows, minlength=table.size)
    table = table.reshape(len(wanted) + 1, span)
    return {value: _histogram_figures(table[row], low) for row, value in enumerate(wanted, start=1)}


def _by_sorting(image: np.ndarray, labels: np.ndarray, wanted: list[int]) -> dict[int, dict[str, float | None]]:
    inside = labels.reshape(-1)
    foreground = np.flatnonzero(inside > 0) if inside.dtype.kind == "i" else np.flatnonzero(inside)
    owners = inside[foreground]
    order = np.argsort(owners, kind="stable")
    owners = owners[order]
    gathered = image.reshape(-1)[foreground[order]]
    del foreground, order
    edges = np.flatnonzero(owners[1:] != owners[:-1]) + 1  # where the sorted label values change
    starts = np.concatenate(([0], edges)) if owners.size else np.empty(0, dtype=np.int64)
    ends = np.concatenate((edges, [owners.size])) if owners.size else starts
    where = {int(owners[s]): (int(s), int(e - s)) for s, e in zip(starts, ends)}
    out: dict[int, dict[str, float | None]] = {}
    for value in wanted:
        start, count = where.get(value, (0, 0))
        out[value] = _figures(gathered[start:start + count])
    return out


def intensity_statistics(image: np.ndarray, labels: np.ndarray,
                         values: Sequence[int]) -> dict[int, dict[str, float | None]]:
    """Per label value in ``values``: the figures of :data:`INTENSITY_KEYS` of ``image`` where ``labels`` holds
    that value (``image`` and ``labels`` on the same grid)."""
    if image.shape != labels.shape:
        raise ValueError(f"image shape {image.shape} does not match label map shape {labels.shape}")
    wanted = sorted({int(v) for v in values if int(v) > 0})
    image, labels = np.asarray(image), np.asarray(labels)
    found: dict[int, dict[str, float | None]] = {}
    if wanted and image.size:
        if image.dtype.kind in "iu" and image.dtype.itemsize <= 2 and labels.dtype.kind in "iu":
            low, high = int(image.min()), int(image.max())
            span = high - low + 1
            if (len(wanted) + 1) * span <= HISTOGRAM_BINS:
                found = _by_histograms(image, labels, wanted, low, span)
        if not found:
            found = _by_sorting(image, labels, wanted)
    empty = dict.fromkeys(INTENSITY_KEYS)
    return {int(v): dict(found.get(int(v), empty)) for v in values}
