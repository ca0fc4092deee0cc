"""Writing volumes (label maps, probability maps) with the geometry of the input they belong to.

Output formats are chosen by the file name: ``.nii.gz``/``.nii`` (NIfTI), ``.nrrd``, ``.mha`` (MetaImage,
single file) through SimpleITK, and ``.npz`` (challenge layout, key ``segs``). Every write is atomic.
SimpleITK has no float16 pixel type: float16 arrays are written as float32 to NIfTI/NRRD/MHA and kept as
float16 in ``.npz``. Boolean arrays are written as uint8.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from text3dsam_cli.errors import OutputError
from text3dsam_cli.io.atomic import atomic_path
from text3dsam_cli.io.npz import write_challenge_npz
from text3dsam_cli.io.readers import first_error_line, image_format
from text3dsam_cli.io.volume import Volume

#: File name endings ``write_volume`` accepts.
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".npz")


def _sitk_array(array: np.ndarray, path: Path) -> np.ndarray:
    """The array in a dtype SimpleITK can write (bool -> uint8, float16 -> float32)."""
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype.kind not in "biuf":
        raise OutputError(f"cannot write an array of dtype {array.dtype} as an image", path)
    return array


def volume_to_image(volume: Volume, path: Path | None = None) -> sitk.Image:
    """A SimpleITK image of ``volume.array`` carrying exactly the volume's origin, spacing and direction."""
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise OutputError(f"expected a 3-D (z, y, x) array, got shape {array.shape}", path)
    image = sitk.GetImageFromArray(_sitk_array(array, path or Path("?")), isVector=False)
    try:
        image.SetSpacing([float(v) for v in volume.spacing])
        image.SetOrigin([float(v) for v in volume.origin])
        image.SetDirection([float(v) for v in volume.direction])
    except RuntimeError as exc:
        raise OutputError(f"invalid geometry for writing ({first_error_line(exc)})", path) from None
    return image


def write_volume(volume: Volume, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (format from the name) with its exact geometry; return the path.

    ``.npz`` gets the challenge layout: the array under ``segs`` (no geometry, as the challenge expects).
    """
    path = Path(path)
    fmt = image_format(path)
    name = path.name.lower()
    if not name.endswith(OUTPUT_SUFFIXES):
        hint = " (write .mha or .nrrd: header/data file pairs are not written)" if fmt else ""
        raise OutputError(f"unsupported output file type{hint}; use one of {', '.join(OUTPUT_SUFFIXES)}", path)
    if fmt == "npz":
        return write_challenge_npz(path, segs=np.asarray(volume.array))
    image = volume_to_image(volume, path)
    with atomic_path(path) as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.SetUseCompression(compress)
        try:
            writer.Execute(image)
        except RuntimeError as exc:
            raise OutputError(f"cannot write the image ({first_error_line(exc)})", path) from None
    return path


def label_dtype(labels: np.ndarray) -> np.dtype:
    """Smallest unsigned dtype for a label map: uint8 up to 255, uint16 up to 65535, else uint32."""
    top = int(labels.max()) if labels.size else 0
    if top <= 255:
        return np.dtype(np.uint8)
    if top <= 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


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
