"""Training and fine-tuning: data layouts, a few real steps, resume, saving, CLI errors, and (slow) a Dice gain."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHALLENGE, DATA, REFERENCE
from typer.testing import CliRunner

from text3dsam_cli.errors import InputError, UsageError
from text3dsam_cli.io import read_npz_array, read_text_prompts, read_volume
from text3dsam_cli.model import Text3DSAMConfig, load_model
from text3dsam_cli.training import (
    AugmentConfig,
    TrainingArguments,
    TrainingSet,
    augment,
    discover_cases,
    finetune,
    list_checkpoints,
    load_case,
    match_dataset,
    new_model,
    parse_freeze,
)

US_CASE = "US_Cardiac_patient0027_2CH_half_sequence"
PROMPT_JSON = DATA / "prompts" / "CVPR25_TextSegFMData_with_class.json"
TOTALSEG = DATA / "nifti" / "totalsegmentator"
VOCAB = REFERENCE / "vocab.txt"
runner = CliRunner()


def _cli(*args: str):
    from text3dsam_cli.cli import app

    return runner.invoke(app, [str(a) for a in args])


def _save_npz(path: Path, **arrays) -> Path:
    """Test-only fixture writer (text_prompts is a plain dict in an object array, as the challenge stores it)."""
    members = {k: (np.array(v, dtype=object) if isinstance(v, dict) else v) for k, v in arrays.items()}
    np.savez(path, **members)
    return path


@pytest.fixture(scope="module")
def us_small() -> dict:
    """The real ultrasound case, every 4th pixel in-plane (19 x 138 x 168): image, gts and prompts."""
    image = read_volume(CHALLENGE / f"{US_CASE}.npz").array[:, ::4, ::4].copy()
    gts = read_npz_array(CHALLENGE / f"{US_CASE}_gt.npz", "gts")[:, ::4, ::4].copy()
    return {"imgs": image, "gts": gts, "spacing": np.array([1.232, 1.232, 1.0]),
            "text_prompts": read_text_prompts(CHALLENGE / f"{US_CASE}.npz")}


@pytest.fixture()
def npz_in_file(tmp_path, us_small) -> Path:
    folder = tmp_path / "npz_in_file"
    folder.mkdir()
    _save_npz(folder / f"{US_CASE}.npz", **us_small)
    return folder


@pytest.fixture()
def npz_gt_beside(tmp_path, us_small) -> Path:
    folder = tmp_path / "npz_beside"
    folder.mkdir()
    _save_npz(folder / f"{US_CASE}.npz", imgs=us_small["imgs"], spacing=us_small["spacing"],
              text_prompts=us_small["text_prompts"])
    _save_npz(folder / f"{US_CASE}_gt.npz", gts=us_small["gts"])
    return folder


@pytest.fixture()
def npz_no_prompts(tmp_path, us_small) -> Path:
    folder = tmp_path / "npz_no_prompts"
    folder.mkdir()
    _save_npz(folder / f"{US_CASE}.npz", imgs=us_small["imgs"], gts=us_small["gts"], spacing=us_small["spacing"])
    return folder


def _nnunet(root: Path, labels: dict) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "ct001_0000.nii.gz").symlink_to(TOTALSEG / "example_ct_sm.nii.gz")
    (root / "labelsTr" / "ct001.nii.gz").symlink_to(TOTALSEG / "example_seg.nii.gz")
    meta = {"name": "Dataset001_TotalSegTiny", "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture()
def nnunet_folder(tmp_path) -> Path:
    return _nnunet(tmp_path / "Dataset001_TotalSegTiny",
                   {"background": 0, "spleen": 1, "kidney_right": 2, "liver": 5, "kidneys": [2, 3]})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A from-scratch model with a 64x64x128 input (cheap steps), saved as a checkpoint folder."""
    config = Text3DSAMConfig(image_size=(64, 64, 128))
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before the autouse offline-hub fixture
        mp.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        model, _ = new_model(config, tokenizer=VOCAB, pretrained_text=False)
    folder = tmp_path_factory.mktemp("ckpt_tiny")
    model.save_pretrained(str(folder))
    return folder


def _args(data: Path, output: Path, **kw) -> TrainingArguments:
    kw.setdefault("max_steps", 2)
    kw.setdefault("save_every", 0)
    return TrainingArguments(data=str(data), output=str(output), device="cpu", **kw)


