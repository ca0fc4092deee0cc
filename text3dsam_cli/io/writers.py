"""Writing volumes (label maps, probability maps) with the geometry of the input they belong to.

The output format is chosen by the file name through the registry (:mod:`text3dsam_cli.io.formats`: ``.nii.gz``/
``.nii`` NIfTI, ``.nrrd``, ``.mha`` single-file MetaImage through SimpleITK, ``.npz`` challenge layout with key
``segs``). Every write is atomic. SimpleITK has no float16 pixel type: float16 arrays are written as float32 to
NIfTI/NRRD/MHA and kept as float16 in ``.npz``. Boolean arrays are written as uint8.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from text3dsam_cli.errors import OutputError
from text3dsam_cli.io import formats
from text3dsam_cli.io.images import SHEARED_NIFTI, is_orthogonal, verify_image_file, volume_to_image
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.labels import label_dtype

__all__ = ["OUTPUT_SUFFIXES", "SHEARED_NIFTI", "is_orthogonal", "label_dtype", "verify_image_file", "volume_to_image",
           "write_label_map", "write_volume"]

#: File name endings ``write_volume`` accepts (from the registry).
OUTPUT_SUFFIXES = formats.OUTPUT_SUFFIXES


def write_volume(volume: Volume, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (format from the name, see :mod:`~text3dsam_cli.io.formats`) with its exact
    geometry; return the path.

    ``.npz`` gets the challenge layout: the array under ``segs`` (no geometry, as the challenge expects).
    NIfTI cannot store a sheared (non-orthogonal) direction matrix, so such volumes are refused for NIfTI
    (NRRD and MetaImage keep them exactly).
    """
    path = Path(path)
    fmt = formats.output_format(path)
    if fmt is None:
        raise OutputError(f"unsupported output file type{formats.unwritable_hint(path)}; use one of "
                          f"{', '.join(OUTPUT_SUFFIXES)}", path)
    return fmt.write_volume(volume, path, compress)


def write_label_map(labels: np.ndarray, like: Volume, path: str | os.PathLike[str]) -> Path:
    """Write an integer label map (z, y, x) with the geometry of ``like`` (uint8, or uint16 above 255)."""
    path = Path(path)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu":
        raise OutputError(f"a label map must hold integers, got dtype {labels.dtype}", path)
    if labels.size and labels.dtype.kind == "i" and int(labels.min()) < 0:
        raise OutputError("a label map cannot hold negative labels", path)
    if tuple(labels.shape) != like.shape:
        raise OutputError(f"label map shape {labels.shape} does not match the image shape {like.shape}", path)
    dtype = label_dtype(labels)
    if labels.dtype != dtype:
        labels = labels.astype(dtype)
    return write_volume(like.with_array(labels), path)
