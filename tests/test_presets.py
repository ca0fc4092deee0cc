"""Presets: the training datasets' class lists as named prompt sets (`prompts --presets`, `segment --preset`)."""

from __future__ import annotations

import json

import pytest
from conftest import DATA
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.errors import UsageError
from text3dsam_cli.prompts import add_presets, find_preset, load_presets, match_prompt, normalize_text, prompt_modality

PROMPT_LIST = DATA / "prompts" / "CVPR25_TextSegFMData_with_class.json"
CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
runner = CliRunner()


def test_one_preset_per_training_dataset_each_class_once_in_a_trained_phrasing():
    source = json.loads(PROMPT_LIST.read_text(encoding="utf-8"))
    presets = load_presets()
    assert [p.name for p in presets] == list(source)
    for preset in presets:
        labels = source[preset.name]
        keys = sorted(int(k) for k in labels if k != "instance_label")
        assert list(preset.values) == keys
        assert preset.instance == bool(labels.get("instance_label"))
        assert len({normalize_text(p) for p in preset.prompts}) == len(preset.prompts)
        for value, prompt in zip(preset.values, preset.prompts):
            assert prompt in labels[str(value)] and match_prompt(prompt).known
        assert preset.modality == ("PET" if preset.name == "autoPET" else preset.name.split("_")[0])
    amos = find_preset("CT_AMOS")
    assert amos.modality == "CT" and len(amos.prompts) == 15 and amos.values == tuple(range(1, 16))
    assert find_preset("ct_amos") is amos and find_preset(" CT-AMOS") is amos
    assert len({normalize_text(p.name) for p in presets}) == len(presets)
    # phrasings that name the modality, so the prompts decide it (and the dataset's own wording where it has one)
    assert prompt_modality(amos.prompts)[0] == "CT"
    assert find_preset("MR_BraTS-T2f").prompts[0] == "Non-enhancing tumor core in head MR T2 FLAIR"
    assert {"CT_TotalSeg_organs", "MR_BraTS-T2f"} <= {p.name for p in presets}


def test_unknown_preset_names_close_matches():
    with pytest.raises(UsageError, match=r"unknown --preset 'CT_AMOZ' \(closest: CT_AMOS"):
        find_preset("CT_AMOZ")
    with pytest.raises(UsageError, match="MR_BraTS-T2f"):
        find_preset("brats t2f")


def test_label_values_when_combined():
    # alone: the dataset's own label values (CT_AirwayTree's one class is label 2)
    assert add_presets(["CT_AirwayTree"], []) == (["Airway Tree"], [2])
    # after PROMPT arguments (1..K): the next values; a prompt already given is not repeated
    prompts, values = add_presets(["CT_Lungs"], ["liver", "left lung segmented in chest CT imaging"])
    assert prompts == ["liver", "left lung segmented in chest CT imaging", "Right lung segmented in chest CT imaging"]
    assert values == [1, 2, 3]
    # after a JSON prompt file with its own values: above the largest
    assert add_presets(["CT_Lungs"], ["liver"], [7])[1] == [7, 8, 9]
    # two presets: the first keeps its values, the second continues, shared classes once
    prompts, values = add_presets(["CT_Lungs", "CT_ThoracicOrgans-TCIA-LCTSC"], [])
    assert values == [1, 2, 3, 4, 5] and len(set(prompts)) == 5


def test_prompts_presets_command():
    result = runner.invoke(app, ["prompts", "--presets", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data) == 68 and all({"name", "modality", "prompts"} <= set(d) for d in data)
    amos = next(d for d in data if d["name"] == "CT_AMOS")
    assert amos["modality"] == "CT" and len(amos["prompts"]) == 15 and amos["labels"]["6"] == "Liver in abdominal CT"
    result = runner.invoke(app, ["prompts", "--presets", "brats", "--modality", "MR"])
    assert result.exit_code == 0 and "MR_BraTS-T2f" in result.stdout and "CT_AMOS" not in result.stdout
    assert runner.invoke(app, ["prompts", "--presets", "qqqq"]).exit_code == 1


def test_segment_preset_usage_error_before_the_model(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(CT), "--preset", "CT_AMOZ", "-m", str(tmp_path / "no-model"),
                                 "-o", str(out)])
    assert result.exit_code == 2 and "CT_AMOS" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_segment_with_presets_prompts_and_prompt_file(small_checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(CT), "liver", "--preset", "CT_Lungs", "--preset", "CT_AirwayTree",
                                 "-m", str(small_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["presets"] == ["CT_Lungs", "CT_AirwayTree"]
    assert [(e["label"], e["prompt"]) for e in sidecar["labels"]] == [
        (1, "liver"), (2, "Left lung segmented in chest CT imaging"), (3, "Right lung segmented in chest CT imaging"),
        (4, "Airway Tree")]
    assert sidecar["modality"]["modality"] == "CT"
    prompt_file = tmp_path / "p.json"
    prompt_file.write_text('{"5": "liver"}')
    out = tmp_path / "alone" / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(CT), "--prompt-file", str(prompt_file), "--preset", "ct_lungs",
                                 "-m", str(small_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((out.parent / "seg.json").read_text())
    assert [e["label"] for e in sidecar["labels"]] == [5, 6, 7] and sidecar["presets"] == ["CT_Lungs"]
    plain = tmp_path / "plain.nii.gz"
    result = runner.invoke(app, ["segment", str(CT), "liver", "-m", str(small_checkpoint), "-o", str(plain)])
    assert result.exit_code == 0
    assert "presets" not in json.loads((tmp_path / "plain.json").read_text())
