"""Same scan, same answer: one real scan stored in different voxel orders gives one label map (issue 9).

The TotalSegmentator CT series is read as DICOM and written by the test as NIfTI in RAS, LAS and PSR order;
each dicom2nifti MR series is read as DICOM, as ``001_ground_truth.nii.gz`` (sagittal storage) and as
``001_ground_truth_reoriented.nii.gz``. All are segmented in one ``segment`` run, every label map is put in
one physical frame (LPS), and the maps must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.io import read_volume, volume_to_image
from text3dsam_cli.pipeline import prepare_scan

CT_SERIES = DATA / "dicom" / "totalsegmentator_ct" / "dicom"
D2N = DATA / "dicom" / "dicom2nifti"
MR_CASES = sorted(p.parent.name for p in D2N.glob("*/dicom"))
CT_ORDERS = ("RAS", "LAS", "PSR")
CT_PROMPTS = ["liver", "spleen"]
MR_PROMPTS = ["brain", "lateral ventricles"]


def _ct_inputs(folder: Path) -> list[Path]:
    """The CT series itself plus NIfTI copies in RAS, LAS and PSR voxel order (pure permutation/flip)."""
    image = volume_to_image(read_volume(CT_SERIES))
    paths = [CT_SERIES]
    for code in CT_ORDERS:
        path = folder / f"ct_{code}.nii.gz"
        sitk.WriteImage(sitk.DICOMOrient(image, code), str(path))
        paths.append(path)
    return paths


def _mr_inputs(case: str) -> list[Path]:
    return [D2N / case / "dicom", D2N / case / "001_ground_truth.nii.gz",
            D2N / case / "001_ground_truth_reoriented.nii.gz"]


def _in_lps(path: Path) -> tuple[np.ndarray, tuple]:
    """A written label map in LPS voxel order, and its geometry there."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    return sitk.GetArrayFromImage(image), (image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def _segment_all(checkpoint: Path, groups: dict[str, list[Path]], out: Path, *extra: str) -> dict[str, list[Path]]:
    """One ``segment`` run over every input of every group (read from stdin); the written label maps."""
    written = {}
    for name, prompts in (("ct", CT_PROMPTS), ("mr", MR_PROMPTS)):
        wanted = {k: v for k, v in groups.items() if k.startswith(name)}
        if not wanted:
            continue
        listing = "\n".join(str(p) for paths in wanted.values() for p in paths) + "\n"
        result = CliRunner().invoke(app, ["segment", "-", *prompts, "-m", str(checkpoint), "-o", str(out / name),
                                          "--json", "-q", *extra], input=listing)
        assert result.exit_code == 0, result.output
        outputs = {r["input"]: Path(r["outputs"][0]) for r in json.loads(result.stdout)["results"]}
        written.update({k: [outputs[str(p)] for p in paths] for k, paths in wanted.items()})
    return written


def _agreements(written: dict[str, list[Path]]) -> dict[str, list[float]]:
    """Per group: the fraction of voxels on which each stored order agrees with the first, in LPS."""
    figures = {}
    for name, paths in written.items():
        reference, geometry = _in_lps(paths[0])
        assert len(np.unique(reference)) > 1, f"{name}: a one-label map would agree trivially"
        row = []
        for path in paths[1:]:
            labels, other = _in_lps(path)
            assert labels.shape == reference.shape
            for a, b in zip(other, geometry):
                np.testing.assert_allclose(a, b, atol=1e-3)
            row.append(float((labels == reference).mean()))
        figures[name] = row
    return figures


