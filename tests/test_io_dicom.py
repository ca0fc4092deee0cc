"""DICOM series: same voxels and geometry as the reference NIfTIs, series rule, metadata."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from text3dsam_cli.errors import InputError
from text3dsam_cli.io.dicom import choose_series, is_dicom_file, list_series
from text3dsam_cli.io.readers import read_volume
from text3dsam_cli.io.volume import Volume

DATA = Path(__file__).parents[1].parent / "shared" / "data"
D2N = DATA / "dicom" / "dicom2nifti"
TOTALSEG = DATA / "dicom" / "totalsegmentator_ct"
DCMQI = DATA / "extra" / "dcmqi"
D2N_CASES = sorted(p.parent.name for p in D2N.glob("*/dicom"))
TRANSFER_SYNTAX = {  # what the generic_compressed cases exercise
    "generic_compressed_j2k_001": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "generic_compressed_jpeg_001": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "generic_compressed_jpegls_001": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "generic_compressed_rle_001": "1.2.840.10008.1.2.5",  # RLE lossless
}


def _image(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


def test_all_seven_dicom2nifti_cases_are_present() -> None:
    assert len(D2N_CASES) == 7


@pytest.mark.parametrize("case", D2N_CASES)
def test_dicom2nifti_series_match_reference_nifti(case: str) -> None:
    volume = read_volume(D2N / case / "dicom")
    reference = sitk.ReadImage(str(D2N / case / "001_ground_truth.nii.gz"))
    assert volume.modality == "MR"
    assert volume.source_format == "dicom"
    # dicom2nifti stores the slices in the opposite order (PIL vs our PIR...): compare in one orientation.
    ours = sitk.DICOMOrient(_image(volume), "LPS")
    theirs = sitk.DICOMOrient(reference, "LPS")
    _assert_same_geometry(ours, theirs)
    a = sitk.GetArrayFromImage(ours).astype(np.int64)
    b = sitk.GetArrayFromImage(theirs).astype(np.int64)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("case", D2N_CASES)
def test_dicom2nifti_voxel_corners_map_to_same_points(case: str) -> None:
    volume = read_volume(D2N / case / "dicom")
    ours = _image(volume)
    reference = sitk.ReadImage(str(D2N / case / "001_ground_truth.nii.gz"))
    size = ours.GetSize()
    for corner in [(0, 0, 0), (size[0] - 1, 0, 0), (0, size[1] - 1, 0), (0, 0, size[2] - 1),
                   (size[0] - 1, size[1] - 1, size[2] - 1)]:
        point = ours.TransformIndexToPhysicalPoint(corner)
        index = reference.TransformPhysicalPointToContinuousIndex(point)
        np.testing.assert_allclose(index, np.round(index), atol=1e-3)
        assert int(ours[corner]) == int(reference[[round(i) for i in index]])


@pytest.mark.parametrize("case", sorted(TRANSFER_SYNTAX))
def test_compressed_transfer_syntaxes_decode(case: str) -> None:
    import pydicom

    files = sorted((D2N / case / "dicom").iterdir())
    assert str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == \
        TRANSFER_SYNTAX[case]
    volume = read_volume(D2N / case / "dicom")
    assert volume.array.any()
    # the four cases are one series in four lossless codecs: identical voxels and geometry
    rle = read_volume(D2N / "generic_compressed_rle_001" / "dicom")
    assert np.array_equal(volume.array, rle.array)
    assert (volume.origin, volume.spacing, volume.direction) == (rle.origin, rle.spacing, rle.direction)


def test_totalsegmentator_series_matches_its_segmentation_geometry() -> None:
    volume = read_volume(TOTALSEG / "dicom")
    seg = sitk.ReadImage(str(TOTALSEG / "example_seg_dicom.nii.gz"))
    assert volume.shape == (20, 512, 512)
    assert volume.modality == "CT"
    assert volume.array.dtype == np.int16 and volume.array.min() == -1024
    assert volume.meta["series_uid"] == ""  # empty UID in the files, still read
    assert volume.meta["series_description"] == "CT Body 3.0"
    np.testing.assert_allclose(volume.spacing, seg.GetSpacing(), atol=1e-6)
    # The NIfTI stores the y axis flipped (direction diag(1, -1, 1)); the voxel grid is the same.
    _assert_same_geometry(sitk.DICOMOrient(_image(volume), "LPS"), sitk.DICOMOrient(seg, "LPS"), tol=1e-4)


def test_single_file_reads_its_whole_series() -> None:
    files = sorted((TOTALSEG / "dicom").iterdir())
    assert is_dicom_file(files[5])  # no .dcm suffix: found by the DICM marker
    one = read_volume(files[5])
    folder = read_volume(TOTALSEG / "dicom")
    assert one.shape == folder.shape
    assert np.array_equal(one.array, folder.array)
    assert one.path == files[5]


def test_metadata_lists_files_in_slice_order() -> None:
    volume = read_volume(DCMQI / "ct-3slice")
    files = volume.meta["dicom_files"]
    assert len(files) == volume.shape[0] == 3
    assert volume.meta["series_uid"].startswith("1.2.392.")
    assert volume.meta["study_uid"]
    import pydicom

    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert z == sorted(z) or z == sorted(z, reverse=True)
    first = volume.origin[2]
    assert min(abs(first - zz) for zz in z) < 1e-3 and abs(first - z[0]) < 1e-3


def _two_series_folder(tmp_path: Path, first: Path, second: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, source in enumerate((first, second)):
        for f in sorted(source.iterdir()):
            if is_dicom_file(f):
                shutil.copy(f, folder / f"s{i}_{f.name}")
    return folder


def test_folder_with_several_series_picks_the_largest(tmp_path: Path) -> None:
    folder = _two_series_folder(tmp_path, D2N / "siemens_anatomical_001" / "dicom", DCMQI / "ct-3slice")
    series = list_series(folder)
    assert [len(s.files) for s in series] == [4, 3]
    volume = read_volume(folder)
    assert volume.modality == "MR" and volume.shape == (4, 256, 256)
    assert len(volume.meta["series_available"]) == 2


def test_series_uid_selects_another_series(tmp_path: Path) -> None:
    folder = _two_series_folder(tmp_path, D2N / "siemens_anatomical_001" / "dicom", DCMQI / "ct-3slice")
    ct_uid = next(s.uid for s in list_series(folder) if s.modality == "CT")
    volume = read_volume(folder, series_uid=ct_uid)
    assert volume.modality == "CT" and volume.shape == (3, 512, 512)


def test_unknown_series_uid_lists_available(tmp_path: Path) -> None:
    folder = _two_series_folder(tmp_path, D2N / "siemens_anatomical_001" / "dicom", DCMQI / "ct-3slice")
    uids = [s.uid for s in list_series(folder)]
    with pytest.raises(InputError, match="available") as info:
        read_volume(folder, series_uid="1.2.3.4")
    assert "mixed" in str(info.value)
    assert all(uid in str(info.value) for uid in uids)


def test_tie_goes_to_smallest_uid(tmp_path: Path) -> None:
    folder = _two_series_folder(tmp_path, D2N / "hitachi_anatomical_001" / "dicom",
                                D2N / "philips_anatomical_001" / "dicom")
    series = list_series(folder)
    assert [len(s.files) for s in series] == [4, 4]
    assert choose_series(folder).uid == min(s.uid for s in series)


def test_dicom_seg_is_not_an_image() -> None:
    with pytest.raises(InputError, match="SEG") as info:
        read_volume(DCMQI / "liver.dcm")
    assert "liver.dcm" in str(info.value)


def test_folder_with_only_a_seg_has_no_images(tmp_path: Path) -> None:
    folder = tmp_path / "segonly"
    folder.mkdir()
    shutil.copy(DCMQI / "liver.dcm", folder / "liver.dcm")
    with pytest.raises(InputError, match="no images") as info:
        read_volume(folder)
    assert "segonly" in str(info.value)


def test_corrupt_dcm_file(tmp_path: Path) -> None:
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(InputError) as info:
        read_volume(tmp_path / "broken.dcm")
    assert "broken.dcm" in str(info.value)


def test_two_series_folder_warns_naming_the_other_and_the_sidecar_says_which(tmp_path: Path, small_checkpoint,
                                                                              caplog) -> None:
    """The issue's folder: Siemens (4 files, 256x256) + Hitachi (4 files, 64x64): one read, the other named."""
    import json
    import logging
    import subprocess
    import sys

    folder = _two_series_folder(tmp_path, D2N / "siemens_anatomical_001" / "dicom",
                                D2N / "hitachi_anatomical_001" / "dicom")
    series = list_series(folder)
    chosen, other = series
    caplog.set_level(logging.WARNING)
    volume = read_volume(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and other.uid in warnings[0] and "--series" in warnings[0], warnings
    assert volume.meta["dicom_series"] == {"StudyInstanceUID": chosen.study_uid, "SeriesInstanceUID": chosen.uid,
                                           "SeriesDescription": chosen.description, "Modality": "MR"}
    caplog.clear()
    picked = read_volume(folder, series_uid=other.uid)  # chosen explicitly: no warning
    assert picked.meta["dicom_series"]["SeriesInstanceUID"] == other.uid
    read_volume(Path(other.files[0]))  # one file: its own series, no warning
    read_volume(D2N / "siemens_anatomical_001" / "dicom")  # one series: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    out = tmp_path / "seg.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "text3dsam_cli", "segment", str(folder), "brain", "-o", str(out),
                           "-m", str(small_checkpoint), "--device", "cpu", "--mode", "whole"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stderr = " ".join(proc.stderr.split())
    assert f"not read: {other.uid}" in stderr and "--series UID" in stderr and str(folder) in stderr
    assert stderr.count("DICOM image series") == 1
    sidecar = json.loads(out.with_name("seg.json").read_text())
    assert sidecar["dicom_series"]["SeriesInstanceUID"] == chosen.uid
    assert sidecar["dicom_series"]["StudyInstanceUID"] == chosen.study_uid
    assert set(sidecar["dicom_series"]) == {"StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "Modality"}
    assert sidecar["geometry"]["shape_zyx"] == list(volume.shape)
