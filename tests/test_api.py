"""The high-level Python API (``text3dsam_cli.segment``, ``Text3DSAM``, ``Segmentation``) gives the CLI's answer.

Real data: the TotalSegmentator CT example (RAS, HU) stored as RAS, LPS and PSR copies made with nibabel, a
SimpleITK image, a path, a DICOM series folder; the small deterministic test checkpoint. The CLI's label map of
each file is the reference, voxel for voxel and affine for affine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import DATA, ROOT
from typer.testing import CliRunner

import text3dsam_cli
from text3dsam_cli.cli import app
from text3dsam_cli.errors import UsageError

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
DICOM = DATA / "dicom" / "dicom2nifti" / "siemens_anatomical_001" / "dicom"
PROMPTS = ["liver", "spleen"]

runner = CliRunner()


def _cli(path, out, checkpoint, *extra):
    result = runner.invoke(app, ["segment", str(path), *PROMPTS, "-m", str(checkpoint), "--device", "cpu",
                                 "-o", str(out), "-q", *extra])
    assert result.exit_code == 0, result.output
    return out


def _stored_as(image, codes):
    """The same scan stored in another voxel order (a permutation/flip of the array, same world positions)."""
    change = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                             nib.orientations.axcodes2ornt(codes))
    return image.as_reoriented(change)


@pytest.fixture(scope="module")
def api(small_model):
    return text3dsam_cli.Text3DSAM(small_model, device="cpu")


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("P", "S", "R")])
def test_nibabel_image_equals_the_cli_in_every_storage(codes, small_checkpoint, small_model, tmp_path):
    image = _stored_as(nib.load(CT), codes)
    assert nib.aff2axcodes(image.affine) == codes
    path = tmp_path / "ct.nii.gz"
    nib.save(image, path)
    cli = nib.load(_cli(path, tmp_path / "cli.nii.gz", small_checkpoint))
    # the image in memory (not the saved file), the loaded model, the call
    mine = text3dsam_cli.segment(image, PROMPTS, model=small_model, device="cpu").to_nifti()
    assert isinstance(mine, nib.Nifti1Image)
    expected = np.asarray(cli.dataobj)
    got = np.asarray(mine.dataobj)
    assert got.shape == image.shape and got.dtype == expected.dtype
    assert np.array_equal(got, expected)
    assert np.allclose(mine.affine, cli.affine, atol=1e-5) and np.allclose(mine.affine, image.affine)
    assert set(np.unique(got)) >= {0, 1, 2}  # both prompts found something: the comparison is not of two empties
    # the header geometry is the input's own (qform, sform and their codes)
    for key in ("qform_code", "sform_code", "pixdim", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c"):
        assert np.array_equal(mine.header[key], image.header[key]), key
    # written and read back it is still the CLI's map
    mine.to_filename(tmp_path / "mine.nii.gz")
    assert np.array_equal(np.asarray(nib.load(tmp_path / "mine.nii.gz").dataobj), expected)


@pytest.mark.slow
def test_one_answer_whatever_the_storage(api):
    """The point of the canonical orientation: the three storages give one label map once put back in RAS."""
    base = nib.load(CT)
    maps = []
    for codes in (("R", "A", "S"), ("L", "P", "S"), ("P", "S", "R")):
        labels = api.segment(_stored_as(base, codes), PROMPTS).to_nifti()
        maps.append(np.asarray(_stored_as(labels, ("R", "A", "S")).dataobj))
    assert all(np.array_equal(maps[0], m) for m in maps[1:])


def test_simpleitk_image_and_path_equal_the_cli(api, small_checkpoint, tmp_path):
    import SimpleITK as sitk

    cli_path = _cli(CT, tmp_path / "cli.nii.gz", small_checkpoint)
    cli = sitk.ReadImage(str(cli_path))
    expected = sitk.GetArrayFromImage(cli)
    cli_sidecar = json.loads((tmp_path / "cli.json").read_text())

    from_path = api.segment(CT, PROMPTS)
    assert from_path.labels.shape == expected.shape  # SimpleITK's (z, y, x)
    assert np.array_equal(from_path.labels, expected)
    assert from_path.prompts == PROMPTS and from_path.label_values == [1, 2]
    assert from_path.sidecar["input"] == str(CT) and from_path.sidecar["outputs"] == {}
    for key in ("prompts", "labels", "geometry", "modality", "orientation", "mode", "model", "input_format"):
        assert from_path.sidecar[key] == cli_sidecar[key], key

    from_sitk = api.segment(sitk.ReadImage(str(CT)), PROMPTS)
    assert np.array_equal(from_sitk.labels, expected)
    assert from_sitk.sidecar["input"] is None and from_sitk.sidecar["input_format"] == "simpleitk"
    assert from_sitk.sidecar["labels"] == cli_sidecar["labels"]
    out = from_sitk.to_sitk()
    assert np.array_equal(sitk.GetArrayFromImage(out), expected)
    assert out.GetOrigin() == cli.GetOrigin() and out.GetSpacing() == cli.GetSpacing()
    assert np.allclose(out.GetDirection(), cli.GetDirection())
    # to_nifti of a path input is the NIfTI file segment writes
    nifti = from_path.to_nifti()
    written = nib.load(cli_path)
    assert np.array_equal(np.asarray(nifti.dataobj), np.asarray(written.dataobj))
    assert np.allclose(nifti.affine, written.affine)


@pytest.mark.slow
def test_dicom_folder_equals_the_cli(api, small_checkpoint, tmp_path):
    import SimpleITK as sitk

    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(_cli(DICOM, tmp_path / "cli.nii.gz", small_checkpoint))))
    seg = api.segment(DICOM, PROMPTS)
    assert seg.sidecar["input_format"] == "dicom"
    assert np.array_equal(seg.labels, expected)


def test_probabilities_and_save_write_what_segment_writes(api, small_checkpoint, tmp_path):
    cli_out = _cli(CT, tmp_path / "cli" / "ct.nii.gz", small_checkpoint, "--probabilities", "--split")
    image = nib.load(CT)
    seg = api.segment(image, PROMPTS, probabilities=True)
    assert seg.probabilities.shape == (2, *seg.labels.shape) and seg.probabilities.dtype == np.float16
    for k, value in enumerate(seg.label_values):
        cli_prob = np.asarray(nib.load(cli_out.parent / f"ct_prob{value}.nii.gz").dataobj)
        assert np.array_equal(seg.probabilities[k].astype(np.float32), cli_prob.astype(np.float32))
    files = seg.save(tmp_path / "api" / "ct.nii.gz", split=True)
    names = sorted(p.rsplit("/", 1)[-1] for p in files)
    assert names == sorted(p.name for p in (tmp_path / "cli").iterdir())  # the same set of files
    assert files[0].endswith("ct.nii.gz") and files[-1].endswith("ct.json")
    for name in names:
        if name.endswith(".nii.gz"):
            a = nib.load(tmp_path / "api" / name)
            b = nib.load(tmp_path / "cli" / name)
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), name
            assert np.allclose(a.affine, b.affine), name
    sidecar = json.loads((tmp_path / "api" / "ct.json").read_text())
    assert sidecar == seg.sidecar and sidecar["outputs"]["labels"] == str(tmp_path / "api" / "ct.nii.gz")
    assert sidecar["labels"] == json.loads((tmp_path / "cli" / "ct.json").read_text())["labels"]
    assert not [p for p in (tmp_path / "api").iterdir() if p.name.startswith(".")]  # no marker, no temporary
    assert seg.save(tmp_path / "api" / "ct.nii.gz", split=True) == files  # its own outputs: overwritten


def test_save_refuses_what_segment_refuses(api, tmp_path):
    seg = api.segment(CT, PROMPTS)
    with pytest.raises(UsageError, match="not an output file type"):
        seg.save(tmp_path / "labels.txt")
    stranger = tmp_path / "ct.json"
    stranger.write_text('{"not": "ours"}')
    with pytest.raises(UsageError, match=r"ct\.json"):
        seg.save(tmp_path / "ct.nii.gz")
    assert stranger.read_text() == '{"not": "ours"}' and not (tmp_path / "ct.nii.gz").exists()


def test_options_and_label_maps(api):
    seg = api.segment(CT, {"5": "liver", "1": "spleen"}, largest_component=True, orientation="native")
    assert seg.label_values == [5, 1] and seg.prompts == ["liver", "spleen"]
    assert seg.sidecar["orientation"]["source"] == "native"
    assert all(entry["components"] <= 1 for entry in seg.sidecar["labels"])
    assert api.segment(CT, "liver").prompts == ["liver"]
    with pytest.raises(TypeError, match=r"precision.*Text3DSAM"):
        api.segment(CT, PROMPTS, precision="bf16")
    with pytest.raises(UsageError, match="mode"):
        api.segment(CT, PROMPTS, mode="tiles")
    before = (api.segmenter.mode, api.segmenter.spacing)
    sliding = api.segment(CT, PROMPTS, mode="sliding", spacing=(3.0, 3.0, 3.0))  # for this call only
    assert sliding.sidecar["mode"] == "sliding" and before[0] == "whole"
    assert (api.segmenter.mode, api.segmenter.spacing) == before
    with pytest.raises(TypeError, match="bare array"):
        api.segment(np.zeros((4, 4, 4)), PROMPTS)
    with pytest.raises(UsageError, match="window"):
        api.segment(CT, PROMPTS, window="nonsense")


def test_npz_input_uses_its_own_prompts(api, tmp_path):
    case = np.load(DATA / "challenge" / "MR_BraTS-T1c_bratsgli_0017.npz", allow_pickle=True)
    path = tmp_path / "case.npz"
    np.savez_compressed(path, imgs=case["imgs"][:8, :32, :32], spacing=case["spacing"],
                        text_prompts=np.array({"2": "brain tumor", "instance_label": 0}, dtype=object))
    seg = api.segment(path)  # prompts=None: the npz's text_prompts
    assert seg.prompts == ["brain tumor"] and seg.label_values == [2] and seg.labels.shape == (8, 32, 32)
    assert seg.sidecar["input_format"] == "npz" and seg.sidecar["orientation"]["source"] == "npz"


@pytest.mark.parametrize("prompt", ["", "   ", "\u200b", "\x00", "\x01\x02\x1f", "\ufeff\u200d", "liver\udcff",
                                    "\ud800"])
def test_prompts_that_are_not_text_fail_before_the_model_loads(prompt, tmp_path):
    # the model does not exist: a UsageError about the prompt proves nothing was loaded
    with pytest.raises(UsageError, match="prompt") as info:
        text3dsam_cli.segment(CT, ["liver", prompt], model=str(tmp_path / "no-model"), device="cpu")
    message = str(info.value)
    assert "\n" not in message and message.encode("utf-8")
    with pytest.raises(UsageError):
        text3dsam_cli.segment(CT, {"1": prompt}, model=str(tmp_path / "no-model"))


def test_nibabel_input_problems_name_the_image(api):
    bad = nib.Nifti1Image(np.full((8, 8, 8), np.nan, dtype=np.float32), np.eye(4))
    with pytest.raises(text3dsam_cli.InputError, match=r"^<nibabel image>: ") as info:
        api.segment(bad, PROMPTS)
    assert "text3dsam-api" not in str(info.value)
    flat = nib.Nifti1Image(np.zeros((8, 8, 1), dtype=np.int16), np.eye(4))
    with pytest.raises(text3dsam_cli.InputError, match="single slice"):
        api.segment(flat, PROMPTS)


def test_import_stays_light():
    code = ("import sys, text3dsam_cli; assert 'torch' not in sys.modules and 'numpy' not in sys.modules; "
            "assert callable(text3dsam_cli.segment) and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_statistics_and_presets_as_segment_gives_them(api, small_checkpoint, tmp_path):
    """``statistics=True`` and ``presets=`` give the sidecar ``segment --statistics --preset`` writes."""
    result = runner.invoke(app, ["segment", str(CT), "liver", "--preset", "CT_AMOS", "--statistics", "-m",
                                 str(small_checkpoint), "--device", "cpu", "-o", str(tmp_path / "cli.nii.gz"), "-q"])
    assert result.exit_code == 0, result.output
    cli_sidecar = json.loads((tmp_path / "cli.json").read_text())
    seg = api.segment(CT, ["liver"], statistics=True, presets="CT_AMOS")
    assert seg.sidecar["presets"] == cli_sidecar["presets"] == ["CT_AMOS"]
    assert seg.prompts == list(cli_sidecar["prompts"]) and len(seg.prompts) > 2
    assert seg.sidecar["labels"] == cli_sidecar["labels"]
    assert any(entry["intensity"]["mean"] is not None for entry in seg.sidecar["labels"])
    assert seg.sidecar["modality"] == cli_sidecar["modality"]
    with pytest.raises(UsageError, match="CT_AMSO"):
        api.segment(CT, ["liver"], presets=["CT_AMSO"])
