"""DICOM-SEG output: structure, round trip onto the source grid, real-series quirks and clear errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

import text3dsam_cli
from text3dsam_cli.errors import InputError, OutputError
from text3dsam_cli.io.readers import read_volume
from text3dsam_cli.io.volume import Volume

hd = pytest.importorskip("highdicom")

from text3dsam_cli.io.dicomseg import MISSING_HIGHDICOM, segment_numbers, write_dicom_seg  # noqa: E402

DATA = Path(__file__).parents[1].parent / "shared" / "data"
CT_3SLICE = DATA / "extra" / "dcmqi" / "ct-3slice"
MR_SIEMENS = DATA / "dicom" / "dicom2nifti" / "siemens_anatomical_001" / "dicom"
TOTALSEG = DATA / "dicom" / "totalsegmentator_ct" / "dicom"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PROMPTS = ["liver in the abdomen", "a tumour of the spleen"]


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_volume(CT_3SLICE)


@pytest.fixture(scope="module")
def mr() -> Volume:
    return read_volume(MR_SIEMENS)


def _boxes(volume: Volume, values: tuple[int, int] = (1, 2)) -> np.ndarray:
    """Two non-overlapping boxes; the second one is absent from slice 0 (so a frame is omitted)."""
    _, ny, nx = volume.shape
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[:, ny // 4: ny // 2, nx // 5: nx // 2] = values[0]
    labels[1:, ny // 2 + 3: ny - 7, nx // 2 + 1:] = values[1]
    return labels


def _ct_copy(folder: Path, **changes: object) -> Volume:
    """The 3-slice CT copied to ``folder`` with attributes changed (``None`` deletes one), read back."""
    folder.mkdir()
    for f in sorted(CT_3SLICE.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(folder / f.name)
    return read_volume(folder)


def _source_headers(volume: Volume) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.meta["dicom_files"]]


def _source_uid(ds: pydicom.Dataset) -> str:
    return str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)


def _reassemble(seg_path: Path, volume: Volume, label_values: list[int]) -> np.ndarray:
    """The SEG's segments put back on the volume's grid with pydicom only (frames -> slices by SOP UID)."""
    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    headers = _source_headers(volume)
    z_of_uid = {_source_uid(ds): z for z, ds in enumerate(headers)}
    value_of_segment = dict(zip(range(1, len(label_values) + 1), sorted(label_values)))
    out = np.zeros(volume.shape, dtype=np.int64)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        identification = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        z = z_of_uid[str(source.ReferencedSOPInstanceUID)]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in headers[z].ImagePositionPatient], atol=1e-4)
        assert not np.any(out[z][frame > 0]), "segments overlap"
        out[z][frame > 0] = value_of_segment[number]
    return out


def test_ct_series_round_trip(ct: Volume, tmp_path: Path) -> None:
    labels = _boxes(ct)
    path = write_dicom_seg(ct, labels, [1, 2], PROMPTS, tmp_path / "ct.seg.dcm", model_name="MagicXin/Text3DSAM")
    assert path == tmp_path / "ct.seg.dcm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.seg.dcm"]
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == PROMPTS
    assert [s.SegmentDescription for s in seg.SegmentSequence] == PROMPTS
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "MagicXin/Text3DSAM"
        assert algorithm.AlgorithmVersion == text3dsam_cli.__version__
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.meta["series_uid"]
    assert seg.StudyInstanceUID == ct.meta["study_uid"]
    assert seg.FrameOfReferenceUID == ct.meta["frame_of_reference_uid"]
    assert seg.SeriesInstanceUID != ct.meta["series_uid"]
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        _source_uid(ds) for ds in _source_headers(ct)}
    assert int(seg.NumberOfFrames) == 3 + 2  # segment 2 is empty on slice 0: that frame is omitted
    np.testing.assert_array_equal(_reassemble(path, ct, [1, 2]), labels)


def test_files_are_in_array_order(ct: Volume, mr: Volume) -> None:
    """``meta['dicom_files'][z]`` is the file SimpleITK put at array index z (positions agree)."""
    for volume in (ct, mr):
        axes = np.asarray(volume.direction).reshape(3, 3)
        for z, ds in enumerate(_source_headers(volume)):
            expected = np.asarray(volume.origin) + z * volume.spacing[2] * axes[:, 2]
            np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected, atol=1e-3)


def test_sagittal_mr_without_frame_of_reference(mr: Volume, tmp_path: Path) -> None:
    """The dicom2nifti MR series has no FrameOfReferenceUID or SliceThickness: both are filled for the SEG."""
    assert all("FrameOfReferenceUID" not in ds for ds in _source_headers(mr))
    labels = _boxes(mr, (1, 2))
    first = write_dicom_seg(mr, labels, [1, 2], PROMPTS, tmp_path / "a.dcm")
    second = write_dicom_seg(mr, labels, [1, 2], PROMPTS, tmp_path / "b.dcm")
    seg = hd.seg.segread(first)
    assert seg.number_of_segments == 2
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == PROMPTS
    other = pydicom.dcmread(second, stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == other.FrameOfReferenceUID  # derived from the series, not random
    assert seg.SeriesInstanceUID != other.SeriesInstanceUID
    assert "PatientAge" not in seg  # the source's "0Y" is no valid age string: not copied
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(1.0)
    uids = [_source_uid(ds) for ds in _source_headers(mr)]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, labels)
    np.testing.assert_array_equal(_reassemble(first, mr, [1, 2]), labels)


def test_totalsegmentator_series_with_empty_uids_is_refused(tmp_path: Path) -> None:
    volume = read_volume(TOTALSEG)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[5:9, 200:260, 180:300] = 1
    target = tmp_path / "out" / "ts.seg.dcm"
    with pytest.raises(InputError, match="empty StudyInstanceUID and SeriesInstanceUID, ") as info:
        write_dicom_seg(volume, labels, [1], ["liver"], target)
    assert "\n" not in str(info.value)
    assert not target.exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_totalsegmentator_copy_with_study_and_series_uids(tmp_path: Path) -> None:
    """With Study/Series UIDs present, the empty SOP Class/Instance UIDs are taken from the file meta."""
    series = tmp_path / "series"
    series.mkdir()
    for f in sorted(TOTALSEG.iterdir()):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.save_as(series / f.name)
    volume = read_volume(series)
    assert volume.meta["series_uid"] == "1.2.826.0.1.3680043.8.498.2"
    headers = _source_headers(volume)
    assert all(not ds.get("SOPInstanceUID") for ds in headers)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[3:12, 200:260, 180:300] = 1
    labels[10:17, 300:340, 100:150] = 2
    path = write_dicom_seg(volume, labels, [1, 2], PROMPTS, tmp_path / "ts.seg.dcm")
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    assert seg.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.826.0.1.3680043.8.498.2"
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in headers}
    np.testing.assert_array_equal(_reassemble(path, volume, [1, 2]), labels)


def test_label_values_are_renumbered_in_ascending_order(ct: Volume, tmp_path: Path) -> None:
    assert segment_numbers([7, 3]) == {3: 1, 7: 2}
    assert segment_numbers([2, 1, 3]) == {1: 1, 2: 2, 3: 3}
    labels = _boxes(ct, (7, 3))
    path = write_dicom_seg(ct, labels, [7, 3], ["seven", "three"], tmp_path / "x.dcm")
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "three"), (2, "seven")]
    np.testing.assert_array_equal(_reassemble(path, ct, [7, 3]), labels)


def test_empty_segment_is_kept(ct: Volume, tmp_path: Path) -> None:
    labels = _boxes(ct)
    prompts = [*PROMPTS, "a structure that is not there"]
    path = write_dicom_seg(ct, labels, [1, 2, 3], prompts, tmp_path / "x.dcm")
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == 3
    assert seg.get_segment_description(3).segment_label == prompts[2]
    numbers = {int(i.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for i in seg.PerFrameFunctionalGroupsSequence}
    assert numbers == {1, 2}
    np.testing.assert_array_equal(_reassemble(path, ct, [1, 2, 3]), labels)


def test_all_segments_empty(ct: Volume, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    labels = np.zeros(ct.shape, dtype=np.uint8)
    path = write_dicom_seg(ct, labels, [1, 2], PROMPTS, tmp_path / "x.dcm")
    assert capfd.readouterr().err == ""
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    assert len(seg.SegmentSequence) == 2
    assert int(seg.NumberOfFrames) == 2 * 3
    np.testing.assert_array_equal(_reassemble(path, ct, [1, 2]), labels)


def test_long_and_non_ascii_prompts(ct: Volume, tmp_path: Path) -> None:
    long_prompt = "the left kidney\\cortex " + "and its surroundings " * 6
    prompts = [long_prompt, "Läsion der Leber (肝脏)"]
    path = write_dicom_seg(ct, _boxes(ct), [1, 2], prompts, tmp_path / "x.dcm")
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    first, second = seg.SegmentSequence
    assert len(first.SegmentLabel) <= 64 and "\\" not in first.SegmentLabel
    assert first.SegmentLabel.startswith("the left kidney/cortex and")
    assert first.SegmentDescription == long_prompt.strip()
    assert second.SegmentLabel == prompts[1]
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert str(seg.PatientName) == str(_source_headers(ct)[0].PatientName)


def test_latin1_source_with_non_ascii_prompt(tmp_path: Path) -> None:
    volume = _ct_copy(tmp_path / "series", SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")
    labels = np.zeros(volume.shape, dtype=bool)
    labels[:, 100:200, 100:200] = True
    ascii_path = write_dicom_seg(volume, labels, [1], ["liver"], tmp_path / "a.dcm")
    utf8_path = write_dicom_seg(volume, labels, [1], ["Leber ü"], tmp_path / "b.dcm")
    kept, switched = pydicom.dcmread(ascii_path), pydicom.dcmread(utf8_path)
    assert kept.SpecificCharacterSet == "ISO_IR 100"
    assert switched.SpecificCharacterSet == "ISO_IR 192"
    assert str(kept.PatientName) == str(switched.PatientName) == "Müller^Jürgen"
    assert switched.SegmentSequence[0].SegmentLabel == "Leber ü"
    np.testing.assert_array_equal(_reassemble(utf8_path, volume, [1]), labels)


def test_source_highdicom_refuses(tmp_path: Path) -> None:
    volume = _ct_copy(tmp_path / "series", PixelSpacing=None)
    target = tmp_path / "x.dcm"
    with pytest.raises(InputError, match="highdicom refuses it") as info:
        write_dicom_seg(volume, _boxes(volume), [1, 2], PROMPTS, target)
    assert "\n" not in str(info.value)
    assert not target.exists()


def test_unknown_source_sop_class(ct: Volume, tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    volume = ct.with_array(ct.array)
    volume.meta["dicom_files"] = []
    for f in ct.meta["dicom_files"]:
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.77"
        ds.save_as(folder / Path(f).name)
        volume.meta["dicom_files"].append(str(folder / Path(f).name))
    with pytest.raises(InputError, match=r"does not know its SOP class \(1.2.826.0.1.3680043.8.498.77"):
        write_dicom_seg(volume, _boxes(ct), [1, 2], PROMPTS, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_source_file_order_does_not_matter(ct: Volume, tmp_path: Path) -> None:
    labels = _boxes(ct)
    shuffled = ct.with_array(ct.array)
    shuffled.meta["dicom_files"] = list(reversed(ct.meta["dicom_files"]))
    path = write_dicom_seg(shuffled, labels, [1, 2], PROMPTS, tmp_path / "x.dcm")
    np.testing.assert_array_equal(_reassemble(path, ct, [1, 2]), labels)


def test_files_that_do_not_fit_the_volume(ct: Volume, mr: Volume, tmp_path: Path) -> None:
    wrong = ct.with_array(ct.array)
    wrong.meta["dicom_files"] = ct.meta["dicom_files"][:2]
    with pytest.raises(InputError, match="3 slices but 2 source files"):
        write_dicom_seg(wrong, _boxes(ct), [1, 2], PROMPTS, tmp_path / "x.dcm")
    x, y, z = ct.origin
    moved = Volume(ct.array, ct.spacing, (x, y, z + 10 * ct.spacing[2]), ct.direction, ct.path, "dicom", "CT",
                   dict(ct.meta))
    with pytest.raises(InputError, match="do not map one to one"):
        write_dicom_seg(moved, _boxes(ct), [1, 2], PROMPTS, tmp_path / "x.dcm")
    halfway = Volume(ct.array, ct.spacing, (x, y, z + 0.5 * ct.spacing[2]), ct.direction, ct.path, "dicom",
                     "CT", dict(ct.meta))
    with pytest.raises(InputError, match="between the volume's slices"):
        write_dicom_seg(halfway, _boxes(ct), [1, 2], PROMPTS, tmp_path / "x.dcm")
    assert not any(tmp_path.iterdir())


def test_missing_highdicom(ct: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(OutputError) as info:
        write_dicom_seg(ct, _boxes(ct), [1, 2], PROMPTS, tmp_path / "x.dcm")
    assert str(info.value) == f"{tmp_path / 'x.dcm'}: {MISSING_HIGHDICOM}"


def test_volume_not_from_dicom(tmp_path: Path) -> None:
    volume = Volume(np.zeros((2, 4, 4), dtype=np.int16), path=tmp_path / "ct.nii.gz", source_format="nifti")
    with pytest.raises(InputError, match="needs a DICOM series input"):
        write_dicom_seg(volume, np.zeros((2, 4, 4), np.uint8), [1], ["liver"], tmp_path / "x.dcm")


def test_inconsistent_arguments(ct: Volume, tmp_path: Path) -> None:
    labels = _boxes(ct)
    with pytest.raises(ValueError, match="does not match the volume shape"):
        write_dicom_seg(ct, labels[:2], [1, 2], PROMPTS, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="not among the label values"):
        write_dicom_seg(ct, labels, [1], PROMPTS[:1], tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="label values for"):
        write_dicom_seg(ct, labels, [1, 2], PROMPTS[:1], tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="duplicate"):
        write_dicom_seg(ct, labels, [1, 1], PROMPTS, tmp_path / "x.dcm")
    assert not any(tmp_path.iterdir())


def test_failed_write_leaves_no_temp_file(ct: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.seg.dcm"
    target.write_bytes(b"previous")

    def broken_save(self: pydicom.Dataset, filename: str | Path, *args: object, **kwargs: object) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", broken_save)
    with pytest.raises(OutputError, match=r"(?i)no space left on device"):
        write_dicom_seg(ct, _boxes(ct), [1, 2], PROMPTS, target)
    assert [p.name for p in tmp_path.iterdir()] == ["x.seg.dcm"]
    assert target.read_bytes() == b"previous"


def test_sources_are_not_modified(mr: Volume, tmp_path: Path) -> None:
    before = {f: Path(f).read_bytes() for f in mr.meta["dicom_files"]}
    write_dicom_seg(mr, _boxes(mr), [1, 2], PROMPTS, tmp_path / "x.dcm")
    assert all(Path(f).read_bytes() == data for f, data in before.items())
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
def test_dciodvfy_finds_no_errors(ct: Volume, mr: Volume, tmp_path: Path) -> None:
    for name, volume in (("ct", ct), ("mr", mr)):
        path = write_dicom_seg(volume, _boxes(volume), [1, 2, 3], [*PROMPTS, "empty"], tmp_path / f"{name}.dcm")
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors
