"""``text3dsam segment`` end to end: formats, exact geometry, sidecars, batches, stdin, shards, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import CHALLENGE, DATA
from typer.testing import CliRunner

from text3dsam_cli.cli import app

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
MR = DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz"
NRRD = DATA / "extra" / "pyradiomics" / "breast1_image.nrrd"
DICOM_TS = DATA / "dicom" / "totalsegmentator_ct" / "dicom"
US = CHALLENGE / "US_Cardiac_patient0027_2CH_half_sequence.npz"
MR_NPZ = CHALLENGE / "MR_BraTS-T1c_bratsgli_0017.npz"

runner = CliRunner()


def segment(*args, input: str | None = None):
    result = runner.invoke(app, ["segment", *map(str, args)], input=input)
    return result


def _geometry(path: Path):
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _assert_same_grid(a: Path, b: Path, exact: bool = True):
    ga, gb = _geometry(a), _geometry(b)
    assert ga[0] == gb[0]
    tol = 0 if exact else 1e-5
    for x, y in zip(ga[1:], gb[1:]):
        np.testing.assert_allclose(x, y, atol=tol, rtol=0)


def _library_labels(checkpoint: Path, path: Path, prompts: list[str]) -> np.ndarray:
    """The label map the library computes for ``path`` (read, prepare, segment, back to the input grid)."""
    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.io import read_volume
    from text3dsam_cli.model import load_model
    from text3dsam_cli.pipeline import prepare_scan

    scan = prepare_scan(read_volume(path))
    result = Segmenter(load_model(checkpoint), device="cpu").segment(scan.image, prompts, spacing=scan.spacing)
    return scan.to_input_grid(result.labels)


def _model_probabilities(checkpoint: Path, path: Path, prompts: list[str], points: np.ndarray) -> np.ndarray:
    """(K, len(points)) sigmoid of the model's logits, trilinearly upsampled to the input grid (align_corners
    False, as pred.py), at the given (z, y, x) voxels of an input that is not reoriented (npz)."""
    import torch
    import torch.nn.functional as F

    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.io import read_volume
    from text3dsam_cli.model import load_model
    from text3dsam_cli.pipeline import prepare_scan

    scan = prepare_scan(read_volume(path))
    segmenter = Segmenter(load_model(checkpoint), device="cpu")
    encoded = segmenter.encode(scan.image, scan.spacing)
    segmenter.segment_encoded(encoded, prompts)
    logits = torch.stack([encoded.logits[p] for p in prompts])
    full = F.interpolate(logits[None], size=scan.image.shape, mode="trilinear", align_corners=False)[0]
    z, y, x = points.T
    return torch.sigmoid(full[:, z, y, x]).numpy()


def test_nifti_in_nifti_out_exact_grid_and_sidecar(small_checkpoint, tmp_path):
    out = tmp_path / "seg.nii.gz"
    result = segment(CT, "liver", "spleen", "-m", small_checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [str(out)]
    _assert_same_grid(CT, out)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    np.testing.assert_array_equal(labels, _library_labels(small_checkpoint, CT, ["liver", "spleen"]))
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["prompts"] == {"liver": 1, "spleen": 2}
    assert sidecar["model"]["model"] == str(small_checkpoint.resolve())
    counts = {entry["label"]: entry["voxels"] for entry in sidecar["labels"]}
    assert counts == {1: int((labels == 1).sum()), 2: int((labels == 2).sum())}
    spacing = np.prod(sitk.ReadImage(str(CT)).GetSpacing())
    assert sidecar["labels"][0]["volume_ml"] == pytest.approx(counts[1] * spacing / 1000, rel=1e-3)
    assert sidecar["modality"]["modality"] == "CT" and sidecar["modality"]["window"] == "soft_tissue"
    assert sidecar["geometry"]["shape_zyx"] == list(labels.shape)
    assert {"model", "upsample", "total"} <= set(sidecar["timings_s"])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_output_formats_keep_input_grid(small_checkpoint, tmp_path, suffix):
    out = tmp_path / f"seg{suffix}"
    result = segment(NRRD, "breast lesion", "-m", small_checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    _assert_same_grid(NRRD, out, exact=suffix != ".nii")


def test_dicom_series_output_on_series_grid(small_checkpoint, tmp_path):
    result = segment(DICOM_TS, "liver", "-m", small_checkpoint, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    out = Path(result.stdout.strip())
    assert out.parent == tmp_path and out.name.endswith(".nii.gz")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DICOM_TS)))
    series = reader.Execute()
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == series.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), series.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), series.GetDirection(), atol=1e-6)
    sidecar = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["modality"]["source"] == "dicom" and sidecar["modality"]["modality"] == "CT"


def test_npz_uses_its_text_prompts_and_challenge_naming(small_checkpoint, tmp_path):
    result = segment(MR_NPZ, "-m", small_checkpoint, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / MR_NPZ.name
    assert result.stdout.strip() == str(out)
    with np.load(out) as data:
        assert data.files == ["segs"]
        segs = data["segs"]
    with np.load(MR_NPZ, allow_pickle=False) as image:
        assert segs.shape == image["imgs"].shape
    sidecar = json.loads((tmp_path / "MR_BraTS-T1c_bratsgli_0017.json").read_text())
    assert sorted(sidecar["prompts"].values()) == [1, 2, 3, 4]
    assert sidecar["modality"]["normalization"] == "none"


def test_extras_split_probabilities_preview(small_checkpoint, tmp_path):
    out = tmp_path / "ct.nii.gz"
    result = segment(CT, "liver", "spleen", "-m", small_checkpoint, "-o", out, "--split", "--probabilities",
                     "--preview")
    assert result.exit_code == 0, result.output
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    for value in (1, 2):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"ct_label{value}.nii.gz")))
        np.testing.assert_array_equal(mask, (labels == value).astype(np.uint8))
        prob = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"ct_prob{value}.nii.gz")))
        assert prob.shape == labels.shape and prob.min() >= 0 and prob.max() <= 1
    assert (tmp_path / "ct_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_npz_probabilities_are_float16(small_checkpoint, tmp_path):
    result = segment(US, "-m", small_checkpoint, "-o", tmp_path, "--probabilities")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "US_Cardiac_patient0027_2CH_half_sequence_probabilities.npz") as data:
        probabilities = data["probabilities"]
    assert probabilities.dtype == np.float16 and probabilities.shape[0] == 3
    points = np.random.default_rng(0).integers(0, probabilities.shape[1:], size=(200, 3))
    from text3dsam_cli.io import read_volume
    from text3dsam_cli.prompts import prompts_for

    prompts, _, _ = prompts_for(read_volume(US), [])
    expected = _model_probabilities(small_checkpoint, US, prompts, points)
    written = probabilities[:, points[:, 0], points[:, 1], points[:, 2]].astype(np.float32)
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-3)  # float16 of a probability: < 5e-4 off
    assert np.ptp(expected) > 0.05  # the sampled probabilities vary: the comparison can tell maps apart


def _corrupt_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(CT, folder / "a_ct.nii.gz")
    shutil.copy(MR, folder / "c_mr.nii.gz")
    data = CT.read_bytes()
    (folder / "b_broken.nii.gz").write_bytes(data[: len(data) // 3])
    return folder


def test_folder_with_corrupt_member_processes_the_rest(small_checkpoint, tmp_path):
    folder = _corrupt_folder(tmp_path)
    out = tmp_path / "out"
    result = segment(folder, "liver", "-m", small_checkpoint, "-o", out)
    assert result.exit_code == 1
    assert sorted(result.stdout.split()) == [str(out / "a_ct.nii.gz"), str(out / "c_mr.nii.gz")]
    assert "b_broken.nii.gz" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a_ct.json", "a_ct.nii.gz", "c_mr.json", "c_mr.nii.gz"]
    assert "1 failed" in result.stderr


@pytest.mark.parametrize("behind", ["1", "0"])
def test_folder_with_corrupt_member_written_behind(small_checkpoint, tmp_path, monkeypatch, behind):
    """TEXT3DSAM_WRITE_BEHIND through the command: the same outputs, stdout paths and --json summary in input
    order whether each input's outputs are written behind the next one or in turn."""
    monkeypatch.setenv("TEXT3DSAM_WRITE_BEHIND", behind)
    folder = _corrupt_folder(tmp_path)
    out = tmp_path / "out"
    result = segment(folder, "liver", "-m", small_checkpoint, "-o", out, "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert [Path(o["input"]).name for o in summary["results"]] == ["a_ct.nii.gz", "b_broken.nii.gz", "c_mr.nii.gz"]
    assert [o["status"] for o in summary["results"]] == ["ok", "failed", "ok"]
    assert sorted(p.name for p in out.iterdir()) == ["a_ct.json", "a_ct.nii.gz", "c_mr.json", "c_mr.nii.gz"]
    monkeypatch.setenv("TEXT3DSAM_WRITE_BEHIND", "maybe")
    bad = segment(folder, "liver", "-m", tmp_path / "no-model", "-o", tmp_path / "other")  # before loading it
    assert bad.exit_code == 2 and "TEXT3DSAM_WRITE_BEHIND" in bad.stderr and "Traceback" not in bad.output


def test_stdin_list_shards_and_skip_existing(small_checkpoint, tmp_path):
    folder = _corrupt_folder(tmp_path)
    (folder / "b_broken.nii.gz").unlink()
    listing = f"{folder / 'a_ct.nii.gz'}\n\n{folder / 'c_mr.nii.gz'}\n"
    outputs = []
    for shard in ("1/2", "2/2"):
        result = segment("-", "liver", "-m", small_checkpoint, "-o", tmp_path / "out", "--shard", shard,
                         input=listing)
        assert result.exit_code == 0, result.output
        outputs += result.stdout.split()
    assert sorted(outputs) == [str(tmp_path / "out" / "a_ct.nii.gz"), str(tmp_path / "out" / "c_mr.nii.gz")]
    again = segment("-", "liver", "-m", small_checkpoint, "-o", tmp_path / "out", "--skip-existing", "--json",
                    input=listing)
    assert again.exit_code == 0
    summary = json.loads(again.stdout)
    assert summary["skipped"] == 2 and summary["succeeded"] == 0


def _bad_file(folder: Path, name: str, content: bytes | None) -> Path:
    path = folder / name
    if content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content", [
    ("missing.nii.gz", None), ("empty.nii.gz", b""), ("text.nii.gz", b"hello"), ("noise.mha", b"\x00" * 64),
])
def test_bad_input_one_line_error_no_output(small_checkpoint, tmp_path, name, content):
    path = _bad_file(tmp_path, name, content)
    message = name
    out = tmp_path / "out" / "seg.nii.gz"
    result = segment(path, "liver", "-m", small_checkpoint, "-o", out)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()
    leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == []


