"""The format registry (``io/formats.py``) is the one place formats are listed; everything else derives from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from text3dsam_cli import evaluation, pipeline
from text3dsam_cli.errors import InputError, OutputError
from text3dsam_cli.io import formats, read_volume, write_volume
from text3dsam_cli.io.atomic import KNOWN_SUFFIXES, temp_key, write_json, write_text
from text3dsam_cli.io.readers import SUFFIX_FORMATS
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.io.writers import OUTPUT_SUFFIXES


def test_derived_lists_are_what_the_hand_written_ones_were() -> None:
    assert SUFFIX_FORMATS == {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd",
                              ".mha": "metaimage", ".mhd": "metaimage", ".npz": "npz", ".dcm": "dicom"}
    assert OUTPUT_SUFFIXES == (".nii.gz", ".nii", ".nrrd", ".mha", ".npz")
    assert pipeline.FORMATS == {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha", "npz": ".npz"}
    assert pipeline.FILE_SUFFIXES == OUTPUT_SUFFIXES
    assert set(evaluation.LABEL_IMAGE_SUFFIXES) == {".nii.gz", ".nii", ".mha", ".nrrd"}
    assert evaluation.NPZ_SUFFIX == ".npz"
    assert [f.name for f in formats.COMPANION_FORMATS] == ["dicom_seg", "rtstruct"]


def test_every_written_ending_keeps_its_suffix_on_temporary_names() -> None:
    for suffix in formats.WRITTEN_SUFFIXES:  # SimpleITK picks its writer by the temporary file's ending
        assert temp_key(f"Case{suffix.upper()}") == f"Case{suffix}"
    for i, longer in enumerate(KNOWN_SUFFIXES):  # ".seg.dcm" must be tried before ".dcm"
        assert not any(longer.endswith(shorter) for shorter in KNOWN_SUFFIXES[:i]), longer


def test_lookups() -> None:
    assert formats.input_format("a/B.NII.GZ").name == "nifti"
    assert formats.output_format("x.seg.dcm") is None  # a companion, never a label-map ending
    assert formats.output_format("x.nhdr") is None and formats.input_format("x.nhdr").name == "nrrd"
    assert "header/data pairs" in formats.unwritable_hint("x.mhd")
    assert formats.unwritable_hint("x.txt") == ""
    assert formats.by_name("npz").default_output == ".npz"
    assert formats.strip_suffix("case.nii.gz") == "case" and formats.strip_suffix(".nii") == ".nii"


@pytest.mark.parametrize("fmt", [f for f in formats.LABEL_MAP_FORMATS if f.suffixes], ids=lambda f: f.name)
def test_every_label_map_format_round_trips_through_the_registry(fmt: formats.Format, tmp_path: Path) -> None:
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 2, 3] = 7
    volume = Volume(labels, spacing=(0.5, 0.75, 2.0), origin=(1.0, -2.0, 3.0))
    for suffix in fmt.output_suffixes:
        path = write_volume(volume, tmp_path / f"x{suffix}")
        if fmt.stores_geometry:
            back = read_volume(path)
            np.testing.assert_array_equal(back.array, labels)
            assert back.spacing == pytest.approx(volume.spacing) and back.origin == pytest.approx(volume.origin)
            assert back.source_format == fmt.name


def test_messages_and_help_list_every_ending(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(InputError) as info:
        read_volume(text)
    assert all(s in str(info.value) for s in formats.file_input_suffixes()) and "DICOM" in str(info.value)
    with pytest.raises(OutputError) as info:
        write_volume(Volume(np.zeros((2, 2, 2), np.uint8)), tmp_path / "x.png")
    assert all(s in str(info.value) for s in OUTPUT_SUFFIXES)
    assert all(choice in formats.format_help() for choice in pipeline.FORMATS)
    assert formats.output_help() == "/".join(OUTPUT_SUFFIXES)


def test_the_registry_and_the_cli_import_no_heavy_library() -> None:
    code = ("import sys, text3dsam_cli.io.formats, text3dsam_cli.cli; "
            "print(sorted(m for m in ('SimpleITK', 'pydicom', 'nibabel', 'highdicom', 'torch', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_atomic_text_and_json(tmp_path: Path) -> None:
    target = write_json(tmp_path / "sub" / "a.json", {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"b": 1, "a": [1, 2]}
    assert target.read_text().endswith("]\n}\n")
    name = os.fsdecode(b"case_\xff")  # a name holding a byte that is not UTF-8
    write_text(tmp_path / "b.csv", f"{name}\n", errors="surrogateescape")
    assert (tmp_path / "b.csv").read_bytes() == b"case_\xff\n"
    with pytest.raises(TypeError):
        write_json(tmp_path / "c.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv", "sub"]  # no temporary file, no c.json