def _log(output: Path, kind: str = "train") -> list[dict]:
    lines = (output / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


# -- data layouts -----------------------------------------------------------------------------------------------


def test_npz_folder_with_gts_inside(npz_in_file):
    source = discover_cases(npz_in_file)
    assert source.layout == "npz" and len(source.cases) == 1
    case = source.cases[0]
    assert case.labels == case.image
    assert [c.key for c in case.classes] == ["1", "2", "3"]
    assert case.classes[0].prompts == ("Cardiac Ultrasound depicting left ventricular chamber",)
    data = TrainingSet(source, (16, 32, 32))
    assert len(data) == 3
    image, labels = data.volume(0)
    assert image.shape == (16, 32, 32) and image.dtype == torch.float32 and labels.dtype == torch.uint8
    image, target, prompt = data.item(0, np.random.default_rng(0))
    assert image.shape == target.shape == (1, 16, 32, 32)
    assert set(torch.unique(target).tolist()) == {0.0, 1.0} and prompt


def test_npz_folder_with_gt_beside(npz_gt_beside):
    case = discover_cases(npz_gt_beside).cases[0]
    assert case.labels.name == f"{US_CASE}_gt.npz"
    assert len(TrainingSet(discover_cases(npz_gt_beside), (16, 32, 32))) == 3


def test_npz_prompts_from_json(npz_no_prompts):
    with pytest.raises(InputError, match="no prompts"):
        discover_cases(npz_no_prompts)
    case = discover_cases(npz_no_prompts, PROMPT_JSON).cases[0]
    assert case.classes[0].prompts[:2] == ("Left Ventricle", "Left ventricle in heart Ultrasound")
    assert all(len(c.prompts) > 1 for c in case.classes)


def test_match_dataset_names(tmp_path):
    keys = list(json.loads(PROMPT_JSON.read_text()))
    assert match_dataset(Path("CT_AMOS_amos_0018.npz"), keys) == "CT_AMOS"
    assert match_dataset(Path("MR_AMOS_0507.npz"), keys) == "MR_AMOS"
    assert match_dataset(Path("MR_BraTS-T1c_bratsgli_0017.npz"), keys) == "MR_BraTS-T1c"
    assert match_dataset(Path("US_Cardiac_patient0027_2CH_half_sequence.npz"), keys) == "US_Cardiac"
    assert match_dataset(Path("CT_TotalSeg_organs_s0001.npz"), keys) == "CT_TotalSeg_organs"
    assert match_dataset(Path("PET_autoPET_fdg_0001.npz"), keys) == "autoPET"
    assert match_dataset(Path("train/CT/CT_AbdomenAtlas/BDMAP_0001.npz"), keys) == "CT_AbdomenAtlas"
    assert match_dataset(Path("Microscopy_SELMA3D_patchvolume_nuclei_004.npz"), keys) is None
    assert match_dataset(Path("case_001.npz"), keys) is None


def test_nnunet_folder(nnunet_folder):
    source = discover_cases(nnunet_folder)
    assert source.layout == "nnunet" and [c.name for c in source.cases] == ["ct001"]
    case = source.cases[0]
    assert case.modality == "CT"
    assert {c.key: (c.values, c.prompts) for c in case.classes} == {
        "1": ((1,), ("spleen",)), "2": ((2,), ("kidney right",)), "5": ((5,), ("liver",)),
        "kidneys": ((2, 3), ("kidneys",))}
    data = TrainingSet(source, (16, 32, 32))
    assert len(data) == 4
    image, _ = data.volume(0)
    assert float(image.min()) >= 0 and float(image.max()) <= 255.0  # CT windowed like `segment` does


def test_nnunet_images_and_labels_reoriented_like_segment(nnunet_folder):
    """The RAS CT reaches training in the table's CT orientation (LAS), its label map with it; npz stay as stored."""
    from text3dsam_cli.orientation import reorient
    from text3dsam_cli.pipeline import prepare_scan

    case = discover_cases(nnunet_folder).cases[0]
    ct, seg = read_volume(TOTALSEG / "example_ct_sm.nii.gz"), read_volume(TOTALSEG / "example_seg.nii.gz")
    image, labels = load_case(case)
    scan = prepare_scan(ct)
    assert scan.orientation["input"] == "RAS" and scan.orientation["model"] == "LAS"
    assert np.array_equal(image, scan.image)
    assert np.array_equal(labels, reorient(seg, "LAS")[0].array)
    assert not np.array_equal(labels, seg.array)  # RAS -> LAS flips x: something did move
    native_image, native_labels = load_case(case, orientation={"CT": "RAS"})  # a checkpoint's own table
    assert np.array_equal(native_labels, seg.array)
    assert np.array_equal(native_image, prepare_scan(ct, orientation="native").image)


def test_nnunet_inverted_labels_and_prompt_file(tmp_path):
    root = _nnunet(tmp_path / "inv", {"0": "background", "1": "spleen", "5": ["liver", "liver in abdominal CT"]})
    classes = discover_cases(root).cases[0].classes
    assert [(c.values, c.prompts) for c in classes] == [((1,), ("spleen",)), ((5,), ("liver", "liver in abdominal CT"))]
    named = _nnunet(tmp_path / "named", {"background": ["background"], "spleen": ["spleen", "the spleen"]})
    assert [(c.values, c.prompts) for c in discover_cases(named).cases[0].classes] == [((1,), ("spleen", "the spleen"))]
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps({"1": ["Spleen", "spleen in CT"]}))
    classes = discover_cases(root, prompt_file).cases[0].classes
    assert classes[0].prompts == ("Spleen", "spleen in CT") and classes[1].prompts[0] == "liver"


