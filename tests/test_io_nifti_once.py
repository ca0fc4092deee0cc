"""Float .nii.gz files are decompressed once: same voxels and geometry as ITK, NaN and truncation still refused."""

from __future__ import annotations

import gzip
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from text3dsam_cli.errors import InputError
from text3dsam_cli.io import images, read_volume


def _affine(kind: str) -> np.ndarray:
    a = np.diag([0.8, 0.7, 2.5, 1.0])
    if kind == "flipped":
        a[0, 0], a[2, 2] = -0.8, -2.5
    elif kind == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, 0.7, 2.5])
    a[:3, 3] = [-10.0, 20.0, 5.5]
    return a


def _write(path, array, affine, dtype=np.float32, form="both", scale=None):
    image = nib.Nifti1Image(array.astype(dtype), affine)
    if form == "sform":
        image.set_qform(None, code=0)
    elif form == "qform":
        image.set_sform(None, code=0)
    if scale is not None:
        image.header.set_slope_inter(*scale)
    nib.save(image, str(path))
    return path


def _itk(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.mark.parametrize("kind", ["plain", "flipped", "oblique"])
@pytest.mark.parametrize("form", ["both", "sform", "qform"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.dtype(">f4")])
def test_same_voxels_and_geometry_as_itk(tmp_path, kind, form, dtype, monkeypatch):
    rng = np.random.default_rng(0)
    array = rng.normal(0, 100, (7, 9, 5))  # nibabel order (x, y, z)
    path = _write(tmp_path / "x.nii.gz", array, _affine(kind), dtype, form)
    monkeypatch.setattr(images, "_check_nifti_finite", lambda p: pytest.fail("decompressed a second time"))
    volume = read_volume(path)
    expected, spacing, origin, direction = _itk(path)
    assert volume.array.dtype == expected.dtype and volume.array.shape == expected.shape
    np.testing.assert_array_equal(volume.array, expected)
    np.testing.assert_allclose(volume.spacing, spacing, atol=1e-6)
    np.testing.assert_allclose(volume.origin, origin, atol=1e-5)
    np.testing.assert_allclose(volume.direction, direction, atol=1e-6)


def test_nan_refused(tmp_path):
    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"NaN|finite"):
        read_volume(_write(tmp_path / "nan.nii.gz", array, _affine("plain")))


def test_truncated_refused(tmp_path):
    path = _write(tmp_path / "t.nii.gz", np.ones((30, 30, 30)), _affine("plain"))
    raw = gzip.decompress(path.read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 5000]))
    with pytest.raises(InputError, match="truncated"):
        read_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "cut2.nii.gz").write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(InputError, match=r"truncated|corrupt"):
        read_volume(tmp_path / "cut2.nii.gz")


def test_multi_member_gzip(tmp_path):
    path = _write(tmp_path / "m.nii", np.arange(60, dtype=np.float32).reshape(3, 4, 5), _affine("plain"))
    raw = path.read_bytes()
    half = len(raw) // 2
    (tmp_path / "m.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    path.unlink()
    volume = read_volume(tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(volume.array, _itk(tmp_path / "m.nii.gz")[0])


def test_scaled_float_uses_itk_path(tmp_path):
    path = _write(tmp_path / "s.nii.gz", np.ones((4, 5, 6)), _affine("plain"), scale=(2.0, 1.0))
    assert images._read_float_nifti_gz_once(path) is None
    np.testing.assert_array_equal(read_volume(path).array, _itk(path)[0])


linux_fork = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                                reason="the child-process read is Linux only")


@linux_fork
@pytest.mark.parametrize("dtype", [np.float32, np.dtype(">f4"), np.float64])
def test_child_process_read_equals_read_volume(tmp_path, dtype):
    rng = np.random.default_rng(1)
    path = _write(tmp_path / "c.nii.gz", rng.normal(0, 100, (11, 7, 6)), _affine("oblique"), dtype)
    finish = images.start_reading_in_child(path, lambda: read_volume(path))
    assert finish is not None
    volume, plain = finish(), read_volume(path)
    assert volume.array.dtype == plain.array.dtype and volume.array.flags.writeable
    np.testing.assert_array_equal(volume.array, plain.array)
    assert (volume.spacing, volume.origin, volume.direction) == (plain.spacing, plain.origin, plain.direction)
    volume.array[0, 0, 0] = 1.0  # normalised in place by the pipeline: the shared memory is writable


@linux_fork
def test_child_process_read_falls_back_and_words_errors(tmp_path):
    path = _write(tmp_path / "t.nii.gz", np.ones((30, 30, 30)), _affine("plain"))
    raw = gzip.decompress(path.read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 5000]))
    cut = tmp_path / "cut.nii.gz"
    finish = images.start_reading_in_child(cut, lambda: read_volume(cut))
    assert finish is not None  # the header is fine: the child finds the data short, this process says so
    with pytest.raises(InputError, match="truncated"):
        finish()
    nan = np.ones((4, 5, 6), np.float32)
    nan[1, 2, 3] = np.nan
    nan_path = _write(tmp_path / "nan.nii.gz", nan, _affine("plain"))
    finish = images.start_reading_in_child(nan_path, lambda: read_volume(nan_path))
    with pytest.raises(InputError, match=r"NaN|finite"):
        finish()


@linux_fork
def test_child_process_read_only_for_plain_float_nifti_gz(tmp_path):
    ones = np.ones((4, 5, 6))
    def start(path):
        return images.start_reading_in_child(path, lambda: pytest.fail("no child was started"))

    assert start(_write(tmp_path / "i.nii.gz", ones, _affine("plain"), np.int16)) is None
    assert start(_write(tmp_path / "f.nii", ones, _affine("plain"))) is None
    assert start(_write(tmp_path / "s.nii.gz", ones, _affine("plain"), scale=(2.0, 1.0))) is None


def test_segment_starts_the_first_float_nifti_in_a_child(tmp_path):
    import functools

    from text3dsam_cli.io.readers import start_reading

    path = _write(tmp_path / "x.nii.gz", np.ones((4, 5, 6)), _affine("plain"))
    finish = start_reading(path)
    child = not isinstance(finish, functools.partial)  # a plain read_volume call otherwise
    assert child == (sys.platform == "linux")
    np.testing.assert_array_equal(finish().array, read_volume(path).array)
    assert isinstance(start_reading(tmp_path), functools.partial)  # a folder
    assert isinstance(start_reading(tmp_path / "missing.nii.gz"), functools.partial)
    with pytest.raises(InputError, match="no such file"):
        start_reading(tmp_path / "missing.nii.gz")()
