"""A NIfTI-1 input's two voxel-to-world matrices (qform, sform) and their codes: checked, reported, kept.

A NIfTI-1 header holds two matrices, each with a code saying whether it is set: the qform (a rotation
quaternion, an offset and ``pixdim``, with ``qform_code``) and the sform (three rows ``srow_x/y/z``, with
``sform_code``). ITK reads the voxels with one of them (or, with both codes 0, from ``pixdim`` alone) and writes
both from that one, with new codes. So a label map written by ITK alone would rewrite the other matrix and the
codes: a viewer that uses the other one would show the overlay off the image (mirrored, for instance).

Here, on reading (:func:`read_geometry`, :func:`check_geometry`, :func:`report_geometry`): a coded matrix with
a NaN or infinity is refused in one line before ITK sees it; when both codes are set and the matrices disagree,
one warning says which one the voxels were read with. The raw fields go into ``Volume.meta["nifti_header"]``,
and on writing a NIfTI-1 file of a volume on that same grid (:func:`patch_header`), the input's ``pixdim[0..3]``,
``qform_code``, ``sform_code``, quaternion, offsets and ``srow_x/y/z`` are written back exactly, so the label map
sits on the image in every viewer, whichever matrix it uses (both codes 0 stay 0: pixdim-only geometry).
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli.errors import InputError

log = logging.getLogger(__name__)

#: Byte offsets of the NIfTI-1 header fields kept (little-endian layout of the 348-byte header).
_DIM, _PIXDIM, _CODES, _QUATERN, _SROW = 40, 76, 252, 256, 280
#: World positions (mm) closer than this count as the same matrix.
AGREE_MM = 1e-3


def read_geometry(path: Path) -> dict[str, Any] | None:
    """The raw geometry fields of a NIfTI-1 file (either byte order), or None for anything else (NIfTI-2,
    unreadable: the readers report those)."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fp:
            raw = fp.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 348:
        return None
    for order in ("<", ">"):
        if struct.unpack(f"{order}i", raw[:4])[0] == 348:
            return {
                "shape_xyz": list(struct.unpack_from(f"{order}3h", raw, _DIM + 2)),
                "pixdim": list(struct.unpack_from(f"{order}4f", raw, _PIXDIM)),
                "qform_code": struct.unpack_from(f"{order}h", raw, _CODES)[0],
                "sform_code": struct.unpack_from(f"{order}h", raw, _CODES + 2)[0],
                "quatern": list(struct.unpack_from(f"{order}6f", raw, _QUATERN)),
                "srow": list(struct.unpack_from(f"{order}12f", raw, _SROW)),
            }
    return None


def qform_matrix(geometry: dict[str, Any]) -> np.ndarray:
    """The qform's 4x4 voxel-to-RAS matrix (NIfTI-1's quaternion formula, ``pixdim[0]`` the handedness)."""
    b, c, d, qx, qy, qz = (float(v) for v in geometry["quatern"])
    a = 1.0 - (b * b + c * c + d * d)
    a = np.sqrt(a) if a > 1e-7 else 0.0  # a 180-degree rotation: a = 0, as niftilib does
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if float(geometry["pixdim"][0]) < 0 else 1.0
    zooms = np.array([float(v) for v in geometry["pixdim"][1:4]]) * np.array([1.0, 1.0, qfac])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * zooms
    matrix[:3, 3] = [qx, qy, qz]
    return matrix


def sform_matrix(geometry: dict[str, Any]) -> np.ndarray:
    """The sform's 4x4 voxel-to-RAS matrix (``srow_x/y/z``)."""
    matrix = np.eye(4)
    matrix[:3, :] = np.asarray(geometry["srow"], dtype=np.float64).reshape(3, 4)
    return matrix


def check_geometry(path: Path, geometry: dict[str, Any]) -> None:
    """Refuse a coded matrix holding NaN or infinity (ITK would print warnings and guess a geometry)."""
    if geometry["sform_code"] > 0 and not np.isfinite(geometry["srow"]).all():
        raise InputError("the header's sform (srow_x/y/z) holds NaN or infinity: its voxel-to-world matrix is "
                         "unusable; fix the header (or set sform_code 0 to use the qform)", path)
    if geometry["qform_code"] > 0 and not np.isfinite([*geometry["quatern"], *geometry["pixdim"][:4]]).all():
        raise InputError("the header's qform (quatern_b/c/d, qoffset_x/y/z, pixdim) holds NaN or infinity: its "
                         "voxel-to-world matrix is unusable; fix the header (or set qform_code 0 to use the "
                         "sform)", path)


def _itk_matrix(spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]) -> np.ndarray:
    """The voxel-to-RAS matrix of geometry in ITK's (LPS) terms."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def report_geometry(path: Path, geometry: dict[str, Any], spacing: tuple[float, ...], origin: tuple[float, ...],
                    direction: tuple[float, ...]) -> dict[str, Any]:
    """Warn once when qform and sform are both set and disagree (naming the one the voxels were read with);
    return what ``Volume.meta["nifti_header"]`` keeps: the raw fields and the grid they were read as."""
    if geometry["qform_code"] > 0 and geometry["sform_code"] > 0:
        qform, sform = qform_matrix(geometry), sform_matrix(geometry)
        if not np.allclose(qform, sform, rtol=0, atol=AGREE_MM):
            read_as = _itk_matrix(spacing, origin, direction)
            used = ("the sform" if np.allclose(read_as, sform, rtol=0, atol=AGREE_MM) else
                    "the qform" if np.allclose(read_as, qform, rtol=0, atol=AGREE_MM) else "neither exactly")
            log.warning("%s: its qform (code %d) and sform (code %d) disagree; the voxels were read with %s (as "
                        "ITK does); the label map keeps both matrices and codes as in the input", path,
                        geometry["qform_code"], geometry["sform_code"], used)
    return {**geometry, "read_as": [list(map(float, spacing)), list(map(float, origin)), list(map(float, direction))]}


def patch_header(header: bytes, meta: dict[str, Any], shape_zyx: tuple[int, ...], spacing: tuple[float, ...],
                 origin: tuple[float, ...], direction: tuple[float, ...]) -> bytes:
    """``header`` (a little-endian NIfTI-1 header being written) with the input's qform, sform, codes and
    ``pixdim[0..3]`` (from ``meta["nifti_header"]``) when the volume is on the grid the input was read as;
    unchanged otherwise (another grid, or no NIfTI-1 input)."""
    kept = meta.get("nifti_header")
    if not kept or len(header) < 348:
        return header
    same_grid = (list(shape_zyx[::-1]) == list(kept["shape_xyz"])
                 and kept["read_as"] == [list(map(float, spacing)), list(map(float, origin)),
                                         list(map(float, direction))])
    if not same_grid:
        return header
    out = bytearray(header)
    struct.pack_into("<4f", out, _PIXDIM, *kept["pixdim"])
    struct.pack_into("<2h", out, _CODES, kept["qform_code"], kept["sform_code"])
    struct.pack_into("<6f", out, _QUATERN, *kept["quatern"])
    struct.pack_into("<12f", out, _SROW, *kept["srow"])
    return bytes(out)
