"""read_volume: NIfTI / NRRD / MetaImage reading and one-line errors for every kind of bad input."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from text3dsam_cli.errors import InputError
from text3dsam_cli.io.readers import image_format, read_volume, strip_image_suffix

DATA = Path(__file__).parents[1].parent / "shared" / "data"
NIFTI = DATA / "nifti" / "totalsegmentator"
PYRADIOMICS = DATA / "extra" / "pyradiomics"


def _write(path: Path, array: np.ndarray, is_vector: bool = False, **geometry) -> Path:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    for key, value in geometry.items():
        getattr(image, f"Set{key.capitalize()}")(value)
    sitk.WriteImage(image, str(path))
    return path


def _assert_same_as_sitk(path: Path) -> None:
    volume = read_volume(path)
    image = sitk.ReadImage(str(path))
    expected = sitk.GetArrayFromImage(image)
    assert volume.array.dtype == expected.dtype  # native dtype kept
    assert np.array_equal(volume.array, expected)
    assert volume.spacing == image.GetSpacing()
    assert volume.origin == image.GetOrigin()
    assert volume.direction == image.GetDirection()
    assert volume.modality is None
    assert volume.path == path


@pytest.mark.parametrize("name", ["example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "example_seg.nii.gz",
                                  "example_seg_mr.nii.gz"])
def test_reads_totalsegmentator_nifti(name: str) -> None:
    _assert_same_as_sitk(NIFTI / name)
    volume = read_volume(NIFTI / name)
    assert volume.source_format == "nifti"


def test_nifti_shapes_and_dtypes() -> None:
    ct = read_volume(NIFTI / "example_ct_sm.nii.gz")
    assert ct.shape == (30, 101, 122)  # (z, y, x) for a 122x101x30 image
    assert ct.array.dtype == np.int16
    assert ct.spacing == (3.0, 3.0, 3.0)
    assert ct.array.min() < -500  # Hounsfield units, untouched


@pytest.mark.parametrize("name", sorted(p.name for p in PYRADIOMICS.glob("*.nrrd")))
def test_reads_pyradiomics_nrrd(name: str) -> None:
    _assert_same_as_sitk(PYRADIOMICS / name)
    assert read_volume(PYRADIOMICS / name).source_format == "nrrd"


def test_reads_metaimage(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    path = _write(tmp_path / "img.mha", array, Spacing=(0.5, 0.6, 2.0), Origin=(1.0, 2.0, 3.0))
    volume = read_volume(path)
    assert volume.source_format == "metaimage"
    assert np.array_equal(volume.array, array) and volume.array.dtype == np.float32
    assert volume.spacing == (0.5, 0.6, 2.0) and volume.origin == (1.0, 2.0, 3.0)


def test_nifti_read_is_not_confused_by_a_sibling(tmp_path: Path) -> None:
    # ITK's NIfTI reader asked for x.nii.gz opens x.nii when both exist; read_volume must not.
    _write(tmp_path / "x.nii.gz", np.full((2, 3, 4), 1, np.uint8))
    _write(tmp_path / "x.nii", np.full((2, 3, 4), 2, np.uint8))
    assert int(read_volume(tmp_path / "x.nii.gz").array[0, 0, 0]) == 1
    assert int(read_volume(tmp_path / "x.nii").array[0, 0, 0]) == 2


def test_image_format_and_stems() -> None:
    assert image_format("a/b/Case.NII.GZ") == "nifti"
    assert image_format("c.nhdr") == "nrrd"
    assert image_format("c.mhd") == "metaimage"
    assert image_format("c.npz") == "npz"
    assert image_format("c.txt") is None
    assert strip_image_suffix("case_01.nii.gz") == "case_01"
    assert strip_image_suffix("case.mha") == "case"
    assert strip_image_suffix("README") == "README"


# --- bad inputs: each an InputError naming the file ------------------------------------------------------------


def _expect_error(path: Path, pattern: str) -> str:
    with pytest.raises(InputError, match=pattern) as info:
        read_volume(path)
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "missing.nii.gz", "no such file")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _expect_error(tmp_path / "empty.nii.gz", "empty file")


def test_truncated_nii_gz(tmp_path: Path) -> None:
    data = (NIFTI / "example_ct_sm.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "cut.nii.gz", "truncated")


def test_truncated_nii_gz_with_complete_gzip_stream(tmp_path: Path) -> None:
    raw = gzip.decompress((NIFTI / "example_ct_sm.nii.gz").read_bytes())
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[: len(raw) * 2 // 3]))
    _expect_error(tmp_path / "short.nii.gz", "truncated")


def test_truncated_uncompressed_nii(tmp_path: Path) -> None:
    raw = gzip.decompress((NIFTI / "example_ct_sm.nii.gz").read_bytes())
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    _expect_error(tmp_path / "cut.nii", "truncated")


def test_bgzf_style_multi_member_gzip_is_accepted(tmp_path: Path) -> None:
    raw = gzip.decompress((NIFTI / "example_ct_sm.nii.gz").read_bytes())
    half = len(raw) // 2
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    volume = read_volume(tmp_path / "multi.nii.gz")
    assert np.array_equal(volume.array, read_volume(NIFTI / "example_ct_sm.nii.gz").array)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("compress", [False, True])
def test_truncated_nrrd_and_mha(tmp_path: Path, suffix: str, compress: bool) -> None:
    full = tmp_path / f"full{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(20 * 30 * 40, dtype=np.int16).reshape(20, 30, 40)),
                    str(full), compress)
    data = full.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) * 2 // 3])
    _expect_error(tmp_path / f"cut{suffix}", "truncated")


def test_text_file_named_nii_gz(tmp_path: Path) -> None:
    (tmp_path / "notes.nii.gz").write_text("this is not an image\n")
    _expect_error(tmp_path / "notes.nii.gz", "not a NIfTI image")


def test_unsupported_file_type(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    _expect_error(tmp_path / "notes.txt", "unsupported file type")


def test_2d_image(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path / "flat.nii.gz", np.zeros((5, 6), np.float32)), "2-D image")


def test_single_slice_image(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path / "slice.nrrd", np.zeros((1, 5, 6), np.int16)), "single slice")


def test_4d_image(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path / "series.nii.gz", np.zeros((2, 3, 4, 5), np.float32)), "4-D image")


def test_4d_image_with_one_volume_is_3d(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.nii.gz", np.ones((1, 3, 4, 5), np.float32))
    assert read_volume(path).shape == (3, 4, 5)


def test_multi_component_image(tmp_path: Path) -> None:
    path = _write(tmp_path / "rgb.nii.gz", np.zeros((3, 4, 5, 3), np.uint8), is_vector=True)
    _expect_error(path, "3 values per voxel")


def test_nan_volume(tmp_path: Path) -> None:
    array = np.zeros((3, 4, 5), np.float32)
    array[2, 1, 0] = np.nan
    _expect_error(_write(tmp_path / "nan.nii.gz", array), "NaN")


def test_nan_only_volume(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path / "allnan.mha", np.full((3, 4, 5), np.nan, np.float64)), "NaN")


def test_infinite_volume(tmp_path: Path) -> None:
    array = np.zeros((3, 4, 5), np.float32)
    array[0, 0, 0] = np.inf
    _expect_error(_write(tmp_path / "inf.nrrd", array), "infinite")


def test_folder_without_images(tmp_path: Path) -> None:
    folder = tmp_path / "nothing_here"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images\n")
    _expect_error(folder, "no images")


def test_missing_metaimage_data_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "pair.mhd", np.zeros((3, 4, 5), np.uint8))
    for raw in tmp_path.glob("pair.*raw"):
        raw.unlink()
    _expect_error(path, "data file")


def test_itk_warnings_stay_off_when_simpleitk_is_imported_later() -> None:
    # the CLI turns ITK's warning printer off before SimpleITK is imported (an npz run never imports it)
    code = ("import sys; from text3dsam_cli.io.itk import silence_itk_warnings, simpleitk; "
            "silence_itk_warnings(); assert 'SimpleITK' not in sys.modules; "
            "import text3dsam_cli.io.dicom; "
            "print(simpleitk().ProcessObject.GetGlobalWarningDisplay())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
