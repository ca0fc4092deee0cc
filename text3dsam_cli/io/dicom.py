"""DICOM series discovery and reading (SimpleITK/GDCM for pixels and geometry, pydicom for tags).

Series rule: a folder is scanned (not recursively) with GDCM, which groups files by SeriesInstanceUID and
sorts each series' slices geometrically. Non-image objects (SEG, RTSTRUCT, SR, ...) are ignored. When several
image series remain, the one with the most files is read (ties: the lexicographically smallest UID), unless
``series_uid`` names one; a folder read without ``series_uid`` that holds other image series gets one warning
naming them and ``--series``. The series read is identified in ``Volume.meta["dicom_series"]`` (its
StudyInstanceUID, SeriesInstanceUID, SeriesDescription and Modality), which the sidecar records.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from text3dsam_cli.errors import InputError
from text3dsam_cli.io.atomic import encodable
from text3dsam_cli.io.itk import (
    first_error_line,
    itk_path,
    numpy_dtype,
    simpleitk,
    volume_from_array,
    volume_from_image,
)
from text3dsam_cli.io.limits import check_voxel_count
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.parallel import thread_budget

log = logging.getLogger(__name__)

sitk = simpleitk()  # a DICOM reader needs it at once (this module is imported only for folders)

#: Modalities of DICOM objects that hold no image volume to segment.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC",
                                  "FID", "PLAN", "AU", "ECG", "HD"})

_HEADER_TAGS = ["Modality", "SeriesInstanceUID", "SeriesDescription", "StudyInstanceUID", "SOPClassUID",
                "FrameOfReferenceUID", "PatientID", "SeriesNumber", "Manufacturer"]


@dataclass
class DicomSeries:
    """One series in a folder: its UID (may be empty), its files in GDCM's geometric order and a few tags."""

    uid: str
    files: list[str]
    modality: str | None = None
    description: str | None = None
    study_uid: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # files of this series that GDCM would not stack


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True for a file with the ``DICM`` marker at byte 128 (or a ``.dcm`` suffix)."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fp:
            fp.seek(128)
            if fp.read(4) == b"DICM":
                return True
    except OSError:
        return False
    return path.suffix.lower() == ".dcm"


def _header(path: str) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
    except Exception:  # pydicom raises many kinds of errors on broken files
        return None


def _text(ds: pydicom.Dataset | None, keyword: str) -> str | None:
    if ds is None:
        return None
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def folder_has_dicom_images(folder: str | os.PathLike[str]) -> bool:
    """Cheap test: does the folder directly hold a DICOM file whose modality is an image modality?"""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return False
    for entry in entries:
        if entry.name.startswith(".") or not is_dicom_file(entry):
            continue
        modality = _text(_header(str(entry)), "Modality")
        if modality is None or modality.upper() not in NON_IMAGE_MODALITIES:
            return True
    return False


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's warning printer for the duration of a folder scan."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def list_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """Image series in ``folder`` (non-recursive), ordered by the series rule (most files first, then UID)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("no such folder", folder)
    try:
        with _quiet_itk():  # "No Series were found" is a warning on stderr; we raise our own error
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise InputError(f"cannot scan the folder for DICOM series ({first_error_line(exc)})", folder) from None
    series = []
    for uid in uids:
        with _quiet_itk():
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        ds = _header(files[0])
        modality = _text(ds, "Modality")
        if modality is not None and modality.upper() in NON_IMAGE_MODALITIES:
            continue
        tags = {k: _text(ds, k) for k in ("SOPClassUID", "FrameOfReferenceUID", "SeriesNumber", "Manufacturer")}
        if tags["SOPClassUID"] is None and ds is not None:  # anonymised files may keep it only in file meta
            tags["SOPClassUID"] = _text(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID")
        series.append(DicomSeries(uid=uid, files=files, modality=modality,
                                  description=_text(ds, "SeriesDescription"),
                                  study_uid=_text(ds, "StudyInstanceUID"), tags=tags))
    _find_left_out(folder, series)
    series.sort(key=lambda s: (-len(s.files), s.uid))
    return series


def _find_left_out(folder: Path, series: list[DicomSeries]) -> None:
    """Record the folder's DICOM files that carry a series' UID but that GDCM left out of it (e.g. a slice
    without pixel data): reading the series without them would silently leave a gap."""
    by_uid = {s.uid: s for s in series}
    listed = {os.path.normcase(os.path.abspath(f)) for s in series for f in s.files}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or os.path.normcase(os.path.abspath(entry)) in listed \
                or not is_dicom_file(entry):
            continue
        ds = _header(str(entry))
        uid = _text(ds, "SeriesInstanceUID") or ""
        if uid in by_uid:
            by_uid[uid].left_out.append(str(entry))


def _has_pixels(path: str) -> bool:
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=256)
    except Exception:  # unreadable: GDCM's own error will say so
        return True
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def check_series_complete(series: DicomSeries, where: str | os.PathLike[str]) -> None:
    """Refuse a series with a slice lacking pixel data, or whose slices are not evenly spaced (a gap)."""
    for path in series.left_out:
        reason = "has no pixel data" if not _has_pixels(path) else "cannot be stacked with the others"
        raise InputError(f"this file of series {series.uid or '(empty UID)'} {reason}; refusing the series "
                         "(it would be read with a missing slice)", path)
    positions = []
    for path in series.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["ImagePositionPatient", "ImageOrientationPatient",
                                                "NumberOfFrames"])
            position = [float(v) for v in ds.ImagePositionPatient]
            orientation = [float(v) for v in ds.ImageOrientationPatient]
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                return  # multi-frame: one file holds the whole stack
        except Exception:  # no usable geometry tags: nothing to check
            return
        positions.append((position, orientation))
    if len(positions) < 3:
        return
    row, col = np.array(positions[0][1][:3]), np.array(positions[0][1][3:])
    normal = np.cross(row, col)
    along = np.array([float(np.dot(normal, p)) for p, _ in positions])
    steps = np.abs(np.diff(along))
    typical = float(np.median(steps))
    if typical <= 0:
        return
    worst = int(np.argmax(steps))
    if steps[worst] - float(np.min(steps)) > max(0.01, 0.2 * float(np.min(steps))):
        typical = float(np.min(steps))
        names = Path(series.files[worst]).name, Path(series.files[worst + 1]).name
        raise InputError(f"the slices of series {series.uid or '(empty UID)'} are not evenly spaced: "
                         f"{steps[worst]:.3g} mm between {names[0]} and {names[1]}, {typical:.3g} mm elsewhere "
                         "(a missing slice?); refusing the series", where)


