"""``text3dsam download`` and ``text3dsam info`` against a hand-built Hugging Face cache (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from text3dsam_cli.cli import app

runner = CliRunner()
REV = "fedcba9876543210fedcba9876543210fedcba98"


def _cache(home: Path, checkpoint: Path) -> Path:
    repo = home / "hub" / "models--MagicXin--Text3DSAM"
    shutil.copytree(checkpoint, repo / "snapshots" / REV)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    return repo / "snapshots" / REV


def test_download_offline_returns_cached_snapshot(small_checkpoint, tmp_path, monkeypatch):
    snapshot = _cache(tmp_path / "hf", small_checkpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = runner.invoke(app, ["download"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(snapshot)


def test_download_missing_offline_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    result = runner.invoke(app, ["download", "someone/missing-model"])
    assert result.exit_code == 1
    assert result.stderr.count("error:") == 1 and "someone/missing-model" in result.stderr


def test_info_json_reports_cached_model_and_versions(small_checkpoint, tmp_path, monkeypatch):
    _cache(tmp_path / "hf", small_checkpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model"]["model"] == "MagicXin/Text3DSAM" and info["model"]["commit"] == REV
    assert info["device"]["resolved"] == "cpu" and info["hub"]["offline"] is True
    assert info["versions"]["torch"]


def test_info_without_model_still_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["model"]["available"] is False


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("segment", "train", "finetune", "eval", "download", "info"):
        assert command in result.stdout
