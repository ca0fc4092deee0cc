"""``text3dsam download`` and ``text3dsam info`` against a hand-built Hugging Face cache (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
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


def _pyproject_extras() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as file:
        extras = tomllib.load(file)["project"]["optional-dependencies"]
    return {name for name in extras if name not in ("test", "dev")}


def test_info_table_is_the_commands_output_on_stdout(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "MagicXin/Text3DSAM" in result.stdout and "torch" in result.stdout
    assert result.stderr == ""
    assert "info looks in the cache only" in result.stdout
    assert "HF_HUB_OFFLINE" in result.stdout and "not set" in result.stdout


def test_info_says_offline_only_when_hf_hub_offline_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["info"])
    assert "HF_HUB_OFFLINE set: segment and download use the cache only" in " ".join(result.stdout.split())
    assert json.loads(runner.invoke(app, ["info", "--json"]).stdout)["hub"]["offline"] is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert json.loads(runner.invoke(app, ["info", "--json"]).stdout)["hub"]["offline"] is False
    assert "not set" in runner.invoke(app, ["info"]).stdout


def test_info_lists_the_extras_with_versions_and_no_test_packages(tmp_path, monkeypatch):
    from importlib import metadata

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    info = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert {"view", "dicomseg", "rtstruct"} <= set(info["extras"]) == _pyproject_extras()
    for extra, state in info["extras"].items():
        for name, version in state["packages"].items():
            try:
                assert version == metadata.version(name), (extra, name)
            except metadata.PackageNotFoundError:
                assert version is None and state["installed"] is False
    listed = {name.lower() for name in info["versions"]}
    listed |= {name.lower() for state in info["extras"].values() for name in state["packages"]}
    for test_only in ("pytest", "pytest-timeout", "ruff", "selenium", "httpx", "transformers", "psutil"):
        assert test_only not in listed
    table = runner.invoke(app, ["info"]).stdout
    assert "extra view" in table and "extra dicomseg" in table and "extra rtstruct" in table
