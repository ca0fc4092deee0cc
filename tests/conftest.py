"""Shared fixtures: paths to ../shared, deterministic test checkpoints, an isolated offline HF cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"
CHALLENGE = DATA / "challenge"
#: Why every test is skipped when the shared folder is not beside the checkout (e.g. in an unpacked sdist).
NO_SHARED = (f"the tests need the project's shared folder (reference numbers and real test data) at {SHARED}; "
             "it is not there")


def pytest_collection_modifyitems(config, items):
    if not SHARED.is_dir():
        for item in items:
            item.add_marker(pytest.mark.skip(reason=NO_SHARED))


def _make_checkpoint_module():
    spec = importlib.util.spec_from_file_location("make_test_checkpoint", REFERENCE / "make_test_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(REFERENCE))  # it imports detweights from beside itself
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REFERENCE))
    return module


def build_reference_checkpoint(out_dir: Path, variant: str) -> Path:
    """Write the shared deterministic checkpoint (laid out like the published one) into ``out_dir``."""
    _make_checkpoint_module().build(str(out_dir), variant)
    return out_dir


@pytest.fixture(autouse=True)
def _isolated_hub(tmp_path_factory, monkeypatch):
    """Never touch the user's HF cache or the network from tests."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TEXT3DSAM_MODEL", raising=False)
    # Each test gets its own empty prompt-embedding store: never the user's, never another test's.
    monkeypatch.setenv("TEXT3DSAM_CACHE", str(tmp_path_factory.mktemp("text3dsam_cache")))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """The shared `small` test checkpoint (image_size 64x128x128)."""
    return build_reference_checkpoint(tmp_path_factory.mktemp("ckpt_small"), "small")


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory) -> Path:
    """The shared `full` test checkpoint (image_size 128x256x256, like the published model)."""
    return build_reference_checkpoint(tmp_path_factory.mktemp("ckpt_full"), "full")


@pytest.fixture(scope="session")
def small_model(small_checkpoint):
    """The small checkpoint loaded once per session (do not modify it in tests)."""
    from text3dsam_cli.model import load_model

    return load_model(small_checkpoint)


@pytest.fixture(scope="session")
def full_model(full_checkpoint):
    """The full checkpoint loaded once per session (do not modify it in tests)."""
    from text3dsam_cli.model import load_model

    return load_model(full_checkpoint)


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
