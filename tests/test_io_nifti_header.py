"""A NIfTI input's qform and sform: a warning when they disagree, kept exactly in the label map, NaN refused."""

from __future__ import annotations

import gzip
import logging
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA

from text3dsam_cli.errors import InputError
from text3dsam_cli.io import read_volume, write_label_map

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
GEOMETRY_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                   "qoffset_z", "srow_x", "srow_y", "srow_z")


def _variant(tmp_path: Path, name: str, qform: np.ndarray | None, qcode: int, sform: np.ndarray | None,
             scode: int) -> Path:
    """The CT example's voxels with the given qform/sform and codes (written, then the codes set raw)."""
    source = nib.load(str(CT))
    image = nib.Nifti1Image(np.asarray(source.dataobj), source.affine, source.header.copy())
    image.set_qform(qform if qform is not None else source.affine, code=max(qcode, 1))
    image.set_sform(sform if sform is not None else source.affine, code=max(scode, 1))
    path = tmp_path / name
    nib.save(image, str(path))
    _patch(path, lambda raw: struct.pack_into("<2h", raw, 252, qcode, scode))
    return path


def _patch(path: Path, change) -> None:
    """Change the raw header bytes of a (gzipped) NIfTI-1 file in place (nibabel rewrites sform from its affine)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fp:
        raw = bytearray(fp.read())
    change(raw)
    with opener(path, "wb") as fp:
        fp.write(bytes(raw))


def _assert_same_header_geometry(a: Path, b: Path) -> None:
    ha, hb = nib.load(str(a)).header, nib.load(str(b)).header
    for field in GEOMETRY_FIELDS:
        assert np.array_equal(ha[field], hb[field]), (field, ha[field], hb[field])
    assert np.array_equal(ha["pixdim"][:4], hb["pixdim"][:4])


def _mirrored(affine: np.ndarray) -> np.ndarray:
    out = affine.copy()
    out[0, :] *= -1  # x mirrored: what a qform-using viewer would show if the label map's qform were rewritten
    return out


@pytest.mark.parametrize(("qcode", "scode"), [(1, 2), (1, 1), (2, 1)])
def test_disagreeing_qform_and_sform_warn_once_and_are_kept(tmp_path, caplog, qcode, scode):
    affine = nib.load(str(CT)).affine
    path = _variant(tmp_path, "disagree.nii.gz", _mirrored(affine), qcode, affine, scode)
    caplog.set_level(logging.WARNING)
    volume = read_volume(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "disagree" in warnings[0], warnings
    # the warning names the matrix the voxels were really read with (ITK's choice)
    image = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * image.GetSpacing()
    lps[:3, 3] = image.GetOrigin()
    ras = np.diag([-1, -1, 1, 1]) @ lps
    header = nib.load(str(path)).header
    used = "sform" if np.allclose(ras, header.get_sform(), atol=1e-3) else "qform"
    assert np.allclose(ras, header.get_sform() if used == "sform" else header.get_qform(), atol=1e-3)
    assert f"read with the {used}" in warnings[0]

    labels = np.zeros(volume.shape, np.uint8)
    labels[10:20, 30:60, 40:80] = 1
    out = write_label_map(labels, volume, tmp_path / "labels.nii.gz")
    _assert_same_header_geometry(path, out)  # qform, sform, both codes and pixdim: exactly the input's
    written = nib.load(str(out))
    assert np.array_equal(written.header.get_qform(), header.get_qform())
    assert np.array_equal(written.header.get_sform(), header.get_sform())
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(labels).transpose(2, 1, 0))
    again = read_volume(out)  # ITK reads the label map on the grid it read the image on
    assert (again.spacing, again.origin, again.direction) == (volume.spacing, volume.origin, volume.direction)


def test_agreeing_matrices_give_no_warning(tmp_path, caplog):
    affine = nib.load(str(CT)).affine
    path = _variant(tmp_path, "agree.nii.gz", affine, 1, affine, 1)
    caplog.set_level(logging.WARNING)
    volume = read_volume(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    out = write_label_map(np.zeros(volume.shape, np.uint8), volume, tmp_path / "labels.nii.gz")
    _assert_same_header_geometry(path, out)


def test_both_codes_zero_stay_zero_with_pixdim_only_geometry(tmp_path):
    path = _variant(tmp_path, "codes0.nii.gz", None, 0, None, 0)
    assert nib.load(str(path)).header["qform_code"] == 0 == nib.load(str(path)).header["sform_code"]
    volume = read_volume(path)
    out = write_label_map(np.ones(volume.shape, np.uint8), volume, tmp_path / "labels.nii.gz")
    header = nib.load(str(out)).header
    assert header["qform_code"] == 0 and header["sform_code"] == 0  # ITK alone wrote codes 1 and 1
    _assert_same_header_geometry(path, out)
    assert np.array_equal(nib.load(str(out)).affine, nib.load(str(path)).affine)  # pixdim-only, as the input


@pytest.mark.parametrize(("where", "field"), [
    (280 + 4, "sform"),  # srow_x[1]
    (280 + 44, "sform"),  # srow_z[3]
    (268, "qform"),  # qoffset_x
    (256, "qform"),  # quatern_b
])
def test_nan_in_a_coded_matrix_is_one_error_line(tmp_path, where, field, small_checkpoint):
    affine = nib.load(str(CT)).affine
    path = _variant(tmp_path, "nan.nii", affine, 1, affine, 1)
    _patch(path, lambda raw: struct.pack_into("<f", raw, where, float("nan")))
    with pytest.raises(InputError, match=f"the header's {field} .* holds NaN or infinity") as info:
        read_volume(path)
    assert str(path) in str(info.value)
    if where != 268:
        return
    proc = subprocess.run([sys.executable, "-m", "text3dsam_cli", "segment", str(path), "liver", "-o",
                           str(tmp_path / "out.nii.gz"), "-m", str(small_checkpoint), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "warning" in line.lower()
              or "suspicious" in line.lower() or "itk" in line.lower()]
    assert len(errors) == 1 and "holds NaN or infinity" in errors[0], proc.stderr
    assert not (tmp_path / "out.nii.gz").exists()


def test_nan_in_an_unused_matrix_is_ignored_and_kept(tmp_path):
    affine = nib.load(str(CT)).affine
    path = _variant(tmp_path, "nan_unused.nii", affine, 0, affine, 1)
    _patch(path, lambda raw: struct.pack_into("<f", raw, 268, float("nan")))  # qoffset_x, qform_code 0
    volume = read_volume(path)
    out = write_label_map(np.zeros(volume.shape, np.uint8), volume, tmp_path / "labels.nii")
    assert np.isnan(nib.load(str(out)).header["qoffset_x"])
    assert nib.load(str(out)).header["qform_code"] == 0 and nib.load(str(out)).header["sform_code"] == 1
