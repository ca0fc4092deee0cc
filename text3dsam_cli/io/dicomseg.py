"""DICOM-SEG output: a label map written as a DICOM Segmentation object that references its source series.

The object is built with highdicom (optional extra ``dicomseg``): a BINARY segmentation with one segment per
prompt, frames aligned one to one with the source images (same rows, columns, positions), so every viewer
that shows the series can overlay it. Source headers are read with pydicom without pixel data; they are only
changed in memory, never on disk. See ``docs/formats.md`` ("DICOM-SEG output") for the decisions on empty
segments, label value to segment number mapping and incomplete source headers.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

import text3dsam_cli
from text3dsam_cli.errors import InputError, OutputError
from text3dsam_cli.io.atomic import atomic_path, describe_os_error
from text3dsam_cli.io.itk import first_error_line
from text3dsam_cli.io.segment_codes import code_for_prompt
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.labels import label_dtype

#: Message when the optional dependency is missing.
MISSING_HIGHDICOM = "DICOM-SEG output needs highdicom: pip install 'text3dsam-cli[dicomseg]'"

#: Segmented property category and type of a segment whose prompt names no known structure: the generic
#: "Tissue" concept (SCT 85756007, CID 7150, 3D Slicer's default for unclassified segments) for both. A
#: prompt that is a trained phrasing of a structure in :mod:`text3dsam_cli.io.segment_codes` gets that
#: structure's SNOMED CT code (category "Anatomical Structure", laterality as a type modifier). The prompt
#: itself is in Segment Label (first 64 characters) and Segment Description (in full).
PROPERTY_CATEGORY = Code("85756007", "SCT", "Tissue")
PROPERTY_TYPE = Code("85756007", "SCT", "Tissue")
#: Algorithm family (CID 7162).
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")

MANUFACTURER = "text3dsam-cli"
CONTENT_LABEL = "TEXT3DSAM"
DEFAULT_SERIES_DESCRIPTION = "Text3DSAM segmentation"
SEG_SERIES_NUMBER_OFFSET = 1000

#: Type 2 attributes (present, possibly empty) that highdicom copies from the first source image.
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
_LO_MAX = 64
_ST_MAX = 1024
_UTF8 = "ISO_IR 192"


def _long_string(text: str, fallback: str, limit: int = _LO_MAX) -> str:
    """``text`` made a valid LO value: one line, no backslash, at most ``limit`` characters."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(text)).replace("\\", "/")
    text = " ".join(text.split())[:limit].rstrip()
    return text or fallback


