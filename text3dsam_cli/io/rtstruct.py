"""RTSTRUCT output: a label map written as a DICOM RT Structure Set that references its source series.

One ROI per prompt, named after it. Each ROI's contours are the 0.5 iso-lines of its binary mask on every
slice (marching squares, scikit-image's ``find_contours``; optional extra ``rtstruct``), so a contour runs
half way between the pixel centres inside and outside the mask: the pixels whose centres a contour encloses
are exactly the mask's pixels. Exactly collinear points are dropped (no change in shape). A hole in a mask
is a separate contour inside its outer contour, so a reader that fills contours with the even-odd rule (the
usual reading of several contours of one ROI in one plane) gets the holes back. Points are in patient
coordinates (LPS, mm) from the series geometry; each contour references the source image of its slice.

The source headers are read, completed and checked by :func:`text3dsam_cli.io.dicomseg.read_source_series`,
the same rules as DICOM-SEG (e.g. a series with empty Study/Series Instance UIDs is refused).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid

import text3dsam_cli
from text3dsam_cli.errors import OutputError
from text3dsam_cli.io.atomic import atomic_path
from text3dsam_cli.io.dicomseg import (
    _TYPE2_COPIED,
    MANUFACTURER,
    _character_set,
    _check_segments,
    _long_string,
    _series_number,
    _short_text,
    read_source_series,
)
from text3dsam_cli.io.segment_codes import code_for_prompt
from text3dsam_cli.io.volume import Volume

#: Message when the optional dependency is missing.
MISSING_SKIMAGE = "RTSTRUCT output needs scikit-image: pip install 'text3dsam-cli[rtstruct]'"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CONTOUR_DATA = Tag(0x3006, 0x0050)
#: Referenced SOP Class of RT Referenced Study Sequence items (Detached Study Management, as RT systems use).
STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
STRUCTURE_SET_LABEL = "TEXT3DSAM"
DEFAULT_SERIES_DESCRIPTION = "Text3DSAM structures"
RTSTRUCT_SERIES_NUMBER_OFFSET = 2000
#: ROI display colours (RGB), cycled by ROI number.
COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40))


def skimage_available() -> bool:
    """Whether scikit-image (the ``rtstruct`` extra) can be imported."""
    try:
        import skimage.measure  # noqa: F401
    except ImportError:
        return False
    return True


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours (each (N, 2) of (row, column) pixel coordinates, not repeating the first point) around
    the True pixels of a 2-D mask: iso-lines at 0.5, collinear points dropped."""
    from skimage.measure import approximate_polygon, find_contours

    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    r0, c0 = int(rows[0]), int(cols[0])
    box = mask[r0:int(rows[-1]) + 1, c0:int(cols[-1]) + 1]
    padded = np.pad(box.astype(np.float32), 1)  # contours close at the image border too
    offset = np.array([r0 - 1.0, c0 - 1.0])
    out = []
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour, tolerance=0.0) + offset
        if len(contour) > 1 and np.array_equal(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour) >= 3:
            out.append(contour)
    return out


def _patient_points(contour: np.ndarray, z: int, volume: Volume) -> np.ndarray:
    """(row, column) pixel coordinates on slice ``z`` -> (N, 3) patient coordinates (LPS, mm)."""
    axes = np.asarray(volume.direction, dtype=float).reshape(3, 3)  # columns: x, y, z axis directions
    spacing = np.asarray(volume.spacing, dtype=float)
    index = np.stack([contour[:, 1], contour[:, 0], np.full(len(contour), float(z))], axis=1)  # (i, j, k)
    return np.asarray(volume.origin, dtype=float) + (index * spacing) @ axes.T


def _contour_data(points: np.ndarray) -> RawDataElement:
    """Contour Data (3006,0050) as an encoded DS value: 1e-4 mm precision, each value well under 16 bytes.

    Built as a raw element, so pydicom writes the bytes as they are instead of making a DS object of each of
    the (often 10^5) numbers. A long contour exceeds the 64 KiB that an explicit-VR DS element can hold, so
    the file is written in Implicit VR Little Endian (32-bit lengths; the default transfer syntax every DICOM
    application supports).
    """
    text = "\\".join(f"{v:.4f}" for v in points.reshape(-1).tolist())
    data = text.encode("ascii")
    if len(data) % 2:
        data += b" "
    return RawDataElement(CONTOUR_DATA, "DS", len(data), data, 0, True, True)


def _item(**attributes: object) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _code_item(code: object) -> pydicom.Dataset:
    return _item(CodeValue=code.value, CodingSchemeDesignator=code.scheme_designator,  # type: ignore[attr-defined]
                 CodeMeaning=code.meaning)  # type: ignore[attr-defined]