def test_model_sees_identical_arrays_whatever_the_storage_order(tmp_path):
    """prepare_scan gives the model the same array (and spacing) for every storage order of one scan."""
    groups = {"ct": _ct_inputs(tmp_path), **{f"mr:{c}": _mr_inputs(c) for c in MR_CASES}}
    for name, paths in groups.items():
        scans = [prepare_scan(read_volume(p)) for p in paths]
        first = scans[0]
        assert first.orientation["model"] == ("LAS" if name == "ct" else "LPS")
        for path, scan in zip(paths, scans):
            assert scan.modality.modality == first.modality.modality, path  # NIfTI: the heuristic says CT / MR
            assert scan.image.flags.c_contiguous
            np.testing.assert_allclose(scan.spacing, first.spacing, rtol=1e-6)
            assert np.array_equal(scan.image, first.image), path


@pytest.mark.slow
def test_every_storage_order_gives_the_same_label_map(small_checkpoint, tmp_path, capsys):
    groups = {"ct": _ct_inputs(tmp_path), **{f"mr:{c}": _mr_inputs(c) for c in MR_CASES}}
    figures = _agreements(_segment_all(small_checkpoint, groups, tmp_path / "auto"))
    ct_psr = [groups["ct"][0], groups["ct"][-1]]  # the series and its PSR copy, as stored
    native = _agreements(_segment_all(small_checkpoint, {"ct": ct_psr}, tmp_path / "native", "--orientation",
                                      "native"))
    with capsys.disabled():
        print("\nagreement with the DICOM read, in one physical frame (auto):")
        for name, row in figures.items():
            print(f"  {name}: {', '.join(f'{v:.6f}' for v in row)}")
        print(f"  ct PSR with --orientation native: {native['ct'][0]:.6f}")
    worst = min(v for row in figures.values() for v in row)
    assert worst >= 0.999
    assert min(native["ct"]) < worst  # the check can fail: stored order changes the answer without reorienting


CT_NIFTI = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"


def _segment(*args):
    return CliRunner().invoke(app, ["segment", *map(str, args)])


def test_bad_orientation_is_a_usage_error_before_anything_runs(tmp_path):
    result = _segment(CT_NIFTI, "liver", "-m", tmp_path / "no-model", "-o", tmp_path / "out", "--orientation", "LAX")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "--orientation" in result.stderr and "LAX" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sidecar_records_orientation_and_checkpoint_table_wins(small_checkpoint, tmp_path):
    import shutil

    auto = _segment(CT_NIFTI, "liver", "-m", small_checkpoint, "-o", tmp_path / "a.nii.gz")
    assert auto.exit_code == 0, auto.output
    info = json.loads((tmp_path / "a.json").read_text())["orientation"]
    assert (info["input"], info["model"], info["source"]) == ("RAS", "LAS", "default")
    native = _segment(CT_NIFTI, "liver", "-m", small_checkpoint, "-o", tmp_path / "n.nii.gz", "--orientation",
                      "native")
    assert native.exit_code == 0, native.output
    assert json.loads((tmp_path / "n.json").read_text())["orientation"]["model"] == "RAS"
    # a checkpoint that records its own table (as train/finetune write it)
    own = tmp_path / "own"
    shutil.copytree(small_checkpoint, own)
    config = json.loads((own / "config.json").read_text())
    config["inference"] = {"orientation": {"CT": "RAS"}}
    (own / "config.json").write_text(json.dumps(config))
    result = _segment(CT_NIFTI, "liver", "-m", own, "-o", tmp_path / "o.nii.gz")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "o.json").read_text())["orientation"]
    assert (info["model"], info["source"]) == ("RAS", "checkpoint")
    same = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o.nii.gz")))
    assert np.array_equal(same, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "n.nii.gz"))))
    # npz inputs never move
    npz = _segment(DATA / "challenge" / "MR_BraTS-T1c_bratsgli_0017.npz", "-m", small_checkpoint, "-o",
                   tmp_path / "npz", "--orientation", "RAS")
    assert npz.exit_code == 0, npz.output
    info = json.loads((tmp_path / "npz" / "MR_BraTS-T1c_bratsgli_0017.json").read_text())["orientation"]
    assert info["source"] == "npz" and info["model"] is None
