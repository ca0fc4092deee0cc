"""The modality decision: --modality, the file's metadata (DICOM tag, BIDS suffix), the prompts, the heuristic."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.io import read_volume
from text3dsam_cli.pipeline import prepare_scan
from text3dsam_cli.preprocess import bids_modality, resolve_modality
from text3dsam_cli.prompts import prompt_modality

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
MR = DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz"
DICOM_CT = DATA / "dicom" / "totalsegmentator_ct" / "dicom"
runner = CliRunner()


def _write_like(reference: Path, array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(sitk.ReadImage(str(reference)))
    sitk.WriteImage(image, str(path))
    return path


def test_prompts_decide_when_they_share_one_modality():
    assert prompt_modality(["Liver in abdominal CT"])[0] == "CT"
    assert prompt_modality(["Liver"]) == (None, "the known prompts' modalities in the vocabulary: CT, MR")
    assert prompt_modality(["Liver", "Liver in abdominal CT", "my own words"])[0] == "CT"
    assert prompt_modality(["Liver in abdominal CT", "Non-enhancing tumor core in head MR T2 FLAIR"])[0] is None
    assert prompt_modality(["qqqq"]) == (None, "no prompt is a phrasing of the vocabulary")
    assert prompt_modality(["Lesion in whole body PET"])[0] == "PET"


def test_windowed_ct_with_a_ct_prompt_is_ct(small_checkpoint, tmp_path):
    """A CT exported already windowed (-160..240 HU, no air): the heuristic alone says MR; a CT prompt says CT,
    the scan is windowed and oriented as a CT, and one warning line says that the heuristic disagrees."""
    windowed = _write_like(CT, np.clip(read_volume(CT).array, -160, 240), tmp_path / "windowed.nii.gz")
    volume = read_volume(windowed)
    assert resolve_modality(volume).source == "heuristic" and resolve_modality(volume).modality == "MR"
    decision = resolve_modality(volume, prompts=["Liver in abdominal CT"])
    assert (decision.modality, decision.source, decision.normalization) == ("CT", "prompts", "ct_window")
    assert decision.warning.startswith("modality CT from the prompts, but the intensities do not look like "
                                       "Hounsfield units (minimum value -160 >= -500, no air)")
    # the same model input as the original CT (the soft-tissue window is -160..240)
    image = prepare_scan(volume, prompts=["Liver in abdominal CT"]).image
    assert np.array_equal(image, prepare_scan(read_volume(CT)).image)

    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(windowed), "Liver in abdominal CT", "-m", str(small_checkpoint),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["modality"]["modality"] == "CT" and sidecar["modality"]["source"] == "prompts"
    assert sidecar["orientation"]["model"] == "LAS" and sidecar["modality"]["warning"] == decision.warning
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "windowed.nii.gz: modality CT from the prompts" in warnings[0]


def test_uint16_ct_with_offset_and_a_ct_prompt(small_checkpoint, tmp_path):
    """HU + 1024 stored as uint16: CT from the prompt, a warning with the --window that undoes the offset (and
    that window gives exactly the model input of the CT in HU)."""
    original = read_volume(CT)
    offset = replace(original, array=(np.clip(original.array, -1024, None) + 1024).astype(np.uint16))
    assert resolve_modality(offset).modality == "MR"
    prompts = ["Liver in abdominal CT", "spleen"]
    decision = resolve_modality(offset, prompts=prompts)
    assert (decision.modality, decision.source) == ("CT", "prompts")
    assert "minimum value 0 >= -500" in decision.warning and "--window 1064,400 for +1024" in decision.warning
    shifted = prepare_scan(offset, window="1064,400", prompts=prompts).image
    assert np.array_equal(shifted, prepare_scan(original).image)

    stored = _write_like(CT, offset.array, tmp_path / "ct_uint16.nii.gz")
    assert read_volume(stored).array.dtype == np.uint16
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(stored), *prompts, "-m", str(small_checkpoint), "-o", str(out),
                                 "--window", "1064,400"])
    assert result.exit_code == 0, result.output
    modality = json.loads((tmp_path / "seg.json").read_text())["modality"]
    assert (modality["modality"], modality["source"], modality["window"]) == ("CT", "prompts", "1064,400")
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {stored}: {decision.warning}"]


@pytest.mark.parametrize(("name", "modality"), [
    ("sub-01_T1w.nii.gz", "MR"), ("sub-01_ses-2_run-1_FLAIR.nii.gz", "MR"), ("sub-01_dwi.nii", "MR"),
    ("sub-01_t2w.nrrd", "MR"), ("sub-01_ct.nii.gz", "CT"), ("sub-01_pet.nii.gz", "PT"), ("sub-01_CT.mha", "CT"),
    ("example_ct_sm.nii.gz", None), ("ct.nii.gz", None), ("sub-01_mask.nii.gz", None)])
def test_bids_suffix(name, modality):
    assert bids_modality(Path("/data") / name)[0] == modality


def test_metadata_before_prompts_before_heuristic():
    mr = read_volume(MR)
    bids_mr = replace(mr, path=Path("/study/sub-01_T2w.nii.gz"))
    decision = resolve_modality(bids_mr, prompts=["Liver in abdominal CT"])  # the file name wins over prompts
    assert (decision.modality, decision.source, decision.warning) == ("MR", "bids", None)
    assert decision.detail == "BIDS suffix _T2w of the file name"
    ct = read_volume(CT)
    named_mr = replace(ct, path=Path("/study/sub-01_T1w.nii.gz"))  # a CT whose name says MR: warned
    decision = resolve_modality(named_mr)
    assert decision.modality == "MR" and decision.warning.startswith(
        "modality MR from the file name's BIDS suffix _T1w, but the intensities look like a CT (minimum value -1100")
    dicom = read_volume(DICOM_CT)
    decision = resolve_modality(dicom, prompts=["Non-enhancing tumor core in head MR T2 FLAIR"])
    assert (decision.modality, decision.source, decision.warning) == ("CT", "dicom", None)
    # --modality wins and is never second-guessed
    decision = resolve_modality(named_mr, "MR", prompts=["Liver in abdominal CT"])
    assert (decision.modality, decision.source, decision.warning) == ("MR", "override", None)
    # prompts that do not share one modality leave it to the heuristic
    decision = resolve_modality(ct, prompts=["liver", "spleen"])
    assert (decision.modality, decision.source) == ("CT", "heuristic")
