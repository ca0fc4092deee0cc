"""The prompts module: one label-map parser and one validation rule for segment, train and eval."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CHALLENGE, DATA
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.errors import InputError, UsageError
from text3dsam_cli.evaluation import evaluate_folder
from text3dsam_cli.io import read_challenge_npz
from text3dsam_cli.prompts import (
    load_vocabulary,
    match_prompt,
    parse_label_map,
    prompt_problem,
    prompts_for,
    read_labels_json,
    read_prompt_collection,
    read_prompt_file,
    search_vocabulary,
)
from text3dsam_cli.training import discover_cases

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LIST = DATA / "prompts" / "CVPR25_TextSegFMData_with_class.json"
MR_NPZ = CHALLENGE / "MR_BraTS-T1c_bratsgli_0017.npz"
CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"

runner = CliRunner()

BAD_MAPS = [
    ({"-3": "liver"}, "outside 1..65535"),
    ({"0": "liver"}, "background"),
    ({"70000": "liver"}, "outside 1..65535"),
    ({"1": "liver", "01": "spleen"}, "given twice"),
    ({"1.5": "liver"}, "not an integer"),
    ({"liver": 1}, "not an integer"),
    ({"1": ""}, "non-empty prompt|is empty"),
    ({"1": ["liver", "  "]}, "non-empty prompt|is empty"),
    ({"1": ["liver", "\u200b"]}, "non-empty prompt|is empty"),
    ({"1": 5}, "non-empty prompt"),
    ({"1": "liver", "instance_label": "yes"}, "instance_label"),
    ({"1": "liver", "instance_label": 2}, "instance_label"),
    ({"instance_label": 0}, "no prompts"),
]


def test_label_map_accepts_the_documented_forms():
    label_map = parse_label_map({"5": "liver", "12": ["spleen", "the spleen"], "instance_label": "true"})
    assert label_map.values == (5, 12) and label_map.prompts == ["liver", "spleen"]
    assert label_map.phrasings_of(12) == ("spleen", "the spleen") and label_map.instance is True
    for flag, expected in ((0, False), (1, True), (False, False), ("0", False), ("False", False)):
        assert parse_label_map({"1": "x", "instance_label": flag}).instance is expected
    assert parse_label_map({"1": "x"}).instance is None


@pytest.mark.parametrize(("data", "message"), BAD_MAPS)
def test_label_map_rule_refuses_with_one_line(data, message, tmp_path):
    with pytest.raises(InputError, match=message) as info:
        parse_label_map(data, tmp_path / "p.json")
    assert "\n" not in str(info.value) and str(info.value).startswith(str(tmp_path / "p.json"))


@pytest.mark.parametrize(("data", "message"), BAD_MAPS)
def test_segment_train_and_eval_share_the_rule(data, message, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    for read in (read_prompt_file, read_prompt_collection, read_labels_json):
        # segment's prompt file: a prompt that is no text is a usage error (exit 2), the rest of the rule as train/eval
        errors = (InputError, UsageError) if read is read_prompt_file else InputError
        with pytest.raises(errors, match=message):
            read(path)


def test_challenge_prompt_list_passes_the_rule():
    data = read_prompt_collection(PROMPT_LIST)
    assert len(data) == 68


def _npz_with_prompts(tmp_path: Path, prompts: dict) -> Path:
    case = np.load(MR_NPZ, allow_pickle=True)
    path = tmp_path / "case.npz"
    np.savez_compressed(path, imgs=case["imgs"][:8, :32, :32], spacing=case["spacing"],
                        text_prompts=np.array(prompts, dtype=object))
    return path


@pytest.mark.parametrize(("prompts", "message"), [
    ({-3: "liver", "instance_label": 0}, "outside 1..65535"),
    ({"0": "liver"}, "background"),
    ({"70000": "liver"}, "outside 1..65535"),
    ({"1": "liver", "01": "spleen"}, "given twice"),
    ({1: "liver", "1": "spleen"}, "given twice"),
])
def test_npz_text_prompts_are_validated(prompts, message, tmp_path):
    path = _npz_with_prompts(tmp_path, prompts)
    with pytest.raises(InputError, match=message) as info:
        prompts_for(read_challenge_npz(path), [])
    assert str(path) in str(info.value)


def test_npz_bad_text_prompts_fail_segment_with_one_line(small_checkpoint, tmp_path):
    path = _npz_with_prompts(tmp_path, {"1": "liver", "01": "spleen", "instance_label": 0})
    result = runner.invoke(app, ["segment", str(path), "-m", str(small_checkpoint), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "text_prompts: label value 1 is given twice" in errors[0]
    assert not (tmp_path / "out" / "case.npz").exists()


def test_real_challenge_prompts_unchanged():
    prompts, values, instance = prompts_for(read_challenge_npz(MR_NPZ), [])
    assert values == [1, 2, 3, 4] and not instance and all(isinstance(p, str) and p for p in prompts)


def test_training_prompt_file_errors_name_the_dataset(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"CT_AMOS": {"1": ["Spleen"], "instance_label": "yes"}}))
    with pytest.raises(InputError, match="dataset 'CT_AMOS': 'instance_label' must be 0, 1, true or false"):
        discover_cases(CHALLENGE, tmp_path / "p.json")


def test_eval_labels_json_instance_word(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"1": "nucleus", "instance_label": "yes"}))
    with pytest.raises(InputError, match="'instance_label' must be 0, 1, true or false, got 'yes'"):
        evaluate_folder(tmp_path, tmp_path, labels_json=tmp_path / "labels.json")


def test_duplicate_prompts_keep_every_label_in_the_sidecar(small_checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(CT), "liver", "spleen", "liver", "-m", str(small_checkpoint),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["prompts"] == {"liver": [1, 3], "spleen": 2}
    assert [(e["label"], e["prompt"]) for e in sidecar["labels"]] == [(1, "liver"), (2, "spleen"), (3, "liver")]


# -- the vocabulary ------------------------------------------------------------------------------------------


def _build_script():
    spec = importlib.util.spec_from_file_location("build_vocabulary", ROOT / "scripts" / "build_vocabulary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_vocabulary_is_what_the_script_derives():
    script = _build_script()
    derived = script.render(script.derive(json.loads(PROMPT_LIST.read_text(encoding="utf-8"))))
    shipped = (ROOT / "text3dsam_cli" / "data" / "vocabulary.json").read_text(encoding="utf-8")
    assert shipped == derived
    assert (ROOT / "text3dsam_cli" / "data" / "NOTICE").read_text().count("CC BY-NC-SA 4.0") == 1


def test_vocabulary_covers_the_challenge_prompt_list():
    entries = load_vocabulary()
    source = json.loads(PROMPT_LIST.read_text(encoding="utf-8"))
    assert len(entries) == 247 and {e.modality for e in entries} == {"CT", "MR", "PET", "US", "Microscopy"}
    for labels in source.values():  # every phrasing of the file is known
        for key, phrasings in labels.items():
            if key != "instance_label":
                assert all(match_prompt(p).known for p in phrasings)
    liver = next(e for e in entries if e.name == "Liver" and e.modality == "CT")
    assert "CT_AMOS" in liver.datasets and "Liver in abdominal CT" in liver.phrasings


def test_search_is_case_insensitive_and_typo_tolerant():
    assert {(e.name, e.modality) for e in search_vocabulary("kidnye")} >= {
        ("Left kidney", "CT"), ("Right kidney", "CT"), ("Left kidney", "MR"), ("Right kidney", "MR")}
    assert search_vocabulary("SPLEEN")[0].name == "Spleen"
    assert search_vocabulary("spleen", modality="mr")[0].modality == "MR"
    assert all(e.modality == "PET" for e in search_vocabulary("", modality="PT"))
    assert len(search_vocabulary("", limit=3)) == 3 and search_vocabulary("qqqqzzzz") == []


def test_match_prompt_normalises_and_finds_the_closest_class():
    match = match_prompt("  LIVER, in abdominal   CT. ")
    assert match.known and match.closest == "Liver" and match.score == 1.0
    match = match_prompt("left kidny")
    assert not match.known and match.closest == "Left kidney" and 0.5 < match.score < 1.0


def prompts_cli(*args):
    return runner.invoke(app, ["prompts", *args])


def test_prompts_command_table_and_json():
    result = prompts_cli("kidnye")
    assert result.exit_code == 0 and "Left kidney" in result.stdout and "CT_AMOS" in result.stdout
    result = prompts_cli("liver", "--modality", "MR", "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and data and all({"name", "modality"} <= set(d) for d in data)
    assert data[0]["name"] == "Liver" and {d["modality"] for d in data} == {"MR"}
    assert prompts_cli("--modality", "XYZ").exit_code == 2
    assert prompts_cli("qqqqzzzz").exit_code == 1


def test_strict_prompts_refuses_before_loading_the_model(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(CT), "liver", "left kidny", "spleeen", "--strict-prompts",
                                 "-m", str(tmp_path / "no-such-model"), "-o", str(out)])
    assert result.exit_code == 2 and "'left kidny'" in result.stderr and "Left kidney" in result.stderr
    assert "'spleeen'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_prompt_warns_once_and_the_sidecar_says_so(small_checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(CT), "liver", "left kidny", "-m", str(small_checkpoint),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'left kidny'" in warnings[0] and "Left kidney" in warnings[0]
    labels = json.loads((tmp_path / "seg.json").read_text())["labels"]
    assert labels[0]["vocabulary"] == {"known": True, "closest": "Liver", "score": 1.0}
    assert labels[1]["vocabulary"]["known"] is False and labels[1]["vocabulary"]["closest"] == "Left kidney"


# -- prompts that are not text (one rule: prompts.prompt_problem) ------------------------------------------------

NOT_TEXT = ["", "   ", "\t\n", "\u200b", "\x00", "\x00\x01\x1f\x7f", "\ufeff\u200d\u2060", "\u0301", "\ufffd",
            "liver\udcff", "\ud800"]


@pytest.mark.parametrize("text", NOT_TEXT)
def test_prompt_rule_refuses_empty_invisible_and_invalid_text(text):
    problem = prompt_problem(text)
    assert problem is not None
    assert ("not valid text" in problem) == any("\ud800" <= c <= "\udfff" for c in text)


@pytest.mark.parametrize("text", ["liver", " left kidney ", "Leber", "肝臓", "liver\x00", "\u200bspleen", "😀"])
def test_prompt_rule_keeps_text(text):
    assert prompt_problem(text) is None


def _refused_before_the_model(result, out, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines
    assert not out.exists()


@pytest.mark.parametrize("text", NOT_TEXT)
def test_segment_refuses_a_prompt_that_is_not_text_before_the_model_loads(text, tmp_path):
    out = tmp_path / "out"
    # the model does not exist: exit 2 about the prompt proves the model was never loaded
    result = runner.invoke(app, ["segment", str(CT), "liver", text, "-m", str(tmp_path / "no-model"), "-o", str(out)])
    _refused_before_the_model(result, out, "prompt")


def test_segment_refuses_bytes_that_are_not_utf8_from_a_real_command_line(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "text3dsam_cli", "segment", str(CT), b"liver\xff", "-m",
                          str(tmp_path / "no-model"), "-o", str(out)], capture_output=True, cwd=ROOT,
                         env={**__import__("os").environ, "LC_ALL": "C.UTF-8"})
    assert run.returncode == 2 and run.stdout == b""
    assert run.stderr.decode().strip() == "error: prompt 'liver\\udcff' is not valid text (byte 0xff is not UTF-8)"
    assert not out.exists()


@pytest.mark.parametrize(("name", "content", "words"), [
    ("p.txt", "liver\n\u200b\n".encode(), ["p.txt: line 2: prompt '\\u200b' is empty"]),
    ("p.txt", b"liver\n\x00\x01\n", ["p.txt: line 2: prompt"]),
    ("p.txt", b"liver\nspleen\xff\n", ["p.txt: the prompt file is not valid UTF-8"]),
    ("p.json", json.dumps({"1": "liver", "2": "\u200b"}).encode(), ["p.json: label '2': prompt '\\u200b'"]),
    ("p.json", b'{"1": "liver", "2": "\\ud800"}', ["p.json: label '2': prompt '\\ud800' is not valid text"]),
])
def test_segment_refuses_prompt_files_with_prompts_that_are_not_text(name, content, words, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(CT), "--prompt-file", str(path), "-m", str(tmp_path / "no-model"),
                                 "-o", str(out)])
    _refused_before_the_model(result, out, *words)


def test_segment_refuses_npz_text_prompts_that_are_not_text_before_the_model_loads(tmp_path):
    path = _npz_with_prompts(tmp_path, {"1": "liver", "2": ["\x00\u200b", "spleen"], "instance_label": 0})
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(path), "-m", str(tmp_path / "no-model"), "-o", str(out)])
    _refused_before_the_model(result, out, str(path), "text_prompts: label '2': prompt")
    with pytest.raises(UsageError, match="text_prompts"):
        prompts_for(read_challenge_npz(path), [])


@pytest.mark.parametrize("text", NOT_TEXT)
def test_viewer_request_prompts_share_the_rule(text):
    from text3dsam_cli.view.session import check_prompts

    # the viewer's request path (ViewSession.segment) calls check_prompts; the app answers its UsageError with 400
    with pytest.raises(UsageError, match="prompt"):
        check_prompts(["liver", text])
    assert check_prompts([" liver "]) == ["liver"]


@pytest.mark.parametrize("query", ["😀", "%", ".*", "!!"])
def test_prompts_command_says_no_match_for_a_query_without_letters(query):
    result = prompts_cli(query)
    assert result.exit_code == 1 and "no class matches" in result.stderr and not result.stdout
    assert search_vocabulary(query) == [] and json.loads(prompts_cli(query, "--json").stdout) == []
    assert len(search_vocabulary("  ")) == len(load_vocabulary())  # no query at all: every class
