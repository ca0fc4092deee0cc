"""`text3dsam check-data` and the data check at the start of finetune/train, on datasets built from real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_training import TOTALSEG, US_CASE, _cli, _save_npz, tiny_checkpoint, us_small  # noqa: F401

from text3dsam_cli.errors import InputError
from text3dsam_cli.training import TrainingArguments, finetune
from text3dsam_cli.training.check import check_data, require_good_cases
from text3dsam_cli.training.data import discover_cases

CT, SEG = TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "example_seg.nii.gz"


def _dataset(root: Path, broken: dict[str, str], labels: dict | None = None) -> Path:
    """An nnU-Net dataset of the real TotalSegmentator CT: case ``good`` untouched, one case per problem."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = labels or {"background": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}
    meta = {"name": "Dataset002_Check", "channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    ct, seg = nib.load(CT), nib.load(SEG)
    image, label = np.asarray(ct.dataobj), np.asarray(seg.dataobj)
    (root / "imagesTr" / "good_0000.nii.gz").symlink_to(CT)
    (root / "labelsTr" / "good.nii.gz").symlink_to(SEG)
    for name, problem in broken.items():
        img_path, lab_path = root / "imagesTr" / f"{name}_0000.nii.gz", root / "labelsTr" / f"{name}.nii.gz"
        img_path.symlink_to(CT)
        affine = seg.affine.copy()
        data = label
        if problem == "spacing":  # same shape, twice the spacing in the affine
            affine[:3, :3] *= 2.0
        elif problem == "origin":
            affine[:3, 3] += 10.0
        elif problem == "direction":
            affine[:3, 0] *= -1.0
        elif problem == "shape":
            data = label[:, :, :-1]
        elif problem == "empty":
            data = np.zeros_like(label)
        elif problem == "float":
            data = label.astype(np.float32) + 0.5
        elif problem == "4d":
            img_path.unlink()
            nib.save(nib.Nifti1Image(np.stack([image, image], -1), ct.affine), img_path)
        elif problem == "2d":
            img_path.unlink()
            nib.save(nib.Nifti1Image(image[:, :, 0], ct.affine), img_path)
        elif problem == "corrupt":
            img_path.unlink()
            img_path.write_bytes(CT.read_bytes()[:5000])
        if problem in ("4d", "2d", "corrupt"):
            lab_path.symlink_to(SEG)
        else:
            nib.save(nib.Nifti1Image(data, affine), lab_path)
    return root


def test_a_clean_dataset_passes_with_notes_for_unprompted_values(tmp_path):
    result = check_data(_dataset(tmp_path / "ds", {}))
    assert result.ok and result.bad_cases == []
    [note] = result.problems
    assert note.case == "good" and note.kind == "unprompted_values" and not note.bad
    assert note.message.startswith("label value(s) 4, 6, 7, ") and "not in the prompt map" in note.message
    assert "\n" not in note.line() and note.line().startswith("note: good: ")
    # the shared challenge cases are clean
    assert check_data(TOTALSEG.parents[1] / "challenge").ok


@pytest.mark.parametrize(("problem", "kind", "words"), [
    ("spacing", "spacing", "label spacing 6 x 6 x 6 mm differs from the image's 3 x 3 x 3 mm"),
    ("origin", "origin", "label origin"),
    ("direction", "direction", "label direction"),
    ("shape", "shape", "label shape (29, 101, 122) differs from the image's (30, 101, 122)"),
    ("float", "dtype", "non-integer"),
    ("4d", "unreadable", "4-D image"),
    ("2d", "unreadable", "2-D image"),
    ("corrupt", "unreadable", ""),
])
def test_each_bad_case_is_named_on_one_line(tmp_path, problem, kind, words):
    result = check_data(_dataset(tmp_path / "ds", {"broken": problem}))
    assert not result.ok and result.bad_cases == ["broken"]
    bad = [p for p in result.problems if p.bad]
    assert [p.kind for p in bad] == [kind] and words in bad[0].message
    assert bad[0].line().startswith(f"bad: broken: {bad[0].path}: ") and "\n" not in bad[0].line()
    assert all(p.case == "good" for p in result.problems if not p.bad)


def test_empty_label_map_is_a_note(tmp_path):
    result = check_data(_dataset(tmp_path / "ds", {"blank": "empty"}))
    assert result.ok
    assert [(p.case, p.kind) for p in result.problems if p.case == "blank"] == [("blank", "empty")]


def test_npz_ground_truth_of_another_shape(tmp_path, us_small):  # noqa: F811
    folder = tmp_path / "npz"
    folder.mkdir()
    _save_npz(folder / f"{US_CASE}.npz", imgs=us_small["imgs"], spacing=us_small["spacing"],
              text_prompts=us_small["text_prompts"])
    _save_npz(folder / f"{US_CASE}_gt.npz", gts=us_small["gts"][:, :-1])
    [problem] = check_data(folder).problems
    assert problem.bad and problem.kind == "shape" and problem.path.name == f"{US_CASE}_gt.npz"


def test_check_data_cli(tmp_path):
    data = _dataset(tmp_path / "ds", {"half": "spacing", "flat": "2d"})
    result = _cli("check-data", data, "--quiet")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert [line.split(": ")[:2] for line in lines] == [["bad", "flat"], ["note", "good"], ["bad", "half"]]
    assert str(data / "labelsTr" / "half.nii.gz") in lines[2] and "spacing" in lines[2]
    report = json.loads(_cli("check-data", data, "--json", "--quiet").stdout)
    assert report["bad_cases"] == ["flat", "half"] and report["cases"] == 3 and report["layout"] == "nnunet"
    clean = _cli("check-data", _dataset(tmp_path / "clean", {}))
    assert clean.exit_code == 0 and "1 case(s) checked: 0 bad, 1 note(s)" in clean.output
    assert _cli("check-data", tmp_path / "missing").exit_code == 1


def test_require_good_cases_stops_or_skips(tmp_path):
    source = discover_cases(_dataset(tmp_path / "ds", {"half": "spacing"}))
    lines: list[str] = []
    with pytest.raises(InputError, match=r"1 of 2 training case\(s\) failed the data check, e\.g\. half "
                                         r"\(label spacing .*--skip-bad-cases") as info:
        require_good_cases(source, report=lines.append)
    assert "\n" not in str(info.value)
    assert [line.split(": ")[:2] for line in lines] == [["note", "good"], ["bad", "half"]]
    lines.clear()
    kept = require_good_cases(source, skip_bad_cases=True, report=lines.append)
    assert [c.name for c in kept.cases] == ["good"] and [c.name for c in source.cases] == ["good", "half"]
    assert lines[-1] == "note: --skip-bad-cases: training without 1 bad case(s): half"
    only_bad = discover_cases(_dataset(tmp_path / "bad", {"half": "spacing"}))
    only_bad.cases = [c for c in only_bad.cases if c.name == "half"]
    with pytest.raises(InputError, match="every training case failed"):
        require_good_cases(only_bad, skip_bad_cases=True)


def test_finetune_stops_before_training_or_skips_bad_cases(tmp_path, tiny_checkpoint):  # noqa: F811
    data = _dataset(tmp_path / "ds", {"half": "spacing"})
    out = tmp_path / "out"
    common = ("finetune", data, "-o", out, "--model", tiny_checkpoint, "--max-steps", "1", "--save-every", "0",
              "--device", "cpu", "--freeze", "image")
    result = _cli(*common)
    assert result.exit_code == 1, result.output
    assert "failed the data check" in result.output and "half" in result.output
    assert not out.exists()  # stopped before anything was written
    events = []
    run = finetune(TrainingArguments(data=str(data), output=str(out), max_steps=1, save_every=0, device="cpu",
                                     freeze=("image",), skip_bad_cases=True), str(tiny_checkpoint),
                   callback=events.append)
    assert run.steps == 1 and math.isfinite(run.loss)
    infos = [e.message for e in events if e.kind == "info"]
    assert any(m.startswith("bad: half: ") and "spacing" in m for m in infos)
    assert "note: --skip-bad-cases: training without 1 bad case(s): half" in infos
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["cases"] == 1 and recorded["args"]["skip_bad_cases"] is True