def _write_npz(path: Path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_without_imgs_and_nan_volume(small_checkpoint, tmp_path):
    bad = _write_npz(tmp_path / "noimgs.npz", gts=np.zeros((4, 4, 4), np.uint8))
    result = segment(bad, "liver", "-m", small_checkpoint, "-o", tmp_path / "o1")
    assert result.exit_code == 1 and "noimgs.npz" in result.stderr and "imgs" in result.stderr
    nan = np.full((8, 16, 16), np.nan, np.float32)
    image = sitk.GetImageFromArray(nan)
    sitk.WriteImage(image, str(tmp_path / "nan.nii.gz"))
    result = segment(tmp_path / "nan.nii.gz", "liver", "-m", small_checkpoint, "-o", tmp_path / "o2")
    assert result.exit_code == 1 and "nan.nii.gz" in result.stderr and "Traceback" not in result.output


def test_hostile_pickle_is_refused_and_not_executed(small_checkpoint, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.npz"
    np.savez(path, imgs=np.zeros((8, 16, 16), np.uint8), text_prompts=np.array(Evil(), dtype=object))
    result = segment(path, "-m", small_checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "evil.npz" in result.stderr
    assert not marker.exists()


def test_two_dimensional_image_refused(small_checkpoint, tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(tmp_path / "flat.nii.gz"))
    result = segment(tmp_path / "flat.nii.gz", "liver", "-m", small_checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 1 and "flat.nii.gz" in result.stderr


def test_usage_errors_exit_2(small_checkpoint, tmp_path):
    assert segment(CT, "", "-m", small_checkpoint).exit_code == 2
    assert segment(CT, "liver", "-m", small_checkpoint, "--shard", "5/4").exit_code == 2
    assert segment(CT, "liver", "-m", small_checkpoint, "--device", "cuda:7").exit_code == 2
    folder = _corrupt_folder(tmp_path)
    result = segment(folder, "liver", "-m", small_checkpoint, "-o", tmp_path / "one.nii.gz")
    assert result.exit_code == 2 and "folder" in result.stderr


def test_unwritable_output_reports_and_leaves_nothing(small_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = segment(CT, "liver", "-m", small_checkpoint, "-o", blocker / "seg.nii.gz")
    assert result.exit_code == 2 and "Traceback" not in result.output  # refused before the model loads


def test_no_prompts_for_plain_image(small_checkpoint, tmp_path):
    result = segment(CT, "-m", small_checkpoint, "-o", tmp_path / "x.nii.gz")
    assert result.exit_code == 1 and "no prompts" in result.stderr


def _fake_hub_cache(home: Path, checkpoint: Path) -> None:
    repo = home / "hub" / "models--MagicXin--Text3DSAM"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)


def test_offline_default_model_from_hf_cache_real_cli(small_checkpoint, tmp_path):
    """The acceptance check: a hand-built HF cache, HF_HUB_OFFLINE=1, no --model, the real console script."""
    _fake_hub_cache(tmp_path / "hf", small_checkpoint)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("TEXT3DSAM_MODEL", None)
    shutil.copy(CT, tmp_path / "CT.nii.gz")
    proc = subprocess.run([sys.executable, "-m", "text3dsam_cli", "segment", "CT.nii.gz", "liver", "-o",
                           "out.nii.gz"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "out.nii.gz"
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["model"]["model"] == "MagicXin/Text3DSAM"
    assert sidecar["model"]["commit"] == "0123456789abcdef0123456789abcdef01234567"


def test_offline_without_cache_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "nothing"), "HF_HUB_OFFLINE": "1"}
    env.pop("TEXT3DSAM_MODEL", None)
    proc = subprocess.run([sys.executable, "-m", "text3dsam_cli", "segment", str(CT), "liver", "-o",
                           str(tmp_path / "o.nii.gz")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "MagicXin/Text3DSAM" in lines[0] and "text3dsam download" in lines[0]
    assert not (tmp_path / "o.nii.gz").exists()


def test_debug_flag_shows_traceback(small_checkpoint, tmp_path):
    result = runner.invoke(app, ["--debug", "segment", str(tmp_path / "nope.nii.gz"), "liver", "-m",
                                 str(small_checkpoint)])
    assert result.exit_code == 1 and "nope.nii.gz" in result.stderr


def test_zip_that_is_not_npz(small_checkpoint, tmp_path):
    path = tmp_path / "fake.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "not an array")
    result = segment(path, "liver", "-m", small_checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "fake.npz" in result.stderr


def test_dicom_seg_output_for_dicom_series(small_checkpoint, tmp_path):
    import highdicom as hd

    series = DATA / "extra" / "dcmqi" / "ct-3slice"
    result = segment(series, "liver", "spleen", "-m", small_checkpoint, "-o", tmp_path, "--dicom-seg")
    assert result.exit_code == 0, result.output
    seg = hd.seg.segread(str(tmp_path / "ct-3slice.seg.dcm"))
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["liver", "spleen"]
    sidecar = json.loads((tmp_path / "ct-3slice.json").read_text())
    assert sidecar["outputs"]["dicom_seg"].endswith("ct-3slice.seg.dcm")


def test_dicom_seg_refusal_leaves_no_outputs(small_checkpoint, tmp_path):
    """The TotalSegmentator series has empty Study/Series UIDs: refused before anything is written."""
    result = segment(DICOM_TS, "liver", "-m", small_checkpoint, "-o", tmp_path / "out", "--dicom-seg")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    result = segment(CT, "liver", "-m", small_checkpoint, "-o", tmp_path / "o2", "--dicom-seg")
    assert result.exit_code == 1 and "DICOM" in result.stderr


def test_second_input_path_is_not_taken_for_a_prompt(small_checkpoint, tmp_path):
    """`segment a.nii.gz b.nii.gz liver` (a shell glob) must not segment a with the prompt 'b.nii.gz'."""
    result = segment(CT, MR, "liver", "-m", small_checkpoint, "-o", tmp_path)
    assert result.exit_code == 2 and "existing path" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_prompt_file_json_sets_label_values(small_checkpoint, tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"5": "liver", "12": ["spleen", "the spleen"]}))
    out = tmp_path / "seg.nii.gz"
    result = segment(CT, "--prompt-file", tmp_path / "labels.json", "-m", small_checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["prompts"] == {"liver": 5, "spleen": 12}
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))) <= {0, 5, 12}


def test_prompt_file_text_and_errors(small_checkpoint, tmp_path):
    (tmp_path / "p.txt").write_text("# organs\nliver\n\nspleen\n")
    result = segment(CT, "--prompt-file", tmp_path / "p.txt", "-m", small_checkpoint, "-o", tmp_path / "a.nii.gz")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a.json").read_text())["prompts"] == {"liver": 1, "spleen": 2}
    (tmp_path / "bad.json").write_text('{"x": "liver"}')
    result = segment(CT, "--prompt-file", tmp_path / "bad.json", "-m", small_checkpoint, "-o", tmp_path / "b")
    assert result.exit_code == 1 and "bad.json" in result.stderr
    result = segment(CT, "liver", "--prompt-file", tmp_path / "p.txt", "-m", small_checkpoint)
    assert result.exit_code == 2


def test_console_entry_point_flushes_and_keeps_the_exit_status(tmp_path):
    """`main()` ends the process without interpreter teardown: output must still arrive, statuses unchanged."""
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "text3dsam_cli", *args], capture_output=True, text=True,
                              timeout=120)

    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("text3dsam ")
    missing = run("segment", str(tmp_path / "none.nii.gz"), "liver", "-o", str(tmp_path / "x.nii.gz"))
    assert missing.returncode == 1 and "none.nii.gz" in missing.stderr
    usage = run("segment", "--no-such-option")
    assert usage.returncode == 2 and "no-such-option" in usage.stderr.lower()
    listing = run("prompts", "liver", "--json")
    assert listing.returncode == 0 and listing.stdout.rstrip().endswith(("]", "}"))


def test_an_early_read_is_used_for_its_input_and_dropped_for_a_refused_one(small_model, tmp_path):
    """`segment` starts reading its first input before importing torch; the run takes that future (its volume is
    what gets segmented) and lets go of it when the input fails its checks, so the volume is not kept."""
    from concurrent.futures import Future

    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.io import expand_inputs, read_volume
    from text3dsam_cli.pipeline import SegmentOptions, SegmentRun

    volume = read_volume(CT)
    flipped = volume.with_array(np.ascontiguousarray(volume.array[:, ::-1]))  # not what the file holds
    segmenter = Segmenter(small_model, device="cpu")
    items = expand_inputs([str(CT)])

    def run(out: Path, **options) -> tuple[dict, list]:
        future: Future = Future()
        future.set_result(flipped)
        early = {0: future}
        summary = SegmentRun(segmenter, ["liver"], SegmentOptions(output=str(out), **options)).run(items, early)
        return early, summary.outcomes

    early, outcomes = run(tmp_path / "a.nii.gz")
    assert early == {} and outcomes[0].status == "ok"
    plain = SegmentRun(segmenter, ["liver"], SegmentOptions(output=str(tmp_path / "b.nii.gz"))).run(items)
    assert plain.outcomes[0].status == "ok"
    got = read_volume(tmp_path / "a.nii.gz").array
    want = read_volume(tmp_path / "b.nii.gz").array
    assert not np.array_equal(got, want)  # the early (flipped) volume was segmented, not a fresh read
    (tmp_path / "c.json").mkdir()  # the sidecar's name is taken by a folder: the input is refused
    early, outcomes = run(tmp_path / "c.nii.gz")
    assert early == {} and outcomes[0].status == "failed"
