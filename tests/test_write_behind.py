"""Write-behind in folder runs: an input's outputs are written while the next input is segmented, with the same
files, outcomes and events (in input order) as writing in turn, and nothing half-written when a write fails."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CHALLENGE, DATA

from text3dsam_cli import pipeline
from text3dsam_cli.errors import OutputError, UsageError
from text3dsam_cli.inference import Segmenter
from text3dsam_cli.io import expand_inputs, read_volume
from text3dsam_cli.pipeline import SegmentOptions, SegmentRun, wants_write_behind

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
MR = DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz"
NPZ = CHALLENGE / "MR_BraTS-T1c_bratsgli_0017.npz"


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, source in enumerate((CT, MR, CT)):
        shutil.copyfile(source, folder / f"scan{i}.nii.gz")  # copies: a folder run reads one file once
    return folder


def _run(segmenter: Segmenter, folder: Path, out: Path, write_behind: bool, **options):
    events: list[tuple[str, str]] = []

    def on_event(kind, data):
        events.append((kind, data["outcome"].input if kind == "done" else data["input"]))

    run = SegmentRun(segmenter, ["liver", "spleen"], SegmentOptions(output=str(out), modality="CT", **options),
                     on_event, write_behind=write_behind)
    assert run.write_behind is write_behind
    return run.run(expand_inputs([str(folder)])), events


def test_same_outputs_and_events_as_writing_in_turn(small_model, inputs, tmp_path):
    segmenter = Segmenter(small_model, device="cpu")
    turn, turn_events = _run(segmenter, inputs, tmp_path / "turn", False)
    behind, behind_events = _run(segmenter, inputs, tmp_path / "behind", True)
    assert [o.status for o in behind.outcomes] == ["ok"] * 3
    assert [o.input for o in behind.outcomes] == [o.input for o in turn.outcomes]
    for a, b in zip(turn.outcomes, behind.outcomes):
        assert [Path(p).name for p in a.outputs] == [Path(p).name for p in b.outputs]
        np.testing.assert_array_equal(read_volume(Path(a.outputs[0])).array, read_volume(Path(b.outputs[0])).array)
        assert a.sidecar["labels"] == b.sidecar["labels"]
        assert b.seconds > 0
    done = [name for kind, name in behind_events if kind == "done"]
    assert done == [o.input for o in turn.outcomes]  # in input order, from the calling thread
    assert [k for k, _ in turn_events] == ["start", "done"] * 3
    # with write-behind the next input starts before the previous one is reported done
    assert [k for k, _ in behind_events] == ["start", "start", "done", "start", "done", "done"]
    assert not list((tmp_path / "behind").glob("*.tmp*")) and not list((tmp_path / "behind").glob(".*"))


def test_writing_overlaps_the_next_inputs_segmentation(small_model, inputs, tmp_path, monkeypatch):
    """The first input's writing waits until the second input is being segmented: it only finishes when the
    two overlap (writing in turn would wait in vain and fail the run)."""
    segmenting_second = threading.Event()
    calls = {"segment": 0}
    real_segment, real_write = pipeline.segment_volume, pipeline.write_outputs

    def segment(*args, **kwargs):
        calls["segment"] += 1
        if calls["segment"] == 2:
            segmenting_second.set()
        return real_segment(*args, **kwargs)

    def write(item, *args, **kwargs):
        if item.path.name == "scan0.nii.gz" and not segmenting_second.wait(60):
            raise OutputError("written in turn, not behind", item.path)
        return real_write(item, *args, **kwargs)

    monkeypatch.setattr(pipeline, "segment_volume", segment)
    monkeypatch.setattr(pipeline, "write_outputs", write)
    summary, _ = _run(Segmenter(small_model, device="cpu"), inputs, tmp_path / "out", True)
    assert [o.status for o in summary.outcomes] == ["ok"] * 3
    assert threading.current_thread() is threading.main_thread()


def test_a_failed_write_fails_that_input_only_and_leaves_nothing(small_model, inputs, tmp_path, monkeypatch):
    real = pipeline._write_files

    def failing(volume, result, plan, written, created, *args, **kwargs):
        real(volume, result, plan, written, created, *args, **kwargs)  # the label map is written...
        if plan.labels.name.startswith("scan1"):
            raise OutputError("disk full (simulated)", plan.labels)  # ...then the write fails

    monkeypatch.setattr(pipeline, "_write_files", failing)
    out = tmp_path / "out"
    summary, events = _run(Segmenter(small_model, device="cpu"), inputs, out, True)
    assert [o.status for o in summary.outcomes] == ["ok", "failed", "ok"]
    assert "disk full (simulated)" in summary.outcomes[1].error
    assert not [p.name for p in out.iterdir() if p.name.startswith("scan1")]  # nothing of the failed attempt
    assert [name for kind, name in events if kind == "done"] == [o.input for o in summary.outcomes]


def test_an_interrupt_lets_the_pending_write_finish(small_model, inputs, tmp_path, monkeypatch):
    """Ctrl-C while the second input is segmented: the first input's outputs, being written, are completed
    (atomic files, no in-progress marker) and the interrupt ends the run."""
    real_segment, real_write = pipeline.segment_volume, pipeline.write_outputs
    calls = {"segment": 0}

    def write(*args, **kwargs):
        time.sleep(0.3)  # still writing when the interrupt comes
        return real_write(*args, **kwargs)

    def segment(*args, **kwargs):
        calls["segment"] += 1
        if calls["segment"] == 2:
            raise KeyboardInterrupt
        return real_segment(*args, **kwargs)

    monkeypatch.setattr(pipeline, "segment_volume", segment)
    monkeypatch.setattr(pipeline, "write_outputs", write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(Segmenter(small_model, device="cpu"), inputs, out, True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scan0.json", "scan0.nii.gz"], names
    assert read_volume(out / "scan0.nii.gz").array.shape == read_volume(CT).array.shape


def test_the_policy(small_model, monkeypatch):
    cpu = Segmenter(small_model, device="cpu")
    monkeypatch.delenv(pipeline.WRITE_BEHIND_ENV, raising=False)
    assert wants_write_behind(cpu) is False  # the model uses every core on the CPU (docs/performance.md)
    assert wants_write_behind(cpu, True) is True

    class OnGpu:
        device = type("device", (), {"type": "cuda"})()

    assert wants_write_behind(OnGpu()) is True  # type: ignore[arg-type]
    assert wants_write_behind(OnGpu(), False) is False  # type: ignore[arg-type]
    monkeypatch.setenv(pipeline.WRITE_BEHIND_ENV, "1")
    assert wants_write_behind(cpu) is True
    monkeypatch.setenv(pipeline.WRITE_BEHIND_ENV, "off")
    assert wants_write_behind(OnGpu()) is False  # type: ignore[arg-type]
    monkeypatch.setenv(pipeline.WRITE_BEHIND_ENV, "sometimes")
    with pytest.raises(UsageError, match="TEXT3DSAM_WRITE_BEHIND"):
        wants_write_behind(cpu)


def test_npz_inputs_with_their_own_prompts(small_model, tmp_path):
    """Label values known only after segmentation (an npz's own prompts) are claimed before writing behind."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        shutil.copyfile(NPZ, folder / f"case{i}.npz")
    run = SegmentRun(Segmenter(small_model, device="cpu"), [], SegmentOptions(output=str(tmp_path / "out")),
                     write_behind=True)
    summary = run.run(expand_inputs([str(folder)]))
    assert [o.status for o in summary.outcomes] == ["ok", "ok"]
    assert all(Path(p).exists() for o in summary.outcomes for p in o.outputs)