@pytest.mark.parametrize("problem", ["empty", "no_gt", "bad_labels", "no_labels_dir", "missing_label"])
def test_bad_data_folders(tmp_path, us_small, problem):
    folder = tmp_path / problem
    folder.mkdir()
    if problem == "no_gt":
        _save_npz(folder / "case.npz", imgs=us_small["imgs"], text_prompts=us_small["text_prompts"])
        bad = folder / "case.npz"
    elif problem in ("bad_labels", "no_labels_dir", "missing_label"):
        folder = _nnunet(folder / "ds", {"background": 0, "liver": "five"})
        bad = folder / "dataset.json"
        if problem == "no_labels_dir":
            (folder / "dataset.json").write_text(json.dumps({"labels": {"liver": 5}}))
            (folder / "labelsTr" / "ct001.nii.gz").unlink()
            (folder / "labelsTr").rmdir()
            bad = folder
        elif problem == "missing_label":
            (folder / "dataset.json").write_text(json.dumps({"labels": {"liver": 5}}))
            (folder / "labelsTr" / "ct001.nii.gz").unlink()
            bad = folder / "imagesTr" / "ct001_0000.nii.gz"
    else:
        bad = folder
    with pytest.raises(InputError) as info:
        discover_cases(folder)
    message = str(info.value)
    assert message.startswith(str(bad)) and "\n" not in message
    result = _cli("finetune", folder, "-o", tmp_path / "out", "--model", tmp_path / "never-loaded")
    assert result.exit_code == 1
    assert "error:" in result.output and str(bad) in result.output


def test_augment_is_deterministic_and_paired():
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    target = (image > 10).float()
    config = AugmentConfig(rotate_prob=1.0, scale_prob=0.0, shift_prob=0.0)
    a = augment(image, target, np.random.default_rng(3), config)
    b = augment(image, target, np.random.default_rng(3), config)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], image)
    assert torch.equal(a[1], (a[0] > 10).float())  # the target turned with the image
    same = augment(image, target, np.random.default_rng(3), AugmentConfig.none())
    assert torch.equal(same[0], image)


def test_parse_freeze():
    assert parse_freeze("none") == ()
    assert parse_freeze("text,image") == ("text", "image")
    with pytest.raises(UsageError):
        parse_freeze("decoder")


