"""Nothing lost, nothing corrupt (issue 12): full disks, interrupted runs, collisions, odd names, memory bombs.

Real data from ../shared/data throughout; the full disk is a real 200 KB tmpfs where the test may mount one,
and always a file-size limit (RLIMIT_FSIZE) in a subprocess; interruption is a real SIGKILL / SIGTERM.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import CHALLENGE, DATA
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.errors import InputError, OutputError
from text3dsam_cli.io import expand_inputs, read_volume, write_volume
from text3dsam_cli.io.atomic import atomic_path, clean_stale_temps, temp_name
from text3dsam_cli.pipeline import label_counts

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
MR = DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz"
NRRD = DATA / "extra" / "pyradiomics" / "breast1_image.nrrd"
BRAIN1 = DATA / "extra" / "pyradiomics" / "brain1_label.nrrd"
BRAIN2 = DATA / "extra" / "pyradiomics" / "brain2_label.nrrd"
SIEMENS = DATA / "dicom" / "dicom2nifti" / "siemens_anatomical_001" / "dicom"
MR_NPZ = CHALLENGE / "MR_BraTS-T1c_bratsgli_0017.npz"

runner = CliRunner()


def segment(*args, input: str | None = None):
    return runner.invoke(app, ["segment", *map(str, args)], input=input)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".tmp-*"))


def _skipped(stderr: str) -> bool:
    return any(line.startswith("skipped") for line in stderr.splitlines())


def _cli(*args: object, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "text3dsam_cli", "segment", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _assert_complete(out: Path, stems: list[str], extras: list[str]) -> None:
    """Each stem has its sidecar, and every file it lists exists and reads back."""
    for stem in stems:
        sidecar = json.loads((out / f"{stem}.json").read_text())
        listed = [Path(p).name for p in sidecar["outputs"].values()]
        assert sorted(listed) == sorted([f"{stem}.nii.gz", *(f"{stem}{e}" for e in extras)])
        for name in listed:
            assert sitk.ReadImage(str(out / name)).GetSize()
    assert _temps(out) == []
    assert not [p for p in out.iterdir() if p.name.endswith(".text3dsam-partial")]


@pytest.fixture
def two_inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT, folder / "ct.nii.gz")
    shutil.copy(MR, folder / "mr.nii.gz")
    return folder


# ----------------------------------------------------------------------------------------- 1. full disk


def test_truncating_writer_never_reaches_the_final_name(tmp_path, monkeypatch):
    """Fault injection: an ITK write that silently stops half-way (what a full disk does) is detected."""
    volume = read_volume(CT)
    real = sitk.ImageFileWriter.Execute

    def truncating(self, image):
        real(self, image)
        name = self.GetFileName()
        with open(name, "r+b") as fp:
            fp.truncate(os.path.getsize(name) // 2)

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", truncating)
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        target = tmp_path / f"seg{suffix}"
        with pytest.raises(OutputError, match="write failed"):
            write_volume(volume, target)
        assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_run_then_rerun_redoes_it(small_checkpoint, two_inputs, tmp_path):
    """Fault injection without mount: RLIMIT_FSIZE makes every large write fail, like a full disk."""
    out = tmp_path / "out"
    proc = _cli(two_inputs, "liver", "spleen", "--probabilities", "-m", small_checkpoint, "-o", out,
                preexec_fn=_limit_file_size(60_000))
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=600))
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "ct.nii.gz" in errors[0] and "mr.nii.gz" in errors[1], stderr
    assert "NWAD" not in stderr and "Traceback" not in stderr and stdout == ""
    assert [p.name for p in out.iterdir()] == [] if out.exists() else True  # nothing half-done stays
    proc = _cli(two_inputs, "liver", "spleen", "--probabilities", "-m", small_checkpoint, "-o", out,
                "--skip-existing")
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=600))
    assert proc.returncode == 0, stderr
    assert len(stdout.splitlines()) == 2
    _assert_complete(out, ["ct", "mr"], ["_prob1.nii.gz", "_prob2.nii.gz"])


@pytest.mark.slow
def test_full_tmpfs_then_space_freed(small_checkpoint, two_inputs, tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the RLIMIT_FSIZE test covers "
                    "the same guarantee")
    try:
        out = mnt / "out"
        proc = _cli(two_inputs, "liver", "spleen", "--probabilities", "-m", small_checkpoint, "-o", out)
        stdout, stderr = (s.decode() for s in proc.communicate(timeout=600))
        assert proc.returncode == 1
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 2 and all("no space left on device" in e for e in errors), stderr
        assert "NWAD" not in stderr and "ERROR" not in stderr and stdout == ""
        assert list(out.iterdir()) == []
        subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)
        proc = _cli(two_inputs, "liver", "spleen", "--probabilities", "-m", small_checkpoint, "-o", out,
                    "--skip-existing")
        stdout, stderr = (s.decode() for s in proc.communicate(timeout=600))
        assert proc.returncode == 0, stderr
        _assert_complete(out, ["ct", "mr"], ["_prob1.nii.gz", "_prob2.nii.gz"])
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------------ 2. interruption


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_is_redone_by_skip_existing(small_checkpoint, two_inputs, tmp_path, sig):
    # The run pauses (a test hook, io/atomic.py) as it starts writing the first input's first probability map:
    # the label map is complete, the other probability maps and the sidecar are not written. The signal lands
    # there, whatever the machine's load.
    prompts = ["liver", "spleen", "aorta", "stomach"]
    out = tmp_path / "out"
    paused = tmp_path / "paused"
    env = {**os.environ, "TEXT3DSAM_TEST_PAUSE_BEFORE": str(out / "ct_prob1.nii.gz"),
           "TEXT3DSAM_TEST_PAUSED": str(paused)}
    proc = _cli(two_inputs, *prompts, "--probabilities", "-m", small_checkpoint, "-o", out, env=env)
    _wait_for(paused, proc)
    assert (out / "ct.nii.gz").exists() and not (out / "ct_prob1.nii.gz").exists()
    assert not (out / "ct.json").exists()
    proc.send_signal(sig)
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=120))
    assert not (out / "ct.json").exists() and not (out / "mr.nii.gz").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr
        assert stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM)"
        assert _temps(out) == []
    else:
        assert proc.returncode == -signal.SIGKILL
    proc = _cli(two_inputs, *prompts, "--probabilities", "-m", small_checkpoint, "-o", out, "--skip-existing")
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=600))
    assert proc.returncode == 0, stderr
    assert not _skipped(stderr)
    assert sorted(stdout.split()) == [str(out / "ct.nii.gz"), str(out / "mr.nii.gz")]
    _assert_complete(out, ["ct", "mr"], [f"_prob{i}.nii.gz" for i in range(1, len(prompts) + 1)])


def test_interrupt_right_after_a_rename_leaves_nothing_unowned(small_checkpoint, tmp_path, monkeypatch):
    """Ctrl-C/SIGTERM landing between a file's rename and its bookkeeping: the file is still removed."""
    import text3dsam_cli.pipeline as pipeline

    real = pipeline.write_volume

    def interrupted(volume, path, *args, **kwargs):
        real(volume, path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_volume", interrupted)
    out = tmp_path / "out"
    result = segment(CT, "liver", "-m", small_checkpoint, "-o", out)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == []
    monkeypatch.setattr(pipeline, "write_volume", real)
    result = segment(CT, "liver", "-m", small_checkpoint, "-o", out, "--skip-existing")
    assert result.exit_code == 0, result.output


def test_stale_temp_files_are_cleaned_and_done_means_complete(small_checkpoint, two_inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / temp_name("ct_prob1.nii.gz")
    stale.write_bytes(b"half")
    foreign_temp = out / ".tmp-0123abcd-notes.txt"
    foreign_temp.write_text("not ours")
    result = segment(two_inputs / "ct.nii.gz", "liver", "-m", small_checkpoint, "-o", out, "--probabilities")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and foreign_temp.exists()
    # a missing probability map: not done, redone by --skip-existing
    (out / "ct_prob1.nii.gz").unlink()
    result = segment(two_inputs / "ct.nii.gz", "liver", "-m", small_checkpoint, "-o", out, "--probabilities",
                     "--skip-existing")
    assert result.exit_code == 0 and not _skipped(result.stderr)
    assert (out / "ct_prob1.nii.gz").exists()
    # complete: skipped; asking for more outputs (--split) than were written: not done
    result = segment(two_inputs / "ct.nii.gz", "liver", "-m", small_checkpoint, "-o", out, "--probabilities",
                     "--skip-existing")
    assert _skipped(result.stderr)
    result = segment(two_inputs / "ct.nii.gz", "liver", "-m", small_checkpoint, "-o", out, "--split",
                     "--skip-existing")
    assert result.exit_code == 0 and (out / "ct_label1.nii.gz").exists()


# ------------------------------------------------------------------------------------- 3. collisions


def test_collision_rule(small_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT, folder / "a.nii.gz")
    shutil.copy(CT, folder / "a_label1.nii.gz")
    out = tmp_path / "out"
    result = segment(folder, "liver", "--split", "-m", small_checkpoint, "-o", out)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a_label1.nii.gz" in errors[0] and "collision rule" in errors[0]
    assert json.loads((out / "a.json").read_text())["input"].endswith("a.nii.gz")
    assert not (out / "a_label1.json").exists()
    # a rerun into the same folder overwrites its own outputs
    result = segment(folder / "a.nii.gz", "liver", "--split", "-m", small_checkpoint, "-o", out)
    assert result.exit_code == 0, result.output

    # BIDS: segmenting into the input's own folder must not replace sub-01_T1w.json
    bids = tmp_path / "bids"
    bids.mkdir()
    shutil.copy(MR, bids / "sub-01_T1w.nii.gz")
    (bids / "sub-01_T1w.json").write_text('{"RepetitionTime": 2.3}')
    result = segment(bids / "sub-01_T1w.nii.gz", "brain", "-m", small_checkpoint, "-o", bids, "--format", "nrrd")
    assert result.exit_code == 1 and "sub-01_T1w.json exists and was not written by text3dsam" in result.stderr
    assert (bids / "sub-01_T1w.json").read_text() == '{"RepetitionTime": 2.3}'
    assert not (bids / "sub-01_T1w.nrrd").exists()

    # the prompt file is not overwritten by the sidecar
    (tmp_path / "scan.json").write_text(json.dumps({"1": "liver"}))
    result = segment(CT, "--prompt-file", tmp_path / "scan.json", "-m", small_checkpoint, "-o",
                     tmp_path / "scan.nrrd")
    assert result.exit_code == 1 and "refusing to overwrite" in result.stderr
    assert json.loads((tmp_path / "scan.json").read_text()) == {"1": "liver"}


# ------------------------------------------------------------------------- 5. sheared geometry, 6. DICOM


def test_sheared_direction_refused_for_nifti_kept_by_nrrd(small_checkpoint, tmp_path):
    image = sitk.ReadImage(str(NRRD))
    image.SetDirection((1, 0.3, 0, 0, 1, 0, 0, 0, 1))
    sheared = tmp_path / "sheared.mha"
    sitk.WriteImage(image, str(sheared))
    result = segment(sheared, "lesion", "-m", small_checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "not orthogonal" in result.stderr and "--format nrrd" in result.stderr
    assert not (tmp_path / "out" / "sheared.nii.gz").exists()
    result = segment(sheared, "lesion", "-m", small_checkpoint, "-o", tmp_path / "out", "--format", "nrrd")
    assert result.exit_code == 0, result.output
    def index_to_physical(direction, spacing):
        return np.asarray(direction).reshape(3, 3) @ np.diag(spacing)

    source = sitk.ReadImage(str(sheared))
    assert abs(source.GetDirection()[1]) > 0.1  # still sheared after the round trip through MetaImage
    written = sitk.ReadImage(str(tmp_path / "out" / "sheared.nrrd"))
    # NRRD stores direction x spacing ("space directions"): the same voxel positions, exactly
    np.testing.assert_allclose(index_to_physical(written.GetDirection(), written.GetSpacing()),
                               index_to_physical(source.GetDirection(), source.GetSpacing()), atol=1e-9)
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-9)
    geometry = json.loads((tmp_path / "out" / "sheared.json").read_text())["geometry"]
    np.testing.assert_allclose(index_to_physical(geometry["direction"], geometry["spacing_xyz"]),
                               index_to_physical(source.GetDirection(), source.GetSpacing()), atol=1e-9)


def test_dicom_slice_without_pixel_data_or_missing_is_refused(tmp_path):
    series = tmp_path / "series"
    shutil.copytree(SIEMENS, series)
    files = sorted(series.iterdir())
    assert read_volume(series).shape[0] == len(files)
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    with pytest.raises(InputError, match="has no pixel data") as err:
        read_volume(series)
    assert files[1].name in str(err.value)
    files[1].unlink()
    with pytest.raises(InputError, match="not evenly spaced"):
        read_volume(series)


# -------------------------------------------------------------------------- 7. names, 8. symlink loops


def test_non_utf8_names_read_write_and_cli(small_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = os.fsdecode(b"scan_\xff.nii.gz")
    shutil.copy(CT, folder / bad)
    shutil.copy(MR, folder / "good.nii.gz")
    volume = read_volume(folder / bad)
    write_volume(volume, tmp_path / os.fsdecode(b"w_\xfe") / bad)
    assert read_volume(tmp_path / os.fsdecode(b"w_\xfe") / bad).shape == volume.shape
    out_dir = tmp_path / os.fsdecode(b"out_\xfe")
    proc = _cli(folder, "liver", "-m", small_checkpoint, "-o", out_dir)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()
    assert sorted(stdout.splitlines()) == sorted([os.fsencode(out_dir / bad), os.fsencode(out_dir / "good.nii.gz")])
    # a DICOM series in a non-UTF-8 folder, and one with a non-UTF-8 file name
    series = tmp_path / os.fsdecode(b"series_\xff")
    shutil.copytree(SIEMENS, series)
    first = sorted(series.iterdir())[0]
    first.rename(series / os.fsdecode(b"slice_\xfe.dcm"))
    assert read_volume(series).shape[0] == len(list(SIEMENS.iterdir()))
    # a non-UTF-8 path on stdin
    proc = _cli("-", "liver", "-m", small_checkpoint, "-o", tmp_path / "o2", stdin=subprocess.PIPE)
    stdout, stderr = proc.communicate(os.fsencode(folder / bad) + b"\n", timeout=600)
    assert proc.returncode == 0, stderr.decode()
    assert stdout == os.fsencode(tmp_path / "o2" / bad) + b"\n"


def test_symlink_loop_is_one_failed_entry(small_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT, folder / "ct.nii.gz")
    (folder / "loop.nii.gz").symlink_to(folder / "loop.nii.gz")
    items = expand_inputs([folder])
    assert [(i.path.name, i.error is not None) for i in items] == [("ct.nii.gz", False), ("loop.nii.gz", True)]
    result = segment(folder, "liver", "-m", small_checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loop.nii.gz: symlink loop" in errors[0]
    assert (tmp_path / "out" / "ct.nii.gz").exists()


def test_newline_long_and_upper_case_names(small_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT, folder / "two\nlines.nii.gz")
    long_name = "c" * 243 + ".nii.gz"  # 250 bytes: fits, but the old temp prefix made it 264
    shutil.copy(CT, folder / long_name)
    result = segment(folder, "liver", "-m", small_checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "line break" in errors[0] and "two\\nlines" in errors[0]  # still one line
    assert result.stdout.splitlines() == [str(tmp_path / "out" / long_name)]
    assert (tmp_path / "out" / ("c" * 243 + ".json")).exists()
    result = segment(CT, "liver", "-m", small_checkpoint, "-o", tmp_path / "UP.NII.GZ")
    assert result.exit_code == 0, result.output
    assert sitk.ReadImage(str(tmp_path / "UP.NII.GZ")).GetSize() == sitk.ReadImage(str(CT)).GetSize()


def test_temp_names_and_stale_cleanup(tmp_path):
    target = tmp_path / ("x" * 240 + ".NII.GZ")
    name = temp_name(target.name)
    assert len(name) <= 255 and name.endswith(".nii.gz")
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    stale = tmp_path / temp_name(target.name)
    stale.write_bytes(b"")
    other = tmp_path / temp_name("other.nii.gz")
    other.write_bytes(b"")
    assert clean_stale_temps([target]) == [stale]
    assert other.exists()


def test_nii_gz_written_through_isal_reads_back_like_itks_own(tmp_path):
    """ITK writes the plain .nii, ISA-L compresses it: same header and voxels as ITK's own .nii.gz."""
    import gzip

    volume = read_volume(CT)
    kept = gzip.decompress(write_volume(volume, tmp_path / "kept.nii.gz").read_bytes())
    volume.meta.pop("nifti_header")  # without the input's own qform/sform (io/nifti_header.py): ITK's header
    ours = write_volume(volume, tmp_path / "ours.nii.gz")
    itk = tmp_path / "itk.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(itk), True)
    assert gzip.decompress(ours.read_bytes()) == gzip.decompress(itk.read_bytes())
    # with them: the same file but for pixdim[0..3] (76..92) and the codes, quaternion and srows (252..328)
    itk_bytes, raw = gzip.decompress(itk.read_bytes()), gzip.decompress(CT.read_bytes())
    assert kept[:76] == itk_bytes[:76] and kept[92:252] == itk_bytes[92:252] and kept[328:] == itk_bytes[328:]
    assert kept[252:328] == raw[252:328] and kept[76:92] == raw[76:92]
    assert _temps(tmp_path) == []


# ---------------------------------------------------------------------------- 9. memory, 10. prompts


def test_header_bombs_are_refused_before_allocation(tmp_path, monkeypatch):
    nrrd = tmp_path / "bomb.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1200 1200 1200\nencoding: raw\n"
                     b"endian: little\n\n" + bytes(1000))
    with pytest.raises(InputError, match="more than the limit"):
        read_volume(nrrd)
    monkeypatch.setenv("TEXT3DSAM_MAX_VOXELS", str(2 * 10**9))
    with pytest.raises(InputError, match="truncated NRRD data"):
        read_volume(nrrd)
    monkeypatch.setenv("TEXT3DSAM_MAX_VOXELS", "1000")
    for path in (MR_NPZ, CT, NRRD, SIEMENS):
        with pytest.raises(InputError, match="TEXT3DSAM_MAX_VOXELS"):
            read_volume(path)


def test_npz_bomb_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("imgs.npy", "w", force_zip64=True) as fp:
        header = {"descr": "|u1", "fortran_order": False, "shape": (1024, 1024, 1024)}
        np.lib.format.write_array_header_1_0(fp, header)
        zeros = bytes(1 << 24)
        for _ in range(64):
            fp.write(zeros)
    assert path.stat().st_size < 4 << 20
    with pytest.raises(InputError, match="more than the limit"):
        read_volume(path)


def test_label_counts_without_a_full_int64_copy():
    import tracemalloc

    from text3dsam_cli.io import read_npz_array

    gts = read_npz_array(CHALLENGE / "CT_AMOS_amos_0018_gt.npz", "gts")
    values = [int(v) for v in np.unique(gts) if v]
    tracemalloc.start()
    counts = label_counts(gts, values)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    expected = np.bincount(gts.ravel())
    assert counts == {v: int(expected[v]) for v in values}
    assert peak < gts.size * 8 / 2  # far below an 8-byte-per-voxel copy


def test_prompt_cap(small_checkpoint, tmp_path):
    result = segment(CT, "a", "b", "c", "--max-prompts", "2", "-m", tmp_path / "no-model")
    assert result.exit_code == 2 and "--max-prompts 2" in result.stderr
    result = segment(MR_NPZ, "--max-prompts", "3", "-m", small_checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "4 prompts, more than --max-prompts 3" in result.stderr  # the npz has 4


# ------------------------------------------------------------------------------------------- smaller


@pytest.mark.parametrize("args, message", [
    (["--window", "nonsense"], "window"),
    (["--spacing", "inf"], "--spacing"),
    (["--spacing", "nan"], "--spacing"),
    (["--modality", "XYZ"], "--modality"),
    (["-o", "x.png"], "not an output file type"),
    (["-o", "x.nhdr"], "header/data pairs"),
    (["--format", "png"], "--format"),
])
def test_bad_options_exit_2_before_the_model_loads(tmp_path, args, message):
    # the model path does not exist: exit 2 with the option's message proves the check ran first
    result = segment(CT, "liver", "-m", tmp_path / "no-model", *[a if a[0] == "-" or "." not in a else
                                                                 str(tmp_path / a) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.nhdr").exists()


def test_dicom_seg_without_highdicom_is_refused_up_front(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else
                        real(name, *a))
    result = segment(SIEMENS, "brain", "--dicom-seg", "-m", tmp_path / "no-model")
    assert result.exit_code == 2 and "highdicom" in result.stderr


def test_zero_spacing_nifti_refused(tmp_path):
    import nibabel as nib

    image = nib.load(str(CT))
    with gzip.open(CT) as fp:
        raw = bytearray(fp.read())
    raw[88:92] = struct.pack("<f", 0.0)  # pixdim[3], the z spacing (nibabel would "fix" it to 1 on saving)
    path = tmp_path / "zero.nii"
    path.write_bytes(bytes(raw))
    assert image.header["pixdim"][3] > 0
    with pytest.raises(InputError, match="zero or non-finite spacing"):
        read_volume(path)


def test_npz_in_hounsfield_units_is_normalised(tmp_path):
    from text3dsam_cli.pipeline import prepare_scan

    ct = read_volume(CT)
    path = tmp_path / "CT_hu.npz"
    np.savez_compressed(path, imgs=ct.array.astype(np.int16), spacing=np.array(ct.spacing))
    scan = prepare_scan(read_volume(path))
    assert scan.describe()["normalization"] == "ct_window" and "outside 0..255" in scan.describe()["detail"]
    assert scan.image.min() >= 0 and scan.image.max() <= 255
    plain = prepare_scan(read_volume(MR_NPZ))
    assert plain.describe()["normalization"] == "none"


# ------------------------------------------------------------------------------------------------ eval


def _label_copy(source: Path, path: Path, flip: bool = False, shift: float = 0.0) -> None:
    image = sitk.ReadImage(str(source))
    if flip:  # the same voxels stored the other way along x: another direction and origin, same physical grid
        image = sitk.Flip(image, [True, False, False])
    if shift:
        image.SetOrigin([o + shift for o in image.GetOrigin()])
    sitk.WriteImage(image, str(path))


def test_eval_geometry_and_failed_cases(tmp_path):
    from text3dsam_cli.evaluation import evaluate_folder

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for name, source in (("MR_a.nii.gz", BRAIN1), ("MR_b.nii.gz", BRAIN2), ("MR_c.nii.gz", BRAIN1)):
        _label_copy(source, gt / name)
    _label_copy(BRAIN1, pred / "MR_a.nii.gz", flip=True)
    _label_copy(BRAIN2, pred / "MR_b.nii.gz", shift=3.0)
    _label_copy(BRAIN1, pred / "MR_c.nii.gz")
    _label_copy(BRAIN1, pred / "MR_d.nii.gz")  # no ground truth
    odd = os.fsdecode(b"MR_\xff.nii.gz")  # a name that is not UTF-8
    _label_copy(BRAIN2, gt / "MR_e.nii.gz")
    shutil.copy(gt / "MR_e.nii.gz", gt / odd)
    shutil.copy(gt / "MR_e.nii.gz", pred / odd)
    flipped = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "MR_a.nii.gz")))
    assert not np.array_equal(flipped, sitk.GetArrayFromImage(sitk.ReadImage(str(gt / "MR_a.nii.gz"))))
    results = evaluate_folder(pred, gt)
    assert results["cases"]["MR_a.nii.gz"]["DSC"] == pytest.approx(1.0)
    assert results["cases"]["MR_c.nii.gz"]["DSC"] == pytest.approx(1.0)
    assert results["cases"][odd]["DSC"] == pytest.approx(1.0)
    assert set(results["failed"]) == {"MR_b.nii.gz", "MR_d.nii.gz"}
    assert "voxel grid differs" in results["failed"]["MR_b.nii.gz"]
    assert "no ground truth" in results["failed"]["MR_d.nii.gz"]
    result = runner.invoke(app, ["eval", "--pred", str(pred), "--gt", str(gt), "--json", "-", "--csv",
                                 str(tmp_path / "m.csv")])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["summary"]["overall"]["cases"] == 3
    assert len((tmp_path / "m.csv").read_bytes().splitlines()) == 4
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
