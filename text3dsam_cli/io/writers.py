"""Writing volumes (label maps, probability maps) with the geometry of the input they belong to.

Output formats are chosen by the file name: ``.nii.gz``/``.nii`` (NIfTI), ``.nrrd``, ``.mha`` (MetaImage,
single file) through SimpleITK, and ``.npz`` (challenge layout, key ``segs``). Every write is atomic.
SimpleITK has no float16 pixel type: float16 arrays are written as float32 to NIfTI/NRRD/MHA and kept as
float16 in ``.npz``. Boolean arrays are written as uint8.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from text3dsam_cli.errors import OutputError
from text3dsam_cli.io.atomic import atomic_path, disk_full
from text3dsam_cli.io.itk import captured_stderr, itk_path
from text3dsam_cli.io.npz import write_challenge_npz
from text3dsam_cli.io.readers import first_error_line, image_format
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.labels import label_dtype

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


def is_orthogonal(direction: tuple[float, ...] | list[float], tol: float = 1e-4) -> bool:
    """Whether a row-major 3x3 direction matrix is orthonormal (no shear), within ``tol``."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return bool(np.allclose(matrix.T @ matrix, np.eye(3), atol=tol))


def write_volume(volume: Volume, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (format from the name) with its exact geometry; return the path.

    ``.npz`` gets the challenge layout: the array under ``segs`` (no geometry, as the challenge expects).
    NIfTI cannot store a sheared (non-orthogonal) direction matrix, so such volumes are refused for NIfTI
    (NRRD and MetaImage keep them exactly). The written file is checked before it gets its final name
    (ITK reports some write errors, e.g. a full disk, only on stderr).
    """
    path = Path(path)
    fmt = image_format(path)
    name = path.name.lower()
    if not name.endswith(OUTPUT_SUFFIXES):
        hint = " (write .mha or .nrrd: header/data file pairs are not written)" if fmt else ""
        raise OutputError(f"unsupported output file type{hint}; use one of {', '.join(OUTPUT_SUFFIXES)}", path)
    if fmt == "npz":
        return write_challenge_npz(path, segs=np.asarray(volume.array))
    if fmt == "nifti" and not is_orthogonal(volume.direction):
        raise OutputError(SHEARED_NIFTI, path)
    image = volume_to_image(volume, path)
    data_bytes = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent()
    chatter: list[str] = []

    def check(tmp: Path) -> str | None:
        problem = verify_image_file(tmp, data_bytes)
        if problem is None and any("ERROR" in text.upper() for text in chatter):
            problem = "ITK reported a write error"
        return problem

    with atomic_path(path, verify=check) as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetUseCompression(compress)
        with itk_path(tmp) as itk_name, captured_stderr() as chatter:
            writer.SetFileName(itk_name)
            try:
                writer.Execute(image)
            except RuntimeError as exc:
                reason = "no space left on device" if disk_full(path.parent) else first_error_line(exc)
                raise OutputError(f"cannot write the image ({reason})", path) from None
    return path


SHEARED_NIFTI = ("the image's direction matrix is not orthogonal (sheared geometry), which NIfTI cannot store "
                 "(it would be coerced to a rotation); write .nrrd or .mha (--format nrrd), which keep it exactly")


def _gunzip_size(fp: Any) -> int:
    """Decompressed size of a gzip stream (raises on a truncated or corrupt one: the CRC is checked)."""
    total = 0
    with gzip.GzipFile(fileobj=fp, mode="rb") as gz:
        while chunk := gz.read(1 << 22):
            total += len(chunk)
    return total


def _zlib_size(fp: Any) -> int:
    """Decompressed size of a complete zlib stream (raises when it is truncated)."""
    decomp = zlib.decompressobj()
    total = 0
    while chunk := fp.read(1 << 22):
        total += len(decomp.decompress(chunk))
        if decomp.eof:
            break
    total += len(decomp.flush())
    if not decomp.eof:
        raise EOFError("compressed data end early")
    return total


def _text_header(fp: Any, end_marker: bytes | None) -> tuple[dict[str, str], int]:
    """``key: value`` / ``key = value`` lines up to a blank line (NRRD) or the ``ElementDataFile`` line (MHA)."""
    fields: dict[str, str] = {}
    for _ in range(400):
        line = fp.readline(1 << 16)
        if not line or line in (b"\n", b"\r\n"):
            break
        text = line.decode("latin-1").strip()
        sep = "=" if "=" in text and (":" not in text or text.index("=") < text.index(":")) else ":"
        key, _, value = text.partition(sep)
        fields[key.strip().lower()] = value.strip().lstrip("=").strip()
        if end_marker is not None and line.lstrip().lower().startswith(end_marker):
            break
    return fields, fp.tell()


def verify_image_file(path: Path, data_bytes: int) -> str | None:
    """None when ``path`` (a freshly written NIfTI/NRRD/MHA file) holds all ``data_bytes`` of voxel data, else
    what is wrong. Compressed data is decompressed (checking its CRC) without keeping it in memory."""
    name = path.name.lower()
    size = path.stat().st_size
    try:
        with open(path, "rb") as fp:
            if name.endswith(".nii.gz"):
                got = _gunzip_size(fp)
                return None if got >= data_bytes + 348 else f"{got} bytes of NIfTI data, expected {data_bytes}"
            if name.endswith(".nii"):
                return None if size >= data_bytes + 348 else f"{size} bytes written, expected {data_bytes + 348}"
            if name.endswith(".nrrd"):
                fields, start = _text_header(fp, None)
                encoding = fields.get("encoding", "raw")
                if "data file" in fields or "datafile" in fields:
                    return None
                got = _gunzip_size(fp) if encoding in ("gzip", "gz") else size - start
                return None if got >= data_bytes else f"{got} bytes of NRRD data, expected {data_bytes}"
            if name.endswith(".mha"):
                fields, start = _text_header(fp, b"elementdatafile")
                compressed = fields.get("compresseddata", "false").lower() == "true"
                got = _zlib_size(fp) if compressed else size - start
                return None if got >= data_bytes else f"{got} bytes of MetaImage data, expected {data_bytes}"
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        return f"the written file is truncated or corrupt ({exc})"
    return None


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
