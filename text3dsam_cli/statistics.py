"""Intensity statistics per label (``segment --statistics``, TotalSegmentator's ``--statistics``).

For each label value: ``mean``, ``std`` (population, ddof 0), ``min``, ``p5``, ``median``, ``p95`` and ``max``
of the input image's own values inside the label, on the input grid: the values as read (Hounsfield units
for a CT, after the DICOM/NIfTI rescale slope and intercept), never the model's normalised 0..255 copy.
Percentiles follow numpy's default (linear interpolation). An empty label gets ``None`` for every figure.

One pass over the image serves every label: the foreground voxels (label > 0) are gathered once, grouped by
label with one stable sort of their label values (a radix sort for uint8/uint16 label maps), and each label's
figures come from its contiguous run of values. No full-size mask per label is ever made.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Keys of each label's ``intensity`` entry, in this order.
INTENSITY_KEYS = ("mean", "std", "min", "p5", "median", "p95", "max")
#: Decimals kept in the sidecar.
DECIMALS = 4


def _figures(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return dict.fromkeys(INTENSITY_KEYS)
    wide = values.astype(np.float64, copy=False)
    p5, median, p95 = np.percentile(wide, (5.0, 50.0, 95.0))
    figures = (wide.mean(), wide.std(), wide.min(), p5, median, p95, wide.max())
    return {key: round(float(v), DECIMALS) for key, v in zip(INTENSITY_KEYS, figures)}


def intensity_statistics(image: np.ndarray, labels: np.ndarray,
                         values: Sequence[int]) -> dict[int, dict[str, float | None]]:
    """Per label value in ``values``: the figures of :data:`INTENSITY_KEYS` of ``image`` where ``labels`` holds
    that value (``image`` and ``labels`` on the same grid)."""
    if image.shape != labels.shape:
        raise ValueError(f"image shape {image.shape} does not match label map shape {labels.shape}")
    wanted = [int(v) for v in values]
    inside = np.asarray(labels).reshape(-1)
    foreground = np.flatnonzero(inside > 0) if inside.dtype.kind == "i" else np.flatnonzero(inside)
    owners = inside[foreground]
    order = np.argsort(owners, kind="stable")
    owners = owners[order]
    gathered = np.asarray(image).reshape(-1)[foreground[order]]
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