def choose_series(folder: str | os.PathLike[str], series_uid: str | None = None,
                  series: list[DicomSeries] | None = None) -> DicomSeries:
    """The series to read from ``folder``: ``series_uid`` if given, else the one with the most files."""
    folder = Path(folder)
    if series is None:
        series = list_series(folder)
    if not series:
        raise InputError("no DICOM image series in this folder", folder)
    if series_uid is None:
        return series[0]
    for candidate in series:
        if candidate.uid == series_uid.strip():
            return candidate
    available = ", ".join(f"{s.uid or '(empty UID)'} ({len(s.files)} files)" for s in series)
    raise InputError(f"no series with UID {series_uid!r} here; available: {available}", folder)


def read_series(series: DicomSeries, where: str | os.PathLike[str]) -> Volume:
    """Read the files of one series into a :class:`Volume` (array (z, y, x), native dtype, LPS geometry).

    A long series is read in slabs of consecutive files on the thread budget's threads (GDCM decodes with the
    GIL released: JPEG 2000 slices decode on every core), while the completeness check (pydicom, in this
    thread) runs beside them; the result is the whole-series reader's: same voxels, dtype and geometry
    (:func:`_read_slabs`)."""
    _check_series_size(series, where)
    try:
        with contextlib.ExitStack() as stack:
            files = list(series.files)
            if not all(encodable(f) for f in files):  # ITK needs UTF-8 names: read through numbered symlinks
                links = stack.enter_context(tempfile.TemporaryDirectory(prefix="text3dsam-series-"))
                for i, name in enumerate(list(files)):
                    files[i] = os.path.join(links, f"{i:06d}.dcm")
                    os.symlink(os.path.abspath(name), files[i])
            slabs = _slab_bounds(len(files))
            read = _read_slabs(files, slabs, lambda: check_series_complete(series, where)) if slabs else None
            if read is None:  # one reader for the whole series (short series, or slabs that do not fit together)
                check_series_complete(series, where)
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
                image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series {series.uid or '(empty UID)'} "
                         f"({first_error_line(exc)})", where) from None
    meta = {
        "series_uid": series.uid,
        "series_description": series.description,
        "study_uid": series.study_uid,
        "sop_class_uid": series.tags.get("SOPClassUID"),
        "frame_of_reference_uid": series.tags.get("FrameOfReferenceUID"),
        "dicom_files": list(series.files),
        "dicom_series": series_identity(series),
    }
    if read is None:
        return volume_from_image(image, Path(where), "dicom", series.modality, meta)
    return volume_from_array(*read, Path(where), "dicom", series.modality, meta)


#: Fewest files of a DICOM series one thread reads: a shorter series is read by one reader.
SLAB_FILES = 16