# -- training runs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["npz_in_file", "npz_gt_beside", "npz_prompts", "nnunet"])
def test_few_steps_each_layout(request, tmp_path, tiny_checkpoint, layout):
    prompts = None
    if layout == "npz_prompts":
        data, prompts = request.getfixturevalue("npz_no_prompts"), str(PROMPT_JSON)
    elif layout == "nnunet":
        data = request.getfixturevalue("nnunet_folder")
    else:
        data = request.getfixturevalue(layout)
    out = tmp_path / "out"
    val = str(data) if layout == "npz_gt_beside" else None
    result = finetune(_args(data, out, prompts=prompts, val=val, freeze=("image",) if layout == "nnunet" else ()),
                      str(tiny_checkpoint))
    assert result.steps == 2 and math.isfinite(result.loss)
    if val:  # validated once at the end, with Dice per class present in the ground truth
        assert [r["step"] for r in _log(out, "val")] == [2]
        assert set(result.validation["cases"][US_CASE]) == {"1", "2", "3"}
        assert 0 <= result.validation["mean_dice"] <= 1
    records = _log(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["seconds"] > 0 for r in records)
    assert (out / "config.json").is_file() and (out / "training_args.json").is_file()
    config = json.loads((out / "config.json").read_text())  # what segment will reorient by
    assert config["inference"]["orientation"] == {"CT": "LAS", "PT": "LAS", "MR": "LPS"}
    assert [s for s, _ in list_checkpoints(out)] == [2]  # --save-every 0: one checkpoint, at the end


def test_finetune_saves_loadable_identical_model(tmp_path, tiny_checkpoint, npz_in_file):
    model = load_model(tiny_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "out"
    finetune(_args(npz_in_file, out, max_steps=1, warmup_ratio=0.0, freeze=("text",)), model)
    reloaded = load_model(out)
    trained = model.state_dict()
    assert reloaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(reloaded.state_dict()[k], trained[k].cpu()) for k in trained)
    # the text encoder was frozen; the decoder moved
    assert all(torch.equal(before[k], trained[k]) for k in trained if k.startswith("text_encoder."))
    assert not torch.equal(before["text_projector.0.weight"], trained["text_projector.0.weight"])
    assert reloaded.config.image_size == (64, 64, 128)
    assert not list(out.glob(".final*"))
    args = json.loads((out / "training_args.json").read_text())
    assert args["args"]["freeze"] == ["text"] and args["mode"] == "finetune"


def test_resume_continues_from_checkpoint(tmp_path, tiny_checkpoint, npz_in_file):
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    def stop_after_checkpoint(event):
        if event.kind == "checkpoint" and event.step == 2:
            raise Stop

    with pytest.raises(Stop):
        finetune(_args(npz_in_file, out, max_steps=3, save_every=2), str(tiny_checkpoint),
                 callback=stop_after_checkpoint)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not (out / "config.json").exists()  # no final model from an interrupted run
    events = []
    result = finetune(_args(npz_in_file, out, max_steps=3, save_every=2), str(tiny_checkpoint),
                      callback=events.append)
    assert result.start_step == 2 and result.steps == 3
    assert [e.step for e in events if e.kind == "step"] == [3]
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    resumed = load_model(out).state_dict()

    straight = tmp_path / "straight"
    finetune(_args(npz_in_file, straight, max_steps=3), str(tiny_checkpoint))
    reference = load_model(straight).state_dict()
    worst = max(float((resumed[k].float() - reference[k].float()).abs().max()) for k in reference)
    assert worst < 1e-5, worst  # same data, same RNG: resuming changes nothing

    # a longer run resumes from the end of the previous one, on the learning-rate schedule of the new length
    finetune(_args(npz_in_file, out, max_steps=4), str(tiny_checkpoint))
    last = _log(out)[-1]
    assert last["step"] == 4 and last["lr"] > 0

    # --no-resume starts over and drops the old checkpoints
    result = finetune(_args(npz_in_file, out, max_steps=1, resume=False), str(tiny_checkpoint))
    assert result.start_step == 0 and [s for s, _ in list_checkpoints(out)] == [1]
    assert [r["step"] for r in _log(out)] == [1]


@pytest.mark.slow  # a real 4-step run (about 1 minute on a loaded 2-core machine)
def test_learning_rate_follows_warmup_then_cosine(npz_in_file, tiny_checkpoint, tmp_path):
    """The logged rate of each step is the warm-up + cosine formula written out here: 4 steps, warm-up ratio 0.25
    (ceil(1.0) = 1 warm-up step), base rate 2e-4; step s (0-based) trains at 2e-4 * s / 1 for s < 1, then at
    2e-4 * (1 + cos(pi * (s - 1) / 3)) / 2."""
    out = tmp_path / "schedule"
    finetune(_args(npz_in_file, out, max_steps=4, warmup_ratio=0.25, learning_rate=2e-4), str(tiny_checkpoint))
    logged = [(r["step"], r["lr"]) for r in _log(out)]
    base, warmup, total = 2e-4, 1, 4
    expected = [(s + 1, base * s / warmup if s < warmup else
                 base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))) for s in range(total)]
    assert [step for step, _ in logged] == [step for step, _ in expected]
    for (step, lr), (_, want) in zip(logged, expected):
        assert lr == pytest.approx(want, rel=1e-9, abs=1e-15), step
    assert [round(lr / base, 6) for _, lr in logged] == [0.0, 1.0, 0.75, 0.25]


