"""Plain-scalar .nii.gz files (float and integer) are decompressed once: same voxels, dtype and geometry as ITK,
NaN and truncation still refused; scaled voxels go through ITK."""

from __future__ import annotations

import gzip

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
    image = nib.Nifti1Image(array.astype(dtype), affine, dtype=np.dtype(dtype))
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


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.dtype(">i2")])
def test_integer_types_same_as_itk(tmp_path, dtype):
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    array = rng.integers(max(info.min, -3000), min(info.max, 3000), (6, 8, 5), endpoint=True)
    path = _write(tmp_path / "i.nii.gz", array, _affine("oblique"), dtype)
    volume = images._read_nifti_gz_once(path)  # what read_volume takes (None would send it through ITK)
    assert volume is not None
    np.testing.assert_array_equal(read_volume(path).array, volume.array)
    expected, spacing, origin, direction = _itk(path)
    np.testing.assert_allclose(volume.spacing, spacing, atol=1e-6)
    assert volume.array.dtype == expected.dtype and volume.array.dtype.isnative
    np.testing.assert_array_equal(volume.array, expected)
    np.testing.assert_allclose(volume.origin, origin, atol=1e-5)
    np.testing.assert_allclose(volume.direction, direction, atol=1e-6)


def test_scaled_integers_use_itk_path(tmp_path):
    path = _write(tmp_path / "s.nii.gz", np.arange(120).reshape(4, 5, 6), _affine("plain"), np.int16,
                  scale=(0.5, -10.0))
    assert images._read_nifti_gz_once(path) is None
    volume = read_volume(path)
    expected = _itk(path)[0]
    assert volume.array.dtype == expected.dtype
    np.testing.assert_array_equal(volume.array, expected)


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
    assert images._read_nifti_gz_once(path) is None
    np.testing.assert_array_equal(read_volume(path).array, _itk(path)[0])



@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_header_bomb_refused_before_allocation(tmp_path, dtype, monkeypatch):
    """A small .nii.gz claiming 2000^3 voxels is refused from its header (the once path allocates the whole
    decompressed size up front)."""
    path = _write(tmp_path / "b.nii", np.zeros((4, 4, 4)), _affine("plain"), dtype)
    raw = bytearray(path.read_bytes())
    raw[42:48] = np.array([2000, 2000, 2000], "<i2").tobytes()  # dim[1:4]
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated before the size check"))
    with pytest.raises(InputError, match="more than the limit"):
        images._read_nifti_gz_once(tmp_path / "b.nii.gz")


def test_bad_crc_refused(tmp_path):
    path = _write(tmp_path / "c.nii.gz", np.arange(120, dtype=np.float32).reshape(4, 5, 6), _affine("plain"))
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # the gzip trailer's CRC-32
    (tmp_path / "crc.nii.gz").write_bytes(bytes(raw))
    with pytest.raises(InputError):  # by ITK's header read or the CRC check, whichever meets it first
        read_volume(tmp_path / "crc.nii.gz")
    big = _write(tmp_path / "b.nii.gz", np.random.default_rng(0).normal(size=(64, 64, 64)), _affine("plain"))
    raw = bytearray(big.read_bytes())
    raw[-8] ^= 0xFF
    (tmp_path / "crc2.nii.gz").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"corrupt"):
        images._read_nifti_gz_once(tmp_path / "crc2.nii.gz")


@pytest.mark.parametrize("without", ["isal", "its C reader", "the C reader's constructor"])
def test_same_result_without_isal(tmp_path, monkeypatch, without):
    """Without ISA-L (optional at run time), or an ISA-L without its C gzip reader, zlib's loop reads the same
    voxels, multi-member files included."""
    array = np.random.default_rng(3).integers(-1000, 3000, (30, 20, 10)).astype(np.int16)
    plain = _write(tmp_path / "p.nii", array, _affine("oblique"), np.int16)
    raw = plain.read_bytes()
    path = tmp_path / "p.nii.gz"
    path.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    expected = images._read_nifti_gz_once(path).array
    if without == "isal":
        monkeypatch.setattr(images, "_isal", lambda module: None)
    elif without == "its C reader":
        from isal import isal_zlib
        monkeypatch.delattr(isal_zlib, "_GzipReader")
    else:
        from isal import isal_zlib

        def other_signature(fp, buffersize, mode):
            raise AssertionError("not called with this signature")

        monkeypatch.setattr(isal_zlib, "_GzipReader", other_signature)
    monkeypatch.setattr(images, "INFLATE_PIECE", 4096)  # many pieces and input chunks
    np.testing.assert_array_equal(images._read_nifti_gz_once(path).array, expected)
    np.testing.assert_array_equal(expected, _itk(path)[0])
