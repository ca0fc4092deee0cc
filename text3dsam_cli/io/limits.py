"""The size limit for images, checked from headers before any voxel is allocated.

A small file can claim a huge image (a 1 KB NRRD header declaring 1200^3 voxels, a 1 MB npz whose ``imgs``
expands to 1 GiB). Every reader checks the voxel count its header declares against :func:`max_voxels`
first: ``TEXT3DSAM_MAX_VOXELS`` (default 536,870,912 = 2^29 voxels, e.g. 1024 x 1024 x 512; about 2 GiB once
converted to float32 for the model). Set the variable to raise the limit for genuinely large scans.
"""

from __future__ import annotations

import os
from pathlib import Path

from text3dsam_cli.errors import InputError, UsageError

MAX_VOXELS_ENV = "TEXT3DSAM_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 1 << 29


def max_voxels() -> int:
    """The voxel limit in force (``TEXT3DSAM_MAX_VOXELS``, else the default)."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"{MAX_VOXELS_ENV}={os.environ[MAX_VOXELS_ENV]!r}: expected a positive number of voxels")
    return value


def check_voxel_count(shape: tuple[int, ...] | list[int], path: Path | str | None, what: str = "the image") -> int:
    """Refuse a declared shape above the limit (before allocation); return its voxel count."""
    count = 1
    for n in shape:
        count *= int(n)
    limit = max_voxels()
    if count > limit:
        shown = "x".join(str(int(n)) for n in shape)
        raise InputError(f"{what} declares {shown} = {count:,} voxels, more than the limit of {limit:,} "
                         f"(set {MAX_VOXELS_ENV} to raise it)", path)
    return count
