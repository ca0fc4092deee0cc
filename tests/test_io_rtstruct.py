"""RTSTRUCT output (and the SNOMED CT coding it shares with DICOM-SEG) on real DICOM series."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DATA
from scipy import ndimage
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.errors import InputError
from text3dsam_cli.io.dicomseg import read_source_series
from text3dsam_cli.io.readers import read_volume
from text3dsam_cli.io.segment_codes import GENERIC, STRUCTURES, code_for_class, code_for_prompt
from text3dsam_cli.io.volume import Volume

skimage_draw = pytest.importorskip("skimage.draw")

from text3dsam_cli.io.rtstruct import RT_STRUCTURE_SET_STORAGE, slice_contours, write_rtstruct  # noqa: E402

MR_SIEMENS = DATA / "dicom" / "dicom2nifti" / "siemens_anatomical_001" / "dicom"
TOTALSEG = DATA / "dicom" / "totalsegmentator_ct" / "dicom"
CT_NIFTI = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
PROMPTS = ["Liver", "Left kidney", "a ring with a hole", "nothing here"]

runner = CliRunner()


@pytest.fixture(scope="module")
def mr() -> Volume:
    return read_volume(MR_SIEMENS)


def _labels(volume: Volume) -> np.ndarray:
    """Label map made from the real image (this series' pixel data is noise): 1 its smoothed bright regions
    (about 20 irregular blobs, some with holes), 2 a small box, 3 a ring (a hole, an island in the hole), 4 empty."""
    smooth = ndimage.gaussian_filter(volume.array.astype(np.float32), (0, 4, 4))
    labels = np.zeros(volume.shape, np.uint8)
    labels[smooth > np.percentile(smooth, 60)] = 1
    _, ny, nx = volume.shape
    labels[1:3, 20:30, 20:26] = 2
    yy, xx = np.mgrid[:ny, :nx]
    radius = np.hypot(yy - ny * 0.8, xx - nx * 0.8)
    ring = (radius < 20) & ((radius > 10) | (radius < 4))
    labels[:, ring] = 3
    return labels


def _rasterise(path: Path, volume: Volume) -> tuple[pydicom.Dataset, dict[str, np.ndarray]]:
    """Each ROI's contours filled back on the volume's grid (even-odd rule), from patient coordinates."""
    ds = pydicom.dcmread(path)
    z_of_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): z
                for z, f in enumerate(volume.meta["dicom_files"])}
    axes = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    to_index = np.linalg.inv(axes * np.asarray(volume.spacing, dtype=float))  # world offset -> (i, j, k)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    masks = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(volume.shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            ijk = (points - np.asarray(volume.origin)) @ to_index.T
            z = z_of_uid[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            np.testing.assert_allclose(ijk[:, 2], z, atol=1e-3)  # the contour lies in its image's plane
            rows, cols = skimage_draw.polygon(ijk[:, 1], ijk[:, 0], volume.shape[1:])
            filled = np.zeros(volume.shape[1:], dtype=bool)
            filled[rows, cols] = True
            mask[z] ^= filled
        masks[names[int(roi.ReferencedROINumber)]] = mask
    return ds, masks


def test_contours_rasterise_back_to_the_label_map(mr: Volume, tmp_path: Path) -> None:
    labels = _labels(mr)
    path = write_rtstruct(mr, labels, [1, 2, 3, 4], PROMPTS, tmp_path / "mr.rtstruct.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mr.rtstruct.dcm"]
    _, masks = _rasterise(path, mr)
    assert list(masks) == PROMPTS
    for value, prompt in enumerate(PROMPTS, start=1):
        truth = labels == value
        overlap = 2 * np.logical_and(masks[prompt], truth).sum()
        dice = overlap / (masks[prompt].sum() + truth.sum()) if truth.any() else float(not masks[prompt].any())
        assert dice >= 0.95, (prompt, dice)
        np.testing.assert_array_equal(masks[prompt], truth)  # in fact exact: no pixel centre lies on a contour


def test_references_and_structure(mr: Volume, tmp_path: Path) -> None:
    path = write_rtstruct(mr, _labels(mr), [1, 2, 3, 4], PROMPTS, tmp_path / "mr.dcm", model_name="MagicXin/x")
    ds = pydicom.dcmread(path)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in mr.meta["dicom_files"]]
    assert ds.SOPClassUID == RT_STRUCTURE_SET_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == mr.meta["study_uid"]
    assert ds.SeriesInstanceUID != mr.meta["series_uid"] and ds.PatientID == headers[0].PatientID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    # this series has no Frame of Reference UID: the one DICOM-SEG derives from its study and series UIDs
    assert mr.meta["frame_of_reference_uid"] is None
    expected = read_source_series(mr, "RTSTRUCT")[0][0].FrameOfReferenceUID
    assert frame.FrameOfReferenceUID == expected == ds.FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == mr.meta["study_uid"]
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == mr.meta["series_uid"]
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence} == {
        str(h.SOPInstanceUID) for h in headers}
    assert [r.ROIName for r in ds.StructureSetROISequence] == PROMPTS
    assert all(r.ReferencedFrameOfReferenceUID == frame.FrameOfReferenceUID for r in ds.StructureSetROISequence)
    assert "ContourSequence" not in ds.ROIContourSequence[3]  # the empty ROI is listed without contours
    codes = [o.get("RTROIIdentificationCodeSequence") for o in ds.RTROIObservationsSequence]
    assert codes[0][0].CodeValue == "10200004" and codes[1][0].CodeValue == "64033007"
    assert codes[2] is None and ds.RTROIObservationsSequence[0].RTROIInterpretedType == "ORGAN"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
def test_dciodvfy_finds_no_errors(mr: Volume, tmp_path: Path) -> None:
    path = write_rtstruct(mr, _labels(mr), [1, 2, 3, 4], PROMPTS, tmp_path / "mr.dcm")
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], errors


def test_slice_contours_of_holes_and_border_pixels() -> None:
    mask = np.zeros((7, 7), dtype=bool)
    mask[0:5, 0:5] = True
    mask[2, 2] = False  # a hole
    contours = slice_contours(mask)
    assert len(contours) == 2
    outer = max(contours, key=len)
    assert outer[:, 0].min() == -0.5 and outer[:, 0].max() == 4.5  # half way between pixel centres


def test_series_without_uids_is_refused_before_writing(tmp_path: Path) -> None:
    volume = read_volume(TOTALSEG)
    with pytest.raises(InputError, match=r"cannot write an RTSTRUCT for this series.*StudyInstanceUID"):
        write_rtstruct(volume, np.zeros(volume.shape, np.uint8), [1], ["liver"], tmp_path / "x.dcm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", [TOTALSEG, CT_NIFTI])
def test_segment_refuses_rtstruct_before_the_model_runs(small_checkpoint, tmp_path, source) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(source), "liver", "--rtstruct", "-m", str(small_checkpoint),
                                 "-o", str(out)])
    assert result.exit_code == 1
    expected = "StudyInstanceUID" if source == TOTALSEG else "--rtstruct needs a DICOM series input"
    assert expected in result.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_segment_writes_rtstruct_beside_the_label_map(small_checkpoint, tmp_path) -> None:
    result = runner.invoke(app, ["segment", str(MR_SIEMENS), "Liver", "Left kidney", "--rtstruct", "--dicom-seg",
                                 "-m", str(small_checkpoint), "-o", str(tmp_path / "case.nii.gz")])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "case.json").read_text())
    assert sidecar["outputs"]["rtstruct"] == str(tmp_path / "case.rtstruct.dcm")
    ds = pydicom.dcmread(tmp_path / "case.rtstruct.dcm")
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Liver", "Left kidney"]


# -- SNOMED CT coding --------------------------------------------------------------------------------------


def test_known_structures_get_snomed_codes() -> None:
    liver, spleen = code_for_prompt("liver"), code_for_prompt("Spleen in abdominal CT")
    assert (liver.type.value, liver.type.scheme_designator, liver.modifier) == ("10200004", "SCT", None)
    assert spleen.type.value == "78961009" and liver.category.value == "91723000"
    left, right = code_for_class("Left kidney"), code_for_class("Right kidney")
    assert left.type.value == right.type.value == "64033007"
    assert (left.modifier.value, right.modifier.value) == ("7771000", "24028007")
    assert code_for_class("Left atrium").type.value == "82471001" and code_for_class("Left atrium").modifier is None
    assert code_for_prompt("the liver of a cat") == GENERIC  # not a trained phrasing: never guessed
    assert code_for_class("Liver tumors") == GENERIC and code_for_class("Left hip") == GENERIC
    assert len(STRUCTURES) > 60


def _coded_dicom_seg(mr: Volume, tmp_path: Path) -> Path:
    pytest.importorskip("highdicom")
    from text3dsam_cli.io.dicomseg import write_dicom_seg

    labels = _labels(mr)[..., :]
    labels[labels == 4] = 0
    return write_dicom_seg(mr, labels, [1, 2, 3], PROMPTS[:3], tmp_path / "mr.seg.dcm")


def test_dicom_seg_segments_carry_the_codes(mr: Volume, tmp_path: Path) -> None:
    seg = pydicom.dcmread(_coded_dicom_seg(mr, tmp_path), stop_before_pixels=True)
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence]
    assert [t.CodeValue for t in types] == ["10200004", "64033007", "85756007"]
    assert types[1].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
def test_dciodvfy_accepts_the_coded_dicom_seg(mr: Volume, tmp_path: Path) -> None:
    path = _coded_dicom_seg(mr, tmp_path)
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], errors