def _short_text(text: str) -> str:
    """``text`` made a valid ST value (at most 1024 characters, no control characters but CR/LF/TAB)."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", " ", str(text)).strip()[:_ST_MAX]


def segment_numbers(label_values: Sequence[int]) -> dict[int, int]:
    """Label value -> DICOM segment number: 1..N in ascending label value order.

    BINARY segmentations number their segments 1..N without gaps, so label values 1..N (in any prompt order)
    keep their number; other values (e.g. 2, 5, 7) are renumbered 1, 2, 3 in ascending order.
    """
    return {value: i for i, value in enumerate(sorted(int(v) for v in label_values), start=1)}


def _check_segments(labels: np.ndarray, label_values: Sequence[int], prompts: Sequence[str],
                    shape: tuple[int, int, int]) -> list[tuple[int, str]]:
    """Validated (label value, prompt) pairs sorted by label value."""
    if len(label_values) != len(prompts):
        raise ValueError(f"{len(label_values)} label values for {len(prompts)} prompts")
    if not label_values:
        raise ValueError("no segments to write (no prompts)")
    values = [int(v) for v in label_values]
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate label values: {values}")
    if min(values) < 1 or max(values) > 65535:
        raise ValueError(f"label values must lie in 1..65535, got {values}")
    if labels.shape != shape:
        raise ValueError(f"label map shape {labels.shape} does not match the volume shape {shape}")
    if labels.dtype.kind not in "uib":
        raise ValueError(f"label map must hold integers, got {labels.dtype}")
    return sorted(zip(values, (str(p) for p in prompts)))


def _segment_map(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """The label map with label values replaced by segment numbers (uint8, or uint16 above 255 segments)."""
    if labels.size and int(labels.min()) < 0:
        raise ValueError("label map has negative values")
    top = int(labels.max()) if labels.size else 0
    if top > 65535:
        raise ValueError(f"label map holds the value {top}, above the largest segment number 65535")
    size = max(top, *values) + 1
    known = np.zeros(size, dtype=bool)
    known[[0, *values]] = True
    valid = known[labels]
    if not valid.all():
        unknown = np.unique(labels[~valid]).tolist()
        raise ValueError(f"label map holds values {unknown[:10]} that are not among the label values {values}")
    lut = np.zeros(size, dtype=label_dtype([len(values)]))  # segment numbers 1..len(values)
    lut[values] = np.arange(1, len(values) + 1)
    return lut[labels]


def _a(kind: str) -> str:
    """``"a DICOM-SEG"``, ``"an RTSTRUCT"``: the object name with its article (spoken letter by letter)."""
    return f"{'an' if kind[:1] in 'AEFHILMNORSX' else 'a'} {kind}"


def _read_sources(files: Sequence[str], where: Path | None, kind: str = "DICOM-SEG") -> list[pydicom.Dataset]:
    """The source headers (no pixel data), in the order of ``files``."""
    datasets = []
    for name in files:
        try:
            datasets.append(pydicom.dcmread(name, stop_before_pixels=True, force=True))
        except Exception as exc:  # pydicom raises many kinds of errors on broken files
            raise InputError(f"cannot read the source DICOM file {name} for the {kind} "
                             f"({first_error_line(exc)})", where) from None
    return datasets


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _complete_sources(datasets: list[pydicom.Dataset], slice_spacing: float, where: Path | None,
                      kind: str = "DICOM-SEG") -> None:
    """Fill, in memory, what the files leave out but can be filled validly; refuse what cannot.

    * empty SOP Class/Instance UID: taken from the file meta (Media Storage SOP Class/Instance UID, which
      PS3.10 defines as the same values);
    * empty Study/Series Instance UID: refused, since the object belongs to the source study and must name the
      source series, and an invented UID would point at nothing;
    * missing Frame of Reference UID: the series' own one if some files have it; if none has, a UID derived
      from the study and series UIDs (the same for every SEG of that series);
    * missing type 2 patient/study attributes: added empty; invalid Patient's Sex: emptied; invalid
      Patient's Age (type 3): dropped;
    * missing or empty Slice Thickness (which highdicom copies into the SEG's Pixel Measures): the volume's
      slice spacing, i.e. the thickness of the segmentation's own voxels.
    """
    problems = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if any(not _text(ds, keyword) for ds in datasets):
            problems.append(keyword)
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        for ds in datasets:
            if not _text(ds, keyword):
                value = _text(getattr(ds, "file_meta", pydicom.Dataset()), meta_keyword)
                if value:
                    setattr(ds, keyword, value)
        if any(not _text(ds, keyword) for ds in datasets):
            problems.append(keyword)
    if problems:
        names = " and ".join([", ".join(problems[:-1]), problems[-1]] if len(problems) > 1 else problems)
        raise InputError(f"cannot write {_a(kind)} for this series: its source files have an empty {names}, "
                         f"which {_a(kind)} must reference (the NIfTI output does not need them)", where)
    if len({_text(ds, "SOPInstanceUID") for ds in datasets}) != len(datasets):
        raise InputError(f"cannot write {_a(kind)} for this series: several source files share one "
                         "SOPInstanceUID", where)
    frames = {_text(ds, "FrameOfReferenceUID") for ds in datasets} - {""}
    if len(frames) > 1:
        raise InputError(f"cannot write {_a(kind)} for this series: its files have different "
                         "FrameOfReferenceUIDs", where)
    if frames:
        frame_uid = frames.pop()
    else:
        first = datasets[0]
        frame_uid = generate_uid(entropy_srcs=["text3dsam-cli frame of reference", _text(first, "StudyInstanceUID"),
                                               _text(first, "SeriesInstanceUID")])
    for ds in datasets:
        if not _text(ds, "FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = frame_uid
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if ds.get("SliceThickness") in (None, ""):
            ds.SliceThickness = format_number_as_ds(round(slice_spacing, 6))
        if "PatientAge" in ds and not re.fullmatch(r"\d{3}[DWMY]", _text(ds, "PatientAge")):
            del ds.PatientAge  # type 3, copied into the SEG by highdicom; e.g. "0Y" is no valid AS value
        if _text(ds, "PatientSex").upper() not in ("M", "F", "O", ""):
            ds.PatientSex = ""
        elif ds.PatientSex:
            ds.PatientSex = _text(ds, "PatientSex").upper()


def _slice_order(datasets: list[pydicom.Dataset], volume: Volume, where: Path | None,
                 kind: str = "DICOM-SEG") -> np.ndarray:
    """For each source image, the index z of the volume slice it holds (checked against the geometry)."""
    nz, ny, nx = volume.shape
    if len(datasets) != nz:
        raise InputError(f"cannot write {_a(kind)}: the volume has {nz} slices but {len(datasets)} source "
                         f"files (multi-frame source images are not supported)", where)
    axes = np.asarray(volume.direction, dtype=float).reshape(3, 3)  # columns: x, y, z axis directions
    origin = np.asarray(volume.origin, dtype=float)
    spacing_z = float(volume.spacing[2])
    order = np.empty(nz, dtype=np.intp)
    for k, ds in enumerate(datasets):
        position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
            raise InputError(f"cannot write {_a(kind)}: a source image has no ImagePositionPatient/"
                             "ImageOrientationPatient", where)
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (ny, nx):
            raise InputError(f"cannot write {_a(kind)}: a source image is {ds.get('Rows')}x"
                             f"{ds.get('Columns')}, the volume slices are {ny}x{nx}", where)
        cosines = np.asarray([float(v) for v in orientation]).reshape(2, 3)
        if not np.allclose(cosines, axes[:, :2].T, atol=1e-3):
            raise InputError(f"cannot write {_a(kind)}: a source image's orientation differs from the "
                             "volume's", where)
        index = float(np.dot(np.asarray([float(v) for v in position]) - origin, axes[:, 2])) / spacing_z
        order[k] = round(index)
        if abs(index - order[k]) > 0.2:
            raise InputError(f"cannot write {_a(kind)}: a source image lies between the volume's slices",
                             where)
    if sorted(order.tolist()) != list(range(nz)):
        raise InputError(f"cannot write {_a(kind)}: the source images do not map one to one onto the "
                         "volume's slices", where)
    return order


def read_source_series(volume: Volume, kind: str = "DICOM-SEG",
                       where: Path | None = None) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """The source headers of a volume read from a DICOM series, completed in memory and checked (the rules of
    :func:`_complete_sources`), and for each header the index z of the volume slice it holds.

    Shared by every DICOM object that references its series (DICOM-SEG, RTSTRUCT; ``kind`` names it in
    errors). Raises ``InputError`` when the volume was not read from DICOM files or its series cannot be
    referenced (e.g. empty Study/Series Instance UIDs); reads headers only, writes nothing.
    """
    where = where if where is not None else volume.path
    files = volume.meta.get("dicom_files")
    if not files:
        raise InputError(f"{kind} output needs a DICOM series input (this image was not read from DICOM "
                         "files)", where)
    datasets = _read_sources(files, where, kind)
    _complete_sources(datasets, float(volume.spacing[2]), where, kind)
    return datasets, _slice_order(datasets, volume, where, kind)


def _character_set(source: pydicom.Dataset, texts: Sequence[str]) -> Any:
    """The source's character set, or UTF-8 when our own text needs more than ASCII."""
    if all(text.isascii() for text in texts):
        return source.get("SpecificCharacterSet") or None
    return _UTF8


def _series_number(source: pydicom.Dataset) -> int:
    try:
        number = int(source.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = 0
    return min(max(number, 0) + SEG_SERIES_NUMBER_OFFSET, 2**31 - 1)


def write_dicom_seg(volume: Volume, labels: np.ndarray, label_values: Sequence[int], prompts: Sequence[str],
                    path: str | os.PathLike[str], model_name: str = "Text3DSAM",
                    series_description: str | None = None) -> Path:
    """Write ``labels`` (z, y, x) on ``volume``'s grid as a DICOM-SEG referencing the volume's source series.

    One BINARY segment per prompt, numbered by :func:`segment_numbers` (so label values 1..N keep their
    number); a prompt whose mask is empty stays a segment without frames. Segment label: the prompt cut to 64
    characters; Segment Description: the whole prompt. Raises ``OutputError`` when highdicom is missing or
    the file cannot be written, ``InputError`` when the volume does not come from a usable DICOM series, and
    ``ValueError`` for inconsistent labels/label_values/prompts.
    """
    path = Path(path)
    try:
        import highdicom as hd
    except ImportError:
        raise OutputError(MISSING_HIGHDICOM, path) from None
    where = volume.path if volume.path is not None else path
    if not volume.meta.get("dicom_files"):
        raise InputError("DICOM-SEG output needs a DICOM series input (this image was not read from DICOM "
                         "files)", where)
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    pairs = _check_segments(labels, label_values, prompts, volume.shape)
    values = [value for value, _ in pairs]
    datasets, order = read_source_series(volume, "DICOM-SEG", where)
    frames = _segment_map(labels, values)[order]  # frame k belongs to datasets[k]

    segment_labels = [_long_string(prompt, f"Segment {n}") for n, (_, prompt) in enumerate(pairs, start=1)]
    descriptions = [_short_text(prompt) for _, prompt in pairs]
    algorithm_name = _long_string(model_name, "Text3DSAM")
    description = _long_string(series_description or DEFAULT_SERIES_DESCRIPTION, DEFAULT_SERIES_DESCRIPTION)
    version = text3dsam_cli.__version__
    source = datasets[0]
    try:
        algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=ALGORITHM_FAMILY,
                                                       version=version, source=MANUFACTURER)
        segments = []
        for number, (label, text, (_, prompt)) in enumerate(zip(segment_labels, descriptions, pairs), start=1):
            coding = code_for_prompt(prompt)
            segment = hd.seg.SegmentDescription(
                segment_number=number, segment_label=label, segmented_property_category=coding.category,
                segmented_property_type=coding.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm)
            if coding.modifier is not None:  # laterality (CID 244), e.g. Kidney + Left
                segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                    hd.sr.CodedConcept(coding.modifier.value, coding.modifier.scheme_designator,
                                       coding.modifier.meaning)]
            if text:
                segment.SegmentDescription = text
            segments.append(segment)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            seg = hd.seg.Segmentation(
                source_images=datasets, pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
                series_instance_uid=hd.UID(), series_number=_series_number(source), sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=algorithm_name,
                software_versions=version, device_serial_number="0", series_description=description,
                content_label=CONTENT_LABEL, content_description=description,
                omit_empty_frames=bool(frames.any()),  # highdicom keeps every frame when all are empty
                specific_character_set=_character_set(source, [*segment_labels, *descriptions, algorithm_name,
                                                               description]))
    except KeyError as exc:  # highdicom looks the source's SOP class up in its tables of the standard
        raise InputError(f"cannot write a DICOM-SEG for this series: highdicom does not know its SOP class "
                         f"({_text(source, 'SOPClassUID')}; key {exc.args[0]!r})", where) from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"cannot write a DICOM-SEG for this series: highdicom refuses it "
                         f"({first_error_line(exc)})", where) from None
    with atomic_path(path) as tmp:
        try:
            seg.save_as(tmp)
        except OSError as exc:
            raise OutputError(f"cannot write the DICOM-SEG ({describe_os_error(exc)})", path) from None
    return path
