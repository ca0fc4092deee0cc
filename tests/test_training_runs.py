"""Issue 20: the validation split, best and last models, the summary, early stop, the CSV/PNG/TensorBoard logs,
resume guards, ``--save-every 0``, per-rank seeds and one error line per DDP run. Tiny runs on real data."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, REFERENCE
from safetensors.torch import load_file
from typer.testing import CliRunner

from text3dsam_cli.errors import InputError, UsageError
from text3dsam_cli.model import Text3DSAMConfig, load_model
from text3dsam_cli.training import AugmentConfig, TrainingArguments, finetune, list_checkpoints, new_model
from text3dsam_cli.training.resume import MAY_DIFFER
from text3dsam_cli.training.splits import make_split, read_split
from text3dsam_cli.training.trainer import rank_seed, seed_process

TOTALSEG = DATA / "nifti" / "totalsegmentator"
runner = CliRunner()


def _cli(*args):
    from text3dsam_cli.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A from-scratch model with a 64x64x128 input (cheap steps), saved as a checkpoint folder."""
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        model, _ = new_model(Text3DSAMConfig(image_size=(64, 64, 128)), tokenizer=REFERENCE / "vocab.txt",
                             pretrained_text=False)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(str(folder))
    return folder


def _dataset(root: Path, n: int, labels: dict | None = None) -> Path:
    """An nnU-Net folder of ``n`` cases, each the real TotalSegmentator CT and its label map (symlinks)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        (root / "imagesTr" / f"ct{i:03d}_0000.nii.gz").symlink_to(TOTALSEG / "example_ct_sm.nii.gz")
        (root / "labelsTr" / f"ct{i:03d}.nii.gz").symlink_to(TOTALSEG / "example_seg.nii.gz")
    meta = {"name": "Dataset002_T", "channel_names": {"0": "CT"}, "numTraining": n, "file_ending": ".nii.gz",
            "labels": labels or {"background": 0, "spleen": 1, "liver": 5}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory.mktemp("three") / "ds", 3)


def _args(data: Path, output: Path, **kw) -> TrainingArguments:
    kw.setdefault("max_steps", 1)
    kw.setdefault("save_every", 0)
    kw.setdefault("freeze", ("image",))  # cheap steps; BatchNorm needs no batch of two
    kw.setdefault("augment", AugmentConfig.none())
    return TrainingArguments(data=str(data), output=str(output), device="cpu", **kw)


def _records(output: Path, kind: str) -> list[dict]:
    lines = (output / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the split -----------------------------------------------------------------------------------------------------


def test_split_fraction_is_deterministic():
    ids = [f"case{i:02d}" for i in range(10)]
    split = make_split(ids)
    assert len(split.val) == 2 and sorted(split.train + split.val) == ids
    assert make_split(list(reversed(ids))).to_dict() == split.to_dict()  # the order given does not matter
    assert len(make_split(ids, 0.5).val) == 5
    assert len(make_split(ids[:2], 0.2).val) == 1  # at least one with two cases
    assert len(make_split(ids[:3], 0.9).val) == 2  # at most n - 1
    assert make_split(ids[:1], 0.2).val == [] and make_split(ids, 0.0).val == []


def test_k_fold_partitions_the_cases():
    ids = [f"c{i}" for i in range(11)]
    folds = [make_split(ids, fold=k, folds=3) for k in range(3)]
    held = [v for f in folds for v in f.val]
    assert sorted(held) == sorted(ids)  # every case validated exactly once
    assert sorted(len(f.val) for f in folds) == [3, 4, 4]
    assert all(set(f.train) == set(ids) - set(f.val) for f in folds)
    assert make_split(ids, fold=1, folds=3).to_dict() == folds[1].to_dict()
    with pytest.raises(UsageError, match="more folds"):
        make_split(ids[:2], fold=0, folds=3)


@pytest.mark.parametrize("kw, message", [
    ({"fold": 5}, "--fold 5"), ({"fold": 0, "folds": 1}, "--folds 1"), ({"folds": 3}, "needs --fold"),
    ({"fold": 0, "val": "x"}, "exclude each other"), ({"val_fraction": 1.0}, "--val-fraction"),
    ({"early_stop": -1}, "--early-stop")])
def test_split_and_stop_options_refused(kw, message):
    with pytest.raises(UsageError, match=message):
        TrainingArguments(data="d", output="o", **kw).check()


def test_read_split_checks_ids(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ["a"], "val": ["zz"]}))
    with pytest.raises(InputError, match="not in the training data: zz"):
        read_split(path, ["a", "b"])
    path.write_text(json.dumps({"train": ["a"], "val": ["a"]}))
    with pytest.raises(InputError, match="both in train and val"):
        read_split(path, ["a", "b"])


# -- a run: split, best and last, summary, logs, rerun, extension ------------------------------------------------


def test_split_best_last_summary_and_logs(tmp_path, tiny, three):
    out = tmp_path / "run"
    result = finetune(_args(three, out, max_steps=3, val_every=1, learning_rate=1e-3), str(tiny))

    split = json.loads((out / "splits.json").read_text())
    assert split == make_split(["ct000", "ct001", "ct002"]).to_dict() and len(split["val"]) == 1
    vals = _records(out, "val")
    assert [v["step"] for v in vals] == [1, 2, 3]
    assert list(vals[0]["cases"]) == split["val"]  # validated on the held-out case only
    assert set(vals[0]["class_mean"]) == {"1", "5"}
    means = [v["mean_dice"] for v in vals]
    best = 1 + int(np.argmax(means))  # the first of equal maxima
    summary = json.loads((out / "training_summary.json").read_text())
    assert {"best_step", "best_val_dice", "last_step", "trainable_parameters", "total_parameters"} <= set(summary)
    assert summary["best_step"] == best == result.best_step and summary["last_step"] == 3
    assert summary["best_val_dice"] == pytest.approx(max(means))
    model = load_model(tiny)
    assert summary["total_parameters"] == sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.image_encoder.parameters())
    assert summary["trainable_parameters"] == summary["total_parameters"] - frozen

    # OUTPUT holds the best weights, OUTPUT/last the last ones; both load as models
    assert _same(_weights(out), _weights(out / "checkpoints" / "best"))
    assert _same(_weights(out / "last"), _weights(out / "checkpoints" / "step-3"))  # the last step's state
    assert load_model(out).config.image_size == (64, 64, 128)
    assert _same(_weights(out), _weights(out / "last")) == (best == 3)
    assert [s for s, _ in list_checkpoints(out)] == [3]  # --save-every 0: only at the end

    # CSV beside the JSON lines, and the plot
    rows = (out / "train_log.csv").read_text().splitlines()
    assert rows[0] == "type,step,epoch,loss,lr,seconds,elapsed,mean_dice,dice_1,dice_5"
    assert [r.split(",")[:2] for r in rows[1:]] == [["train", "1"], ["val", "1"], ["train", "2"], ["val", "2"],
                                                    ["train", "3"], ["val", "3"]]
    assert float(rows[-1].split(",")[7]) == pytest.approx(means[-1])
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again: nothing to do, nothing rewritten
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    events = []
    again = finetune(_args(three, out, max_steps=3, val_every=1, learning_rate=1e-3), str(tiny), callback=events.append)
    assert again.already_done and again.steps == 3 and math.isfinite(again.loss)
    assert any("already finished" in (e.message or "") for e in events)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    # a larger --max-steps continues on the stretched schedule, with the split from splits.json
    longer = finetune(_args(three, out, max_steps=5, val_every=1, learning_rate=1e-3), str(tiny))
    assert longer.start_step == 3 and longer.steps == 5
    record = json.loads((out / "training_args.json").read_text())
    assert record["split"]["origin"] == "file" and record["warmup_steps"] == 1 and record["total_steps"] == 5
    train = _records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * (3 - 1) / (5 - 1)))  # warm-up kept at 1 step, cosine to step 5
    assert train[3]["lr"] == pytest.approx(lr)


def test_final_loss_comes_from_the_saved_state(tmp_path, tiny, three):
    out = tmp_path / "run"
    first = finetune(_args(three, out, max_steps=2, val_fraction=0.0), str(tiny))
    assert not (out / "checkpoints" / "best").exists() and json.loads((out / "splits.json").read_text())["val"] == []
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["model"] == "last" and summary["best_step"] is None and summary["last_step"] == 2
    assert _same(_weights(out), _weights(out / "last"))
    # killed after its last checkpoint, before the final model was saved: the rerun only finishes it
    (out / "training_summary.json").unlink()
    (out / "config.json").unlink()
    events = []
    result = finetune(_args(three, out, max_steps=2, val_fraction=0.0), str(tiny), callback=events.append)
    assert result.start_step == 2 and not [e for e in events if e.kind == "step"]
    assert result.loss == pytest.approx(first.loss) and math.isfinite(result.loss)
    assert [e.loss for e in events if e.kind == "done"] == [result.loss]
    assert (out / "config.json").is_file()


def test_early_stop(tmp_path, tiny, three):
    out = tmp_path / "run"
    # at lr 1e-9 the weights hardly move: the second validation is no better than the first
    kw = {"max_steps": 4, "val_every": 1, "learning_rate": 1e-9, "warmup_ratio": 0.0}
    result = finetune(_args(three, out, early_stop=1, **kw), str(tiny))
    means = [v["mean_dice"] for v in _records(out, "val")]
    assert len(means) == 2 and not means[1] > means[0]
    summary = json.loads((out / "training_summary.json").read_text())
    assert result.stopped_early and summary["stopped_early"] and summary["last_step"] == 2
    assert summary["best_step"] == 1 and [s for s, _ in list_checkpoints(out)] == [2]
    events = []
    again = finetune(_args(three, out, early_stop=1, **kw), str(tiny), callback=events.append)
    assert again.already_done and any("stopped early" in (e.message or "") for e in events)
    more = finetune(_args(three, out, early_stop=0, **kw), str(tiny))  # --early-stop is not run-changing
    assert more.start_step == 2 and more.steps == 4


def test_tensorboard(tmp_path, tiny, three):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    out = tmp_path / "run"
    finetune(_args(three, out, tensorboard=True), str(tiny))
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "val/mean_dice"} <= set(acc.Tags()["scalars"])


# -- resume guards -------------------------------------------------------------------------------------------------


def test_may_differ_is_explicit():
    from dataclasses import fields

    names = {f.name for f in fields(TrainingArguments)}
    assert set(MAY_DIFFER) <= names
    # everything else is compared: the run-changing fields the issue names are among them
    assert {"data", "prompts", "learning_rate", "warmup_ratio", "batch_size", "grad_accum", "augment", "freeze",
            "seed", "val_fraction", "fold", "precision"} <= names - set(MAY_DIFFER)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny, three) -> Path:
    out = tmp_path_factory.mktemp("guard") / "run"
    finetune(_args(three, out, max_steps=2, val_fraction=0.0), str(tiny))
    return out


@pytest.mark.parametrize("change, named", [
    ({"learning_rate": 5e-4}, "--lr 0.0001 -> 0.0005"),
    ({"warmup_ratio": 0.5}, "--warmup-ratio"),
    ({"batch_size": 2}, "--batch-size 1 -> 2"),
    ({"augment": AugmentConfig()}, "--augment"),
    ({"freeze": ("text", "image")}, "--freeze"),
    ({"seed": 7}, "--seed 42 -> 7"),
    ({"max_steps": 1}, "total steps 2 -> 1"),
    ({"data": "other"}, "DATA"),
    ({"prompts": "prompts"}, "--prompts"),
    ({"model": "copy"}, "starting model"),
    ({"world": 2}, "world size (processes) 2 -> 1"),
])
def test_resume_guard_refuses_each_difference(tmp_path, tiny, three, finished_run, change, named):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    kw = {"max_steps": 2, "val_fraction": 0.0}
    model = str(tiny)
    if "model" in change:
        change.pop("model")
        model = str(shutil.copytree(tiny, tmp_path / "copy"))
    if "world" in change:  # as if written by 2 processes
        record = json.loads((out / "training_args.json").read_text())
        record["processes"] = change.pop("world")
        (out / "training_args.json").write_text(json.dumps(record))
    data = three
    if change.pop("data", None):
        data = _dataset(tmp_path / "other", 3, {"background": 0, "spleen": 1, "liver": 5, "kidney": 2})
    if change.pop("prompts", None):
        prompts = tmp_path / "prompts.json"
        prompts.write_text(json.dumps({"1": ["the spleen"], "5": ["the liver"]}))
        kw["prompts"] = str(prompts)
    kw.update(change)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(UsageError) as info:
        finetune(_args(data, out, **kw), model)
    message = str(info.value)
    assert "\n" not in message and named in message and "--overwrite" in message
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # nothing touched
    if named.startswith("--lr"):
        result = finetune(_args(data, out, overwrite=True, **kw), model)  # --overwrite starts over
        assert result.start_step == 0 and not result.already_done and result.steps == 2
        record = json.loads((out / "training_args.json").read_text())
        assert record["args"]["learning_rate"] == 5e-4  # what was actually used


def test_cli_refusal_exit_2_and_model_without_checkpoint(tmp_path, tiny, three, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    common = ("finetune", three, "-m", tiny, "-o", out, "--max-steps", "2", "--val-fraction", "0",
              "--freeze", "image", "--no-augment", "--save-every", "0", "--device", "cpu", "-q")
    result = _cli(*common, "--lr", "3e-4")
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.strip()] == [result.output.strip()]
    assert "--lr 0.0001 -> 0.0003" in result.output
    result = _cli(*common)
    assert result.exit_code == 0, result.output
    shutil.rmtree(out / "checkpoints")  # a model without a checkpoint to continue from
    result = _cli(*common)
    assert result.exit_code == 2 and "no checkpoint to continue from" in result.output


def test_cli_k_fold(tmp_path, tiny, three):
    out = tmp_path / "fold"
    result = _cli("finetune", three, "-m", tiny, "-o", out, "--max-steps", "1", "--fold", "2", "--folds", "3",
                  "--freeze", "image", "--no-augment", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    split = json.loads((out / "splits.json").read_text())
    assert split == make_split(["ct000", "ct001", "ct002"], fold=2, folds=3).to_dict()
    assert len(split["val"]) == 1 and list(_records(out, "val")[0]["cases"]) == split["val"]


# -- DDP details -------------------------------------------------------------------------------------------------


def test_rank_seeds_differ_and_repeat():
    assert rank_seed(42, 0) == 42  # one process: seeded exactly as before
    seeds = [rank_seed(42, r) for r in range(8)]
    assert len(set(seeds)) == 8 and seeds == [rank_seed(42, r) for r in range(8)]
    assert rank_seed(7, 1) != rank_seed(42, 1)
    draws = []
    for rank in (0, 1, 0):
        seed_process(42, rank)
        draws.append(torch.nn.functional.dropout(torch.ones(64), 0.5, training=True))
    assert not torch.equal(draws[0], draws[1])  # other dropout masks on another rank
    assert torch.equal(draws[0], draws[2])  # and the same ones again for the same rank


def test_shape_messages_name_their_axes(tmp_path, tiny):
    import SimpleITK as sitk

    from text3dsam_cli.io import read_volume
    from text3dsam_cli.training import discover_cases, load_case

    root = _dataset(tmp_path / "ds", 1)
    seg = read_volume(TOTALSEG / "example_seg.nii.gz")
    (root / "labelsTr" / "ct000.nii.gz").unlink()
    sitk.WriteImage(sitk.GetImageFromArray(seg.array[:, :, :-1].copy()), str(root / "labelsTr" / "ct000.nii.gz"))
    with pytest.raises(InputError) as info:
        load_case(discover_cases(root).cases[0])
    z, y, x = seg.shape
    assert f"{z}x{y}x{x - 1} (z, y, x) differs from the image's {z}x{y}x{x} (z, y, x)" in str(info.value)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 5, 6), np.int16)), str(flat))
    with pytest.raises(InputError, match=r"size 1x5x6 \(z, y, x\)"):  # ITK's (x, y, z) size, shown in array order
        read_volume(flat)
    good = _dataset(tmp_path / "ds_good", 1)  # (the data check at the start of train would stop at `root`)
    result = _cli("train", good, "-o", tmp_path / "o2", "--image-size", "64,64,64", "--tokenizer",
                  REFERENCE / "vocab.txt", "--device", "cpu")
    assert result.exit_code == 2 and "image size 64x64x64 (z, y, x)" in result.output


@pytest.mark.slow
def test_torchrun_world_size_guard_and_one_error_line(tmp_path, tiny, three):
    exe = shutil.which("text3dsam", path=str(Path(sys.executable).parent)) or "text3dsam"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = tmp_path / "ddp"
    common = ["finetune", str(three), "-m", str(tiny), "-o", str(out), "--max-steps", "2", "--val-fraction", "0",
              "--freeze", "image", "--save-every", "0", "--device", "cpu", "-q"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", exe]
    proc = subprocess.run(torchrun + common, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "training_args.json").read_text())
    assert record["processes"] == 2 and record["rank_seeds"] == [42, rank_seed(42, 1)]
    proc = subprocess.run([exe, *common], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "world size (processes) 2 -> 1" in proc.stderr
    proc = subprocess.run(torchrun + common + ["--lr", "2e-4"], capture_output=True, text=True, env=env,
                          timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "--lr 0.0001 -> 0.0002" in errors[0], proc.stderr[-3000:]
    assert "rank 1" not in proc.stderr
