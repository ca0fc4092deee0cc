"""Writing: exact geometry round trips, label/probability dtypes, and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from text3dsam_cli.errors import OutputError
from text3dsam_cli.io.atomic import atomic_path
from text3dsam_cli.io.npz import read_npz_array
from text3dsam_cli.io.readers import read_volume
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.io.writers import label_dtype, write_label_map, write_volume

DATA = Path(__file__).parents[1].parent / "shared" / "data"
SOURCES = [
    DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz",
    DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz",
    DATA / "extra" / "pyradiomics" / "brain1_image.nrrd",
    DATA / "extra" / "pyradiomics" / "breast1_image.nrrd",
    DATA / "dicom" / "dicom2nifti" / "hitachi_anatomical_001" / "dicom",  # oblique
    DATA / "dicom" / "dicom2nifti" / "philips_anatomical_001" / "dicom",  # oblique
    DATA / "dicom" / "totalsegmentator_ct" / "dicom",
]


def _labels(shape: tuple[int, int, int], top: int = 7) -> np.ndarray:
    return (np.arange(int(np.prod(shape))).reshape(shape) % (top + 1)).astype(np.int64)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_label_map_round_trip_keeps_geometry(tmp_path: Path, source: Path, suffix: str) -> None:
    image = read_volume(source)
    labels = _labels(image.shape)
    out = write_label_map(labels, image, tmp_path / f"seg{suffix}")
    back = read_volume(out)
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, labels)
    if suffix in (".nrrd", ".mha") or image.source_format == "nifti":
        # text headers carry full precision; NIfTI -> NIfTI is exact too
        np.testing.assert_allclose(back.spacing, image.spacing, rtol=0, atol=1e-12)
        np.testing.assert_allclose(back.origin, image.origin, rtol=0, atol=1e-12)
        np.testing.assert_allclose(back.direction, image.direction, rtol=0, atol=1e-12)
    else:
        # NIfTI stores the affine in float32: exact up to float32 rounding
        np.testing.assert_allclose(back.spacing, image.spacing, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(back.origin, image.origin, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(back.direction, image.direction, rtol=0, atol=1e-6)


def test_npz_output_is_challenge_layout(tmp_path: Path) -> None:
    image = read_volume(DATA / "challenge" / "MR_BraTS-T1c_bratsgli_0017.npz")
    labels = _labels(image.shape, 4)
    out = write_label_map(labels, image, tmp_path / "MR_BraTS-T1c_bratsgli_0017.npz")
    segs = read_npz_array(out, "segs")
    assert segs.dtype == np.uint8 and np.array_equal(segs, labels)


def test_label_dtype_grows_with_labels(tmp_path: Path) -> None:
    assert label_dtype(np.array([0, 255])) == np.uint8
    assert label_dtype(np.array([0, 256])) == np.uint16
    assert label_dtype(np.array([70000])) == np.uint32
    assert label_dtype(np.zeros((0,), np.int64)) == np.uint8
    like = Volume(np.zeros((2, 3, 4), np.int16), spacing=(0.5, 0.5, 2.0))
    labels = np.zeros((2, 3, 4), np.int32)
    labels[1, 2, 3] = 300
    back = read_volume(write_label_map(labels, like, tmp_path / "many.nii.gz"))
    assert back.array.dtype == np.uint16 and int(back.array.max()) == 300


def test_probabilities_float16(tmp_path: Path) -> None:
    like = read_volume(DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz")
    probs = np.random.default_rng(1).random(like.shape).astype(np.float16)
    back = read_volume(write_volume(like.with_array(probs), tmp_path / "p.nii.gz"))
    assert back.array.dtype == np.float32  # SimpleITK has no float16: written as float32
    assert np.array_equal(back.array, probs.astype(np.float32))
    assert back.origin == like.origin and back.direction == like.direction
    npz = read_npz_array(write_volume(like.with_array(probs), tmp_path / "p.npz"), "segs")
    assert npz.dtype == np.float16 and np.array_equal(npz, probs)


def test_bool_mask_is_written_as_uint8(tmp_path: Path) -> None:
    like = Volume(np.zeros((2, 3, 4), np.uint8))
    mask = np.zeros((2, 3, 4), bool)
    mask[0, 1, 2] = True
    back = read_volume(write_volume(like.with_array(mask), tmp_path / "m.nrrd"))
    assert back.array.dtype == np.uint8 and back.array.sum() == 1


def test_label_map_errors(tmp_path: Path) -> None:
    like = Volume(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(OutputError, match="shape"):
        write_label_map(np.zeros((2, 3, 5), np.uint8), like, tmp_path / "a.nii.gz")
    with pytest.raises(OutputError, match="negative"):
        write_label_map(np.full((2, 3, 4), -1, np.int8), like, tmp_path / "b.nii.gz")
    with pytest.raises(OutputError, match="integers"):
        write_label_map(np.zeros((2, 3, 4), np.float32), like, tmp_path / "c.nii.gz")
    with pytest.raises(OutputError, match="unsupported output") as info:
        write_label_map(np.zeros((2, 3, 4), np.uint8), like, tmp_path / "d.mhd")
    assert "d.mhd" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == []


def test_existing_output_is_replaced(tmp_path: Path) -> None:
    like = Volume(np.zeros((2, 3, 4), np.uint8))
    target = tmp_path / "seg.nii.gz"
    write_label_map(np.ones((2, 3, 4), np.uint8), like, target)
    write_label_map(np.full((2, 3, 4), 2, np.uint8), like, target)
    assert int(read_volume(target).array.max()) == 2
    assert os.listdir(tmp_path) == ["seg.nii.gz"]


# --- atomic writes ----------------------------------------------------------------------------------------


def test_atomic_path_success(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".tmp-") and tmp.name.endswith("-out.nii.gz")
        assert not tmp.exists() and not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["out.nii.gz"]


def test_atomic_path_exception_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_path_exception_keeps_previous_target(tmp_path: Path) -> None:
    target = tmp_path / "out.npz"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.npz"]


def test_failed_image_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import SimpleITK as sitk

    def broken_execute(self, image):
        Path(self.GetFileName()).write_bytes(b"half an image")
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute:\nITK ERROR: disk full")

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", broken_execute)
    with pytest.raises(OutputError, match="disk full") as info:
        write_volume(Volume(np.zeros((2, 3, 4), np.uint8)), tmp_path / "seg.nii.gz")
    assert "seg.nii.gz" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_output_folder_is_created(tmp_path: Path) -> None:
    out = write_volume(Volume(np.zeros((2, 3, 4), np.uint8)), tmp_path / "a" / "b" / "seg.mha")
    assert out.is_file()


def test_folder_blocked_by_a_file_is_output_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("I am a file")
    with pytest.raises(OutputError, match="output folder") as info:
        write_volume(Volume(np.zeros((2, 3, 4), np.uint8)), tmp_path / "blocker" / "seg.nii.gz")
    assert "blocker" in str(info.value)


def test_target_that_is_a_folder_is_output_error(tmp_path: Path) -> None:
    (tmp_path / "seg.nii.gz").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        write_volume(Volume(np.zeros((2, 3, 4), np.uint8)), tmp_path / "seg.nii.gz")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into read-only folders; covered by the blocked-folder test")
def test_unwritable_folder_is_output_error(tmp_path: Path) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable") as info:
            write_volume(Volume(np.zeros((2, 3, 4), np.uint8)), folder / "seg.nii.gz")
        assert "readonly" in str(info.value)
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_unwritable_folder_is_output_error_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    with pytest.raises(OutputError, match="not writable") as info:
        write_volume(Volume(np.zeros((2, 3, 4), np.uint8)), folder / "seg.nii.gz")
    assert "readonly" in str(info.value)


def _itk_nifti_bytes(volume: Volume, folder: Path) -> bytes:
    """The .nii file ITK itself writes for ``volume`` (the reference of the header-then-voxels writer)."""
    import SimpleITK as sitk

    from text3dsam_cli.io.images import volume_to_image

    name = folder / "itk.nii"
    sitk.WriteImage(volume_to_image(volume), str(name), False)
    return name.read_bytes()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64,
                                   np.float16, np.bool_])
@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 6, 7), (5, 1, 1), (40, 3, 2)])
def test_nifti_files_equal_itks_own_byte_for_byte(tmp_path: Path, dtype, shape) -> None:
    """Header from ITK (one-voxel image, sizes set), voxels from the array: the same file ITK writes, for every
    dtype (bool and float16 converted as ITK needs), singleton sizes and an oblique geometry."""
    import gzip

    rng = np.random.default_rng(len(shape) * 10 + shape[0])
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    volume = Volume((rng.random(shape) * 90).astype(dtype), tuple(rng.uniform(0.3, 3, 3)),
                    tuple(rng.uniform(-100, 100, 3)), tuple(q.ravel()))
    want = _itk_nifti_bytes(volume, tmp_path)
    assert write_volume(volume, tmp_path / "plain.nii").read_bytes() == want
    assert gzip.decompress(write_volume(volume, tmp_path / "packed.nii.gz").read_bytes()) == want


def test_nifti_writer_takes_views_and_big_endian_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flipped view and a big-endian array are written in C order, little-endian, slab by slab."""
    import text3dsam_cli.io.images as images

    monkeypatch.setattr(images, "SLAB_BYTES", 50)  # several slabs
    base = np.arange(9 * 4 * 5, dtype=np.int16).reshape(9, 4, 5)
    view = base[::-1, :, ::2]
    for array in (view, base.astype(">i2")):
        volume = Volume(array, (0.5, 0.7, 1.2))
        back = read_volume(write_volume(volume, tmp_path / "v.nii.gz"))
        assert np.array_equal(back.array, array) and back.array.dtype == np.int16