def test_train_from_scratch_cli(tmp_path, npz_gt_beside):
    out = tmp_path / "scratch"
    common = ("train", npz_gt_beside, "-o", out, "--image-size", "64,64,64", "--patch-size", "64", "--max-steps", "2",
              "--tokenizer", VOCAB, "--device", "cpu", "--save-every", "0", "--quiet")
    result = _cli(*common)  # a 1x1x1 deepest feature map cannot train BatchNorm on one sample
    assert result.exit_code == 2 and "--batch-size 2" in result.output
    result = _cli(*common, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.config.image_size == (64, 64, 64) and model.config.pass_num == 2
    assert model.config.text_config["hidden_size"] == 312
    assert model.config.text_config["vocab_size"] == 30522 == len(model.tokenizer)
    assert model.tokenize(["left ventricle"])["input_ids"].tolist() == [[101, 2187, 18834, 7277, 2571, 102]]
    assert [r["step"] for r in _log(out)] == [1, 2]


@pytest.mark.parametrize("extra", [
    ["--freeze", "decoder"],
    ["--image-size", "65,64,64"],
    ["--image-size", "a,b"],
    ["--max-steps", "0"],
    ["--lr", "-1"],
    ["--batch-size", "0"],
    ["--pass-num", "0"],
    ["--no-such-option"],
])
def test_train_usage_errors_exit_2(tmp_path, npz_in_file, extra):
    result = _cli("train", npz_in_file, "-o", tmp_path / "out", "--tokenizer", VOCAB, *extra)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists()


def test_finetune_usage_errors_exit_2(tmp_path, npz_in_file, tiny_checkpoint):
    assert _cli("finetune", npz_in_file).exit_code == 2  # --output missing
    assert _cli("finetune", npz_in_file, "-o", tmp_path / "o", "--model", tiny_checkpoint,
                "--freeze", "all").exit_code == 2
    assert _cli("finetune", npz_in_file, "-o", tiny_checkpoint, "--model", tiny_checkpoint,
                "--device", "cpu").exit_code == 2  # would overwrite its own base model


# -- acceptance ---------------------------------------------------------------------------------------------------


def _mean_dice(labels: np.ndarray, gts: np.ndarray) -> float:
    scores = []
    for c in (1, 2, 3):
        p, g = labels == c, gts == c
        scores.append(2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum()))
    return float(np.mean(scores))


def _segment_dice(model_dir: Path, case: Path, out: Path, gts: np.ndarray) -> float:
    result = _cli("segment", case, "--model", model_dir, "--output", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    return _mean_dice(read_npz_array(out, "segs"), gts)


@pytest.mark.slow
def test_finetune_raises_ultrasound_dice(tmp_path, small_checkpoint):
    data = tmp_path / "data"
    data.mkdir()
    for name in (f"{US_CASE}.npz", f"{US_CASE}_gt.npz"):
        (data / name).symlink_to(CHALLENGE / name)
    gts = read_npz_array(CHALLENGE / f"{US_CASE}_gt.npz", "gts")
    before = _segment_dice(small_checkpoint, data / f"{US_CASE}.npz", tmp_path / "before.npz", gts)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    result = _cli("finetune", data, "--model", small_checkpoint, "--output", out, "--max-steps", "120",
                  "--device", "cpu", "--quiet")
    seconds = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    after = _segment_dice(out, data / f"{US_CASE}.npz", tmp_path / "after.npz", gts)
    steps = _log(out)
    per_step = float(np.median([r["seconds"] for r in steps]))
    print(f"\nUS case mean Dice {before:.3f} -> {after:.3f}; finetune {seconds:.0f} s, {per_step:.2f} s/step")
    assert len(steps) == 120
    assert after - before >= 0.20, (before, after)
