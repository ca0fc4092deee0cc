"""A DICOM series read in slabs on several threads gives exactly what one ITK series reader gives: voxels,
dtype, origin, spacing and direction, for straight, oblique, rescaled and JPEG 2000 series; bad series are
still refused with the whole-series reader's words."""

from __future__ import annotations

import copy
import itertools
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DATA
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from text3dsam_cli import parallel
from text3dsam_cli.errors import InputError
from text3dsam_cli.io import dicom, read_volume

TS_CT = DATA / "dicom" / "totalsegmentator_ct" / "dicom"
REAL = [TS_CT, *(DATA / "dicom" / "dicom2nifti" / name / "dicom" for name in (
    "generic_compressed_j2k_001", "generic_compressed_jpeg_001", "generic_compressed_jpegls_001",
    "generic_compressed_rle_001", "hitachi_anatomical_001", "philips_anatomical_001", "siemens_anatomical_001"))]


@pytest.fixture()
def slabs(monkeypatch):
    """Slabs of 2+ files on 3 threads, so that short series are read in slabs too."""
    monkeypatch.setattr(dicom, "SLAB_FILES", 2)
    parallel.set_thread_budget(3)
    yield
    parallel.set_thread_budget(None)


def _itk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_same(volume, image: sitk.Image) -> None:
    expected = sitk.GetArrayFromImage(image)
    assert volume.array.dtype == expected.dtype and volume.array.shape == expected.shape
    np.testing.assert_array_equal(volume.array, expected)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), rtol=1e-12, atol=0)
    assert volume.origin == image.GetOrigin()
    assert volume.direction == image.GetDirection()


def _series(folder: Path, count: int, *, tilt: float = 0.0, slope: float = 1.0, step: float = 1.25,
            shuffle: bool = True) -> Path:
    """``count`` single-frame 24x20 slices, positions along the slice normal (IOP rotated by ``tilt``), written
    in a shuffled file order (GDCM sorts them geometrically)."""
    template = pydicom.dcmread(sorted(TS_CT.iterdir())[0])
    folder.mkdir()
    rng = np.random.default_rng(count)
    c, s = np.cos(tilt), np.sin(tilt)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, c, s])
    normal = np.cross(row, col)
    series, frame = generate_uid(), generate_uid()
    order = rng.permutation(count) if shuffle else np.arange(count)
    for n, i in enumerate(order):
        ds = copy.deepcopy(template)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(i) + 1
        ds.ImageOrientationPatient = [*row.tolist(), *col.tolist()]
        ds.ImagePositionPatient = (np.array([-12.5, 30.0, 7.0]) + i * step * normal).round(4).tolist()
        ds.Rows, ds.Columns = 20, 24
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.9], step
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
        ds.PixelData = rng.integers(-1000, 3000, (20, 24), dtype=np.int16).tobytes()
        ds.save_as(folder / f"f{n:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.mark.parametrize("tilt", [0.0, 0.35])
@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_same_as_one_series_reader(tmp_path, slabs, tilt, slope):
    folder = _series(tmp_path / "s", 23, tilt=tilt, slope=slope)
    assert len(dicom._slab_bounds(23)) == 3
    _assert_same(read_volume(folder), _itk(folder))


@pytest.mark.parametrize("folder", REAL, ids=lambda p: p.parent.name)
def test_real_series(slabs, folder):
    """Real series (JPEG 2000, JPEG, JPEG-LS, RLE and three vendors' MR) from ../shared/data."""
    assert len(dicom._slab_bounds(len(list(folder.iterdir())))) >= 2
    _assert_same(read_volume(folder), _itk(folder))


def test_slab_bounds():
    parallel.set_thread_budget(16)
    try:
        assert dicom._slab_bounds(15) == []  # shorter than two slabs: one reader
        assert dicom._slab_bounds(40) == [(0, 20), (20, 40)]
        bounds = dicom._slab_bounds(1000)
        assert len(bounds) == 16 and bounds[0][0] == 0 and bounds[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        parallel.set_thread_budget(1)
        assert dicom._slab_bounds(1000) == []
    finally:
        parallel.set_thread_budget(None)


def test_slices_of_another_size_fall_back_to_itks_words(tmp_path, slabs):
    folder = _series(tmp_path / "s", 12, shuffle=False)
    odd = pydicom.dcmread(folder / "f008.dcm")  # the first file of the third slab
    odd.Rows, odd.Columns = 10, 12
    odd.PixelData = np.zeros((10, 12), np.int16).tobytes()
    odd.save_as(folder / "f008.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="cannot read the DICOM series"):
        read_volume(folder)


def test_the_completeness_check_still_refuses(tmp_path, slabs):
    folder = _series(tmp_path / "s", 12, shuffle=False)
    (folder / "f005.dcm").unlink()  # a missing slice: uneven spacing
    with pytest.raises(InputError, match="not evenly spaced"):
        read_volume(folder)


def _count_series_reads(monkeypatch) -> list[int]:
    """The number of files of each ``ImageSeriesReader`` call from now on, in a list filled as they happen."""
    calls: list[int] = []
    real = sitk.ImageSeriesReader.Execute

    def execute(self):
        calls.append(len(self.GetFileNames()))
        return real(self)

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", execute)
    return calls


def test_read_in_slabs_on_threads(tmp_path, slabs, monkeypatch):
    """The slab path is the one taken (several ImageSeriesReader calls, one per slab)."""
    folder = _series(tmp_path / "s", 9)
    calls = _count_series_reads(monkeypatch)
    read_volume(folder)
    assert sorted(calls) == [3, 3, 3]


def test_non_utf8_names(tmp_path, slabs):
    folder = _series(tmp_path / "s", 8)
    odd = tmp_path / "odd"
    odd.mkdir()
    for i, path in enumerate(sorted(folder.iterdir())):
        shutil.copyfile(path, odd / (f"{i}".encode() + b"\xff.dcm").decode("utf-8", "surrogateescape"))
    _assert_same(read_volume(odd), _itk(folder))


@pytest.mark.parametrize("threads", [None, 1])
def test_segment_threads_bound_the_first_read(tmp_path, small_checkpoint, monkeypatch, threads):
    """`segment --threads 1` reads even the first input (read while torch is imported) with one reader."""
    import torch
    from typer.testing import CliRunner

    from text3dsam_cli.cli import app

    monkeypatch.setattr(dicom, "SLAB_FILES", 2)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 3)
    folder = _series(tmp_path / "s", 9)
    calls = _count_series_reads(monkeypatch)
    args = ["segment", str(folder), "liver", "-m", str(small_checkpoint), "-o", str(tmp_path / "out.nii.gz")]
    torch_threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, args + (["--threads", str(threads)] if threads else []))
    finally:  # --threads sets process-wide limits: give the other tests theirs back
        parallel.set_thread_budget(None)
        torch.set_num_threads(torch_threads)
    assert result.exit_code == 0, result.output
    assert sorted(calls) == ([9] if threads == 1 else [3, 3, 3])
