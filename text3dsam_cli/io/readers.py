"""``read_volume``: one entry point for every input format of :mod:`text3dsam_cli.io.formats`.

The format comes from the file name's ending (or, for DICOM files without ``.dcm``, the content) and its
registry class reads it: single-file images through SimpleITK (:mod:`text3dsam_cli.io.images`), DICOM series
(:mod:`text3dsam_cli.io.dicom`), challenge npz (:mod:`text3dsam_cli.io.npz`). Every reader gives a single-channel
3-D :class:`Volume` of finite numbers or raises an :class:`InputError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from text3dsam_cli.errors import InputError
from text3dsam_cli.io import formats
from text3dsam_cli.io.volume import Volume

#: File name ending -> format name, for every ending ``read_volume`` recognises (derived from the registry).
SUFFIX_FORMATS: dict[str, str] = {s: f.name for f in formats.INPUT_FORMATS for s in f.suffixes}

def image_format(path: str | os.PathLike[str]) -> str | None:
    """The format a file name's ending stands for ("nifti", "nrrd", "metaimage", "npz", "dicom"), or None."""
    fmt = formats.input_format(path)
    return None if fmt is None else fmt.name


def strip_image_suffix(name: str) -> str:
    """A file name without its image ending (``case.nii.gz`` -> ``case``); other names unchanged."""
    return formats.strip_suffix(name)


def read_volume(path: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """Read an input image as a :class:`Volume`.

    ``path`` may be a file of any input format (:data:`text3dsam_cli.io.formats.INPUT_FORMATS`: NIfTI, NRRD,
    MetaImage, challenge ``.npz``, one DICOM file, whose series is read) or a DICOM series folder.
    ``series_uid`` picks a series in a DICOM folder holding several (default: the one with the most files).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    if path.is_dir():
        return _read_folder(path, series_uid)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot access ({exc.strerror or exc})", path) from None
    if size == 0:
        raise InputError("empty file (0 bytes)", path)
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable (permission denied)", path)
    fmt = formats.detect_format(path)
    if fmt is None:
        raise InputError(f"unsupported file type (expected {formats.describe_inputs()})", path)
    return fmt.read(path, series_uid)


def _read_folder(folder: Path, series_uid: str | None) -> Volume:
    from text3dsam_cli.io.dicom import folder_has_dicom_images

    readers = [f for f in formats.INPUT_FORMATS if f.reads_folders]
    if not folder_has_dicom_images(folder):
        names = " or ".join(f.noun for f in readers)
        raise InputError(f"no images in this folder (a folder input must be a {names})", folder)
    return readers[0].read(folder, series_uid)