def test_nifti_stream_stopping_half_way_never_reaches_the_final_name(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection in the header-then-voxels writer: a stream that silently stops half-way is detected."""
    import text3dsam_cli.io.images as images

    real = images.write_voxels

    def half(fp, array):
        real(fp, array[: array.shape[0] // 2])

    monkeypatch.setattr(images, "write_voxels", half)
    volume = Volume(np.ones((8, 6, 5), dtype=np.uint8))
    for suffix in (".nii.gz", ".nii"):
        with pytest.raises(OutputError, match="write failed"):
            write_volume(volume, tmp_path / f"seg{suffix}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", [SOURCES[0], SOURCES[2], SOURCES[4]], ids=lambda p: p.parent.name)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_one_voxel_lands_where_an_independent_reader_expects_it(tmp_path: Path, source: Path, suffix: str) -> None:
    """One labelled voxel at a known (z, y, x) index: nibabel (NIfTI) or SimpleITK (NRRD, MetaImage) finds it in
    the written file at the same physical point as SimpleITK finds that index of the source."""
    import nibabel as nib
    import SimpleITK as sitk

    image = read_volume(source)
    z, y, x = (n // 3 for n in image.shape)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[z, y, x] = 5
    out = write_label_map(labels, image, tmp_path / f"seg{suffix}")
    if source.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source)))
        reference = reader.Execute()
    else:
        reference = sitk.ReadImage(str(source))
    expected = np.array(reference.TransformIndexToPhysicalPoint((x, y, z)))  # LPS mm
    if suffix == ".nii.gz":
        written = nib.load(out)
        data = np.asarray(written.dataobj)
        assert data.shape == (image.shape[2], image.shape[1], image.shape[0])  # nibabel's (i, j, k) = (x, y, z)
        found = np.argwhere(data)
        assert found.tolist() == [[x, y, z]] and data[x, y, z] == 5
        ras = written.affine @ np.array([x, y, z, 1.0])
        point = np.array([-ras[0], -ras[1], ras[2]])  # RAS -> LPS
        tolerance = 1e-3  # the affine is stored in float32
    else:
        written = sitk.ReadImage(str(out))
        data = sitk.GetArrayFromImage(written)
        assert np.argwhere(data).tolist() == [[z, y, x]] and data[z, y, x] == 5
        point = np.array(written.TransformIndexToPhysicalPoint((x, y, z)))
        tolerance = 1e-6
    np.testing.assert_allclose(point, expected, rtol=0, atol=tolerance)
