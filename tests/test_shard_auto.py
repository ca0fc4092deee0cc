"""``--shard auto``: the shard from torchrun or SLURM variables; every input exactly once across workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHALLENGE

from text3dsam_cli.errors import UsageError
from text3dsam_cli.io.inputs import InputItem, select_shard, shard_from_environment


def _items(n: int) -> list[InputItem]:
    return [InputItem(Path(f"/data/case{i:03d}.nii.gz"), "nifti", f"case{i:03d}") for i in range(n)]


def test_torchrun_variables():
    assert shard_from_environment({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == (1, 4)
    assert shard_from_environment({"RANK": "3", "WORLD_SIZE": "4"}) == (4, 4)


def test_slurm_array_variables():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "31",
           "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "16"}
    assert shard_from_environment(env) == (4, 16)
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)
    no_count = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "9"}
    assert shard_from_environment(no_count) == (6, 10)


def test_srun_task_variables():
    assert shard_from_environment({"SLURM_PROCID": "2", "SLURM_NTASKS": "8"}) == (3, 8)


@pytest.mark.parametrize("env, message", [
    ({}, "needs a launcher"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not a number"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "out of range"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "5"}, "not on the range"),
    ({"SLURM_ARRAY_TASK_ID": "4"}, "SLURM_ARRAY_TASK_COUNT"),
])
def test_clear_errors(env, message):
    with pytest.raises(UsageError, match=message):
        shard_from_environment(env)


def test_auto_shards_cover_every_input_once():
    items = _items(11)
    seen = []
    for task in (1, 4, 7, 10):  # --array=1-10:3
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "3",
               "SLURM_ARRAY_TASK_COUNT": "4"}
        seen += [i.path for i in select_shard(items, "auto", env)]
    assert sorted(seen) == sorted(i.path for i in items)


def test_device_auto_takes_local_rank(monkeypatch):
    import torch

    from text3dsam_cli.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.slow
def test_torchrun_two_workers_cover_every_input(small_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("MR_BraTS-T1c_bratsgli_0017.npz", "US_Cardiac_patient0027_2CH_half_sequence.npz"):
        shutil.copy(CHALLENGE / name, inputs / name)
        shutil.copy(CHALLENGE / name, inputs / f"copy_{name}")
    exe = shutil.which("text3dsam", path=str(Path(sys.executable).parent)) or "text3dsam"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "0", exe, "segment", str(inputs), "-o", str(out), "--shard", "auto",
                           "-m", str(small_checkpoint), "--device", "auto", "-q"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = sorted(line for line in proc.stdout.splitlines() if line.strip())
    assert sorted(p.name for p in out.glob("*.npz")) == sorted(p.name for p in inputs.glob("*.npz"))
    assert len(printed) == 4 and len(set(printed)) == 4  # each output written by exactly one worker
