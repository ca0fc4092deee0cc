"""The distribution: licences declared and shipped (PEP 639), classifiers, and a complete test tree in the sdist.

The slow test builds the sdist and the wheel from this checkout (``python -m build --no-isolation``, offline) and
reads what a packager reads: METADATA, the licence files, the sdist's file list.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI); 3.10 has no TOML reader in the library
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: Files that carry a licence or a notice, by name.
LICENCE_NAME = re.compile(r"^(LICEN[CS]E|NOTICE|COPYING|THIRD-PARTY-LICEN[CS]ES)(\..*)?$", re.IGNORECASE)


def _licence_files_in_package() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / "text3dsam_cli").rglob("*")
            if path.is_file() and LICENCE_NAME.match(path.name)}


def test_license_is_mit_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text


def test_license_is_an_spdx_expression_covering_what_is_shipped():
    expression = PROJECT["license"]
    assert isinstance(expression, str), "license must be an SPDX expression string (PEP 639), not a table"
    ids = set(re.split(r"\s+AND\s+", expression))
    assert {"MIT", "CC-BY-NC-SA-4.0", "BSD-2-Clause"} <= ids
    notice = (ROOT / "text3dsam_cli/data/NOTICE").read_text()
    assert "CC BY-NC-SA 4.0" in notice
    assert (ROOT / "text3dsam_cli/view/static/niivue/LICENSE").read_text().startswith("BSD 2-Clause License")
    bundled = (ROOT / "text3dsam_cli/view/static/niivue/THIRD-PARTY-LICENSES").read_text()
    if "ISC License" in bundled:
        assert "ISC" in ids


def test_license_files_list_every_licence_and_notice_shipped():
    declared = set(PROJECT["license-files"])
    assert "LICENSE" in declared
    for pattern in declared:
        assert list(ROOT.glob(pattern)), f"license-files entry {pattern} matches nothing"
    assert _licence_files_in_package() <= declared
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"]), \
        "a License classifier next to a licence expression is refused by setuptools/PyPI (PEP 639)"


def test_build_backend_supports_pep_639():
    requires = PYPROJECT["build-system"]["requires"]
    setuptools = next(r for r in requires if r.startswith("setuptools"))
    minimum = re.search(r">=\s*([0-9]+)", setuptools)
    assert minimum and int(minimum.group(1)) >= 77, setuptools


def test_classifiers_are_known_and_cover_the_supported_pythons():
    classifiers = PROJECT["classifiers"]
    trove = pytest.importorskip("trove_classifiers")
    unknown = [c for c in classifiers if c not in trove.classifiers]
    assert not unknown, unknown
    lowest = re.search(r">=\s*3\.([0-9]+)", PROJECT["requires-python"]).group(1)
    versions = (re.fullmatch(r"Programming Language :: Python :: 3\.(\d+)", c) for c in classifiers)
    pythons = {int(m.group(1)) for m in versions if m}
    assert min(pythons) == int(lowest) and pythons == set(range(int(lowest), 14))
    for needed in ("Development Status ::", "Environment :: Console", "Environment :: GPU :: NVIDIA CUDA",
                   "Operating System ::", "Intended Audience ::"):
        assert any(c.startswith(needed) for c in classifiers), needed


def _build(tmp_path: Path) -> tuple[Path, Path]:
    """sdist and wheel of this checkout, built offline with the installed setuptools (the `test` extra pins
    setuptools >= 77, as the build system does)."""
    pytest.importorskip("build")
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz"))


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("build"))


@pytest.mark.slow
def test_wheel_metadata_declares_and_ships_every_licence(dist):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.rsplit("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    assert metadata["Metadata-Version"] >= "2.4"
    assert metadata["License-Expression"] == PROJECT["license"]
    assert metadata.get("License") is None, "the deprecated License field next to License-Expression"
    files = metadata.get_all("License-File")
    assert set(files) == set(PROJECT["license-files"])
    for name in files:
        assert f"{info}/licenses/{name}" in names
    assert "text3dsam_cli/data/vocabulary.json" in names and "text3dsam_cli/view/static/niivue/niivue.js" in names


@pytest.mark.slow
def test_sdist_ships_the_complete_test_tree_and_the_licences(dist):
    _, sdist = dist
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tests = {path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").glob("*.py")}
    assert {"tests/conftest.py", "tests/authors_pred.py"} <= tests
    assert tests <= names, sorted(tests - names)
    assert {"LICENSE", "README.md", "pyproject.toml", *PROJECT["license-files"]} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


@pytest.mark.slow
def test_sdist_tests_skip_with_their_reason_without_the_shared_folder(dist, tmp_path):
    """Unpacked where no ../shared lies beside it, the sdist's tests are skipped, each saying why."""
    _, sdist = dist
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert not (unpacked.parent / "shared").exists()
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             "tests/test_quality.py", "tests/test_model_conformance.py"],
                            cwd=unpacked, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" not in result.stdout and "error" not in result.stdout.lower()
    assert "skipped" in result.stdout and "the tests need the project's shared folder" in result.stdout


@pytest.mark.slow
def test_twine_check_strict_passes(dist):
    pytest.importorskip("twine")
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