def write_rtstruct(volume: Volume, labels: np.ndarray, label_values: Sequence[int], prompts: Sequence[str],
                   path: str | os.PathLike[str], model_name: str = "Text3DSAM",
                   series_description: str | None = None,
                   sources: tuple[list[pydicom.Dataset], np.ndarray] | None = None) -> Path:
    """Write ``labels`` (z, y, x) on ``volume``'s grid as an RTSTRUCT referencing the volume's source series.

    One ROI per prompt (numbered by ascending label value, ROI Name = the prompt cut to 64 characters, ROI
    Description = the whole prompt); an empty mask gives an ROI without contours. ``sources`` is what
    :func:`~text3dsam_cli.io.dicomseg.read_source_series` returned, when the caller checked the series
    already. Raises ``OutputError`` when scikit-image is missing or the file cannot be written,
    ``InputError`` when the volume does not come from a usable DICOM series, and ``ValueError`` for
    inconsistent labels/label_values/prompts.
    """
    path = Path(path)
    if not skimage_available():
        raise OutputError(MISSING_SKIMAGE, path)
    where = volume.path if volume.path is not None else path
    labels = np.asarray(labels)
    pairs = _check_segments(labels, label_values, prompts, volume.shape)
    datasets, order = sources if sources is not None else read_source_series(volume, "RTSTRUCT", where)
    image_of_slice = {int(z): ds for ds, z in zip(datasets, order)}
    source = datasets[0]
    frame_uid = str(source.FrameOfReferenceUID)
    version = text3dsam_cli.__version__
    algorithm = _long_string(model_name, "Text3DSAM")
    description = _long_string(series_description or DEFAULT_SERIES_DESCRIPTION, DEFAULT_SERIES_DESCRIPTION)
    names = [_long_string(prompt, f"ROI {n}") for n, (_, prompt) in enumerate(pairs, start=1)]
    now = datetime.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    charset = _character_set(source, [*names, *(p for _, p in pairs), algorithm, description])
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in (*_TYPE2_COPIED, "StudyInstanceUID", "StudyDescription", "PatientAge"):
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)
    ds.FrameOfReferenceUID = frame_uid  # Frame of Reference module
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = min(_series_number(source) - 1000 + RTSTRUCT_SERIES_NUMBER_OFFSET, 2**31 - 1)
    ds.SeriesDescription = description
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = algorithm
    ds.SoftwareVersions = version
    ds.InstanceNumber = 1
    ds.StructureSetLabel = STRUCTURE_SET_LABEL
    ds.StructureSetName = description
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")

    images = DicomSequence([_item(ReferencedSOPClassUID=d.SOPClassUID, ReferencedSOPInstanceUID=d.SOPInstanceUID)
                            for d in (image_of_slice[z] for z in sorted(image_of_slice))])
    series = _item(SeriesInstanceUID=source.SeriesInstanceUID, ContourImageSequence=images)
    study = _item(ReferencedSOPClassUID=STUDY_REFERENCE_CLASS, ReferencedSOPInstanceUID=source.StudyInstanceUID,
                  RTReferencedSeriesSequence=DicomSequence([series]))
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([
        _item(FrameOfReferenceUID=frame_uid, RTReferencedStudySequence=DicomSequence([study]))])

    rois, contours, observations = [], [], []
    for number, ((value, prompt), name) in enumerate(zip(pairs, names), start=1):
        roi = _item(ROINumber=number, ReferencedFrameOfReferenceUID=frame_uid, ROIName=name,
                    ROIGenerationAlgorithm="AUTOMATIC",
                    ROIGenerationDescription=_long_string(f"{algorithm} (text3dsam-cli {version})", algorithm))
        text = _short_text(prompt)
        if text:
            roi.ROIDescription = text
        rois.append(roi)
        items = []
        for z in np.flatnonzero((labels == value).any(axis=(1, 2))):
            image = image_of_slice[int(z)]
            reference = DicomSequence([_item(ReferencedSOPClassUID=image.SOPClassUID,
                                             ReferencedSOPInstanceUID=image.SOPInstanceUID)])
            for contour in slice_contours(labels[z] == value):
                points = _patient_points(contour, int(z), volume)
                item = _item(ContourImageSequence=reference, ContourGeometricType="CLOSED_PLANAR",
                             NumberOfContourPoints=len(points), ContourNumber=len(items) + 1)
                item[CONTOUR_DATA] = _contour_data(points)
                items.append(item)
        entry = _item(ROIDisplayColor=list(COLOURS[(number - 1) % len(COLOURS)]), ReferencedROINumber=number)
        if items:
            entry.ContourSequence = DicomSequence(items)
        contours.append(entry)
        coding = code_for_prompt(prompt)
        observation = _item(ObservationNumber=number, ReferencedROINumber=number,
                            RTROIInterpretedType="" if coding.generic else "ORGAN", ROIInterpreter="")
        if not coding.generic:
            observation.RTROIIdentificationCodeSequence = DicomSequence([_code_item(coding.type)])
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)

    with atomic_path(path) as tmp:
        try:
            ds.save_as(tmp, enforce_file_format=True)
        except OSError as exc:
            raise OutputError(f"cannot write the RTSTRUCT ({exc.strerror or exc})", path) from None
    return path
