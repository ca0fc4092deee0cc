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
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not a whole number"),
    ({"RANK": "1_0", "WORLD_SIZE": "2_0"}, r"\$RANK is '1_0', not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "+2"}, "WORLD_SIZE is '\\+2', not a whole number"),
    ({"SLURM_PROCID": " 1", "SLURM_NTASKS": "2"}, "not a whole number"),
    ({"SLURM_PROCID": "-1", "SLURM_NTASKS": "2"}, "not a whole number"),
    ({"SLURM_PROCID": "١", "SLURM_NTASKS": "2"}, "not a whole number"),  # Arabic-Indic one: int() takes it
    ({"SLURM_ARRAY_TASK_ID": "1_0", "SLURM_ARRAY_TASK_COUNT": "20"}, "not a whole number"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "out of range"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "out of range"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "5"}, "not on the range"),
    ({"SLURM_ARRAY_TASK_ID": "4"}, "SLURM_ARRAY_TASK_COUNT"),
])
def test_clear_errors(env, message):
    with pytest.raises(UsageError, match=message):
        shard_from_environment(env)


ARRAY_2 = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1", "SLURM_ARRAY_TASK_STEP": "1",
           "SLURM_ARRAY_TASK_COUNT": "2"}


def test_array_and_step_levels_compose():
    """shard = array_index x step_size + step_rank + 1 of array_count x step_size; torchrun wins the step level."""
    for step_vars in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        got = {}
        for task in (0, 1):
            for rank in (0, 1):
                env = {**ARRAY_2, "SLURM_ARRAY_TASK_ID": str(task), step_vars[0]: str(rank), step_vars[1]: "2"}
                got[(task, rank)] = shard_from_environment(env)
        assert got == {(0, 0): (1, 4), (0, 1): (2, 4), (1, 0): (3, 4), (1, 1): (4, 4)}, step_vars
    # torchrun inside srun tasks (one torchrun per node): RANK already spans the nodes, SLURM_PROCID is not added
    env = {**ARRAY_2, "SLURM_ARRAY_TASK_ID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "5",
           "WORLD_SIZE": "8"}
    assert shard_from_environment(env) == (14, 16)
    # --array=1-9:4 (tasks 1, 5, 9) x 3 srun tasks
    stepped = {"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9", "SLURM_ARRAY_TASK_STEP": "4",
               "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_NTASKS": "3"}
    shards = sorted(shard_from_environment({**stepped, "SLURM_ARRAY_TASK_ID": str(t), "SLURM_PROCID": str(r)})
                    for t in (1, 5, 9) for r in range(3))
    assert shards == [(i, 9) for i in range(1, 10)]


@pytest.mark.parametrize("array", [
    {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_STEP": "1",
     "SLURM_ARRAY_TASK_COUNT": "3"},  # --array=0,2,4 (a list: no regular step)
    {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_COUNT": "3"},
    {"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "10", "SLURM_ARRAY_TASK_STEP": "3",
     "SLURM_ARRAY_TASK_COUNT": "3"},  # 1,4,7 (and not 10): COUNT disagrees
])
def test_irregular_arrays_refuse_in_every_task(array):
    for task in (0, 1, 2, 4, 7):
        with pytest.raises(UsageError, match=r"--array=A-B\[:S\], or give --shard i/n"):
            shard_from_environment({**array, "SLURM_ARRAY_TASK_ID": str(task)})


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


def _run_workers(envs: list[dict[str, str]], inputs: Path, out: Path, checkpoint) -> list[subprocess.CompletedProcess]:
    """Run ``segment --shard auto`` once per environment, all at once (as a cluster would)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    procs = [subprocess.Popen([sys.executable, "-m", "text3dsam_cli", "segment", str(inputs), "liver", "-o", str(out),
                               "--shard", "auto", "-m", str(checkpoint), "--device", "cpu", "--mode", "whole", "-q",
                               "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, "HF_HUB_OFFLINE": "1", **env}) for env in envs]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.mark.slow
def test_two_level_launches_write_each_input_once(small_checkpoint, tmp_path):
    """5 inputs; 2 array tasks x 2 srun tasks, and 2 array tasks x 2 torchrun ranks: each input written by
    exactly one of the 4 workers (the real CLI with the launchers' variables); a list array: every task refuses."""
    from conftest import DATA

    inputs = tmp_path / "in"
    inputs.mkdir()
    ct = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
    names = [f"case{i}.nii.gz" for i in range(5)]
    for name in names:
        shutil.copy(ct, inputs / name)
    for step_vars in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        out = tmp_path / f"out-{step_vars[0]}"
        envs = [{**ARRAY_2, "SLURM_ARRAY_TASK_ID": str(task), step_vars[0]: str(rank), step_vars[1]: "2",
                 "SLURM_JOB_ID": "77"} for task in (0, 1) for rank in (0, 1)]
        results = _run_workers(envs, inputs, out, small_checkpoint)
        assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
        printed = [line.strip() for r in results for line in r.stdout.splitlines() if line.strip()]
        assert len(printed) == 5, printed  # each worker prints the outputs it wrote
        for k in range(5):  # each input once, by one worker
            assert sum(Path(p).name.startswith(f"case{k}_") or Path(p).name.startswith(f"case{k}.")
                       for p in printed) == 1, (k, printed)
        assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(Path(p).name for p in printed)
    listed = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_STEP": "1",
              "SLURM_ARRAY_TASK_COUNT": "3"}
    out = tmp_path / "out-list"
    results = _run_workers([{**listed, "SLURM_ARRAY_TASK_ID": str(t)} for t in (0, 2, 4)], inputs, out,
                           small_checkpoint)
    for result in results:
        assert result.returncode == 2, result.stderr
        assert "--array=A-B[:S], or give --shard i/n" in " ".join(result.stderr.split())
        assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())
    bad = _run_workers([{"RANK": "1_0", "WORLD_SIZE": "2_0"}], inputs, tmp_path / "out-bad", small_checkpoint)[0]
    assert bad.returncode == 2 and "$RANK is '1_0', not a whole number" in " ".join(bad.stderr.split())