def _slab_bounds(count: int) -> list[tuple[int, int]]:
    """(start, stop) of the slabs a series of ``count`` files is read in: one per thread of the budget, each of
    at least :data:`SLAB_FILES` files; empty when one reader reads it all."""
    slabs = min(thread_budget(), count // SLAB_FILES)
    if slabs < 2:
        return []
    edges = [round(i * count / slabs) for i in range(slabs + 1)]
    return list(itertools.pairwise(edges))


class _SlabMismatch(Exception):
    """A slab that does not continue the first one (other slice size or type): read the series whole."""


def _read_slabs(files: list[str], slabs: list[tuple[int, int]], check: Callable[[], None],
                ) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None:
    """The series' array and geometry, each slab read by its own ``ImageSeriesReader`` on a thread while
    ``check()`` runs in this one; None when the slabs do not fit together (the caller reads the series whole,
    so that ITK reports the problem in its own words).

    The result is what one reader of all the files gives (ITK's ``ImageSeriesReader`` with its default,
    orthogonal direction): the first file's pixel type (given to every slab), origin, direction and in-plane
    spacing, and as slice spacing the distance from the first file's position to the last's over
    (files - 1)."""
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    last = sitk.ImageFileReader()
    last.SetFileName(files[-1])
    last.ReadImageInformation()
    size = first.GetSize()
    if first.GetDimension() != 3 or size[2] != 1 or first.GetNumberOfComponents() != 1:
        return None  # multi-frame or colour files: the whole-series reader decides
    pixel_id = first.GetPixelID()
    dtype = numpy_dtype(pixel_id)
    if dtype.kind == "c":
        return None
    array = np.empty((len(files), size[1], size[0]), dtype)
    geometry: list[Any] = []

    def read(bounds: tuple[int, int]) -> None:
        start, stop = bounds
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files[start:stop])
        reader.SetOutputPixelType(pixel_id)
        image = reader.Execute()
        if image.GetSize() != (size[0], size[1], stop - start) or image.GetNumberOfComponentsPerPixel() != 1:
            raise _SlabMismatch
        array[start:stop] = sitk.GetArrayViewFromImage(image)
        if start == 0:
            geometry.extend((image.GetSpacing(), image.GetOrigin(), image.GetDirection()))

    with ThreadPoolExecutor(len(slabs), thread_name_prefix="text3dsam-dicom") as pool:
        futures = [pool.submit(read, bounds) for bounds in slabs]
        try:
            check()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        try:
            for future in futures:
                future.result()
        except _SlabMismatch:
            return None
    spacing, origin, direction = geometry
    step = np.asarray(last.GetOrigin(), np.float64) - np.asarray(origin, np.float64)
    norm = float(np.sqrt(step[0] * step[0] + step[1] * step[1] + step[2] * step[2]))
    slice_spacing = norm / (len(files) - 1) if norm > 0 else 1.0
    return array, (spacing[0], spacing[1], slice_spacing), origin, direction


def series_identity(series: DicomSeries) -> dict[str, str | None]:
    """Which series this is, by its DICOM keywords (the sidecar's ``dicom_series``)."""
    return {"StudyInstanceUID": series.study_uid, "SeriesInstanceUID": series.uid,
            "SeriesDescription": series.description, "Modality": series.modality}


def _describe(series: DicomSeries) -> str:
    details = ", ".join(x for x in (series.tags.get("Manufacturer"), series.modality,
                                    series.description and repr(series.description), f"{len(series.files)} files")
                        if x)
    return f"{series.uid or '(empty UID)'} ({details})"


def warn_other_series(folder: str | os.PathLike[str], chosen: DicomSeries, series: list[DicomSeries]) -> None:
    """One warning when ``folder`` holds image series besides ``chosen``: which was read, which were not."""
    others = [s for s in series if s is not chosen]
    if others:
        log.warning("%s holds %d DICOM image series: read %s (most files, then smallest UID); not read: %s; "
                    "choose one with --series UID", folder, len(series), _describe(chosen),
                    "; ".join(map(_describe, others)))


def _check_series_size(series: DicomSeries, where: str | os.PathLike[str]) -> None:
    try:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True, force=True,
                             specific_tags=["Rows", "Columns", "NumberOfFrames"])
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # no usable size tags: GDCM decides
        return
    check_voxel_count((len(series.files) * frames, rows, cols), where, f"the DICOM series {series.uid}")


def read_dicom(path: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """A DICOM series from a folder (series rule applies) or from one of its files (that file's series)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not encodable(str(folder.absolute())):  # GDCM needs a UTF-8 name: read through a symlinked alias
        with itk_path(folder.absolute()) as alias:
            volume = read_dicom(Path(alias) / path.name if not path.is_dir() else Path(alias), series_uid)
        prefix = alias.rstrip(os.sep) + os.sep
        volume.path = path
        volume.meta["dicom_files"] = [str(folder / f[len(prefix):]) if f.startswith(prefix) else f
                                      for f in volume.meta.get("dicom_files", [])]
        return volume
    series = list_series(folder)
    if path.is_dir() or series_uid is not None:
        chosen = choose_series(folder, series_uid, series)
        if series_uid is None:
            warn_other_series(path, chosen, series)
    else:
        modality = _text(_header(str(path)), "Modality")
        if modality is not None and modality.upper() in NON_IMAGE_MODALITIES:
            raise InputError(f"is a DICOM {modality} object, not an image series", path)
        target = path.resolve()
        found = [s for s in series if any(Path(f).resolve() == target for f in s.files)]
        if not found:
            raise InputError("not a readable DICOM image (GDCM finds no image series for it in its folder)", path)
        chosen = found[0]
    volume = read_series(chosen, path)
    volume.meta["series_available"] = [s.uid for s in series]
    return volume
