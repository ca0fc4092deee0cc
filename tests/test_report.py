"""text3dsam report: the sidecars on disk (here written by two shards) as one table, one row per input and label."""

from __future__ import annotations

import csv
import io
import json
import shutil

from conftest import DATA
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.report import INTENSITY_COLUMNS, read_sidecars, report_rows

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
MR = DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz"
runner = CliRunner()


def _study(tmp_path, checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(CT, inputs / "a.nii.gz")
    shutil.copy(MR, inputs / "b.nii.gz")
    out = tmp_path / "out"
    for shard, extra in (("1/2", ["--statistics"]), ("2/2", [])):
        result = runner.invoke(app, ["segment", str(inputs), "liver", "left kidny", "-m", str(checkpoint),
                                     "-o", str(out), "--shard", shard, "--min-size-ml", "1", *extra])
        assert result.exit_code == 0, result.output
    (out / "notes.json").write_text('{"Modality": "MR"}')  # a BIDS-like JSON: not a sidecar
    (out / "broken.json").write_text("{")
    return out


def test_report_of_a_sharded_run(small_checkpoint, tmp_path):
    out = _study(tmp_path, small_checkpoint)
    sidecars = {json.loads(p.read_text())["input"]: json.loads(p.read_text()) for p in
                (out / "a.json", out / "b.json")}
    table = tmp_path / "table.csv"
    result = runner.invoke(app, ["report", str(out), "-o", str(table)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "skipped 2 file(s)" in notes[0] and "notes.json" in notes[0]
    assert "broken.json" in notes[0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert len(rows) == 4
    assert list(rows[0])[:5] == ["input", "sidecar", "label_map", "prompt", "label"]
    assert set(INTENSITY_COLUMNS) <= set(rows[0]) and "removed_ml" in rows[0]
    for row in rows:
        sidecar = sidecars[row["input"]]
        entry = next(e for e in sidecar["labels"] if e["label"] == int(row["label"]))
        assert row["prompt"] == entry["prompt"] and int(row["voxels"]) == entry["voxels"]
        assert float(row["volume_ml"]) == entry["volume_ml"] and int(row["components"]) == entry["components"]
        assert float(row["largest_component_ml"]) == entry["largest_component_ml"]
        assert row["touches_border"] == ("true" if entry["touches_border"] else "false")
        assert float(row["removed_ml"]) == entry["removed_ml"]
        assert row["vocabulary_known"] == ("true" if entry["vocabulary"]["known"] else "false")
        assert row["vocabulary_closest"] == entry["vocabulary"]["closest"]
        assert row["modality"] == sidecar["modality"]["modality"]
        assert row["modality_source"] == sidecar["modality"]["source"]
        assert row["label_map"] == sidecar["outputs"]["labels"]
        if "intensity" in entry:  # shard 1 ran with --statistics
            assert float(row["intensity_median"]) == entry["intensity"]["median"]
        else:
            assert row["intensity_median"] == ""
    assert sum(row["intensity_mean"] != "" for row in rows) == 2
    assert [row["prompt"] for row in rows] == ["liver", "left kidny"] * 2
    assert {row["modality"] for row in rows} == {"CT", "MR"}

    # JSON on stdout: the same rows, typed
    result = runner.invoke(app, ["report", str(out / "a.json"), str(out / "b.json"), "--json", "-q"])
    assert result.exit_code == 0 and result.stderr == ""
    data = json.loads(result.stdout)
    assert data == report_rows(read_sidecars([out])[0])
    assert [type(data[0][k]) for k in ("voxels", "volume_ml", "touches_border")] == [int, float, bool]
    # CSV on stdout when no -o
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0 and result.stdout == table.read_text()


def test_report_errors(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "missing: no such file or folder" in result.stderr
    (tmp_path / "x.json").write_text("[]")
    result = runner.invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "t.csv")])
    assert result.exit_code == 1 and "no text3dsam sidecars" in result.stderr
    assert not (tmp_path / "t.csv").exists()
    assert runner.invoke(app, ["report"]).exit_code == 2
