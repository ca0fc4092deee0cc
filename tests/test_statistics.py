"""segment --statistics: intensity statistics per label of the input's own values, against a plain numpy oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.io import read_volume
from text3dsam_cli.statistics import INTENSITY_KEYS, intensity_statistics

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
CT_SEG = DATA / "nifti" / "totalsegmentator" / "example_seg.nii.gz"  # TotalSegmentator's 41-label map of CT

runner = CliRunner()


def oracle(image: np.ndarray, labels: np.ndarray, value: int) -> dict[str, float | None]:
    """One full-size mask per label, numpy's own functions: the straightforward way."""
    inside = image[labels == value].astype(np.float64)
    if inside.size == 0:
        return dict.fromkeys(INTENSITY_KEYS)
    figures = (inside.mean(), inside.std(), inside.min(), *np.percentile(inside, [5, 50, 95]), inside.max())
    return {key: round(float(v), 4) for key, v in zip(INTENSITY_KEYS, figures)}


def test_real_ct_and_totalsegmentator_labels_match_the_oracle():
    image = read_volume(CT).array
    labels = read_volume(CT_SEG).array
    assert image.dtype == np.int16 and labels.shape == image.shape
    present = sorted(int(v) for v in np.unique(labels) if v > 0)
    assert len(present) > 20
    wanted = [*present, 200]  # 200: a label value the map does not hold
    stats = intensity_statistics(image, labels, wanted)
    assert list(stats) == wanted
    for value in present:
        assert stats[value] == oracle(image, labels, value), value
    assert stats[200] == dict.fromkeys(INTENSITY_KEYS)
    # the liver (5) of a real CT in Hounsfield units
    assert 20 < stats[5]["median"] < 120 and stats[5]["min"] < stats[5]["p5"] <= stats[5]["median"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_label_map_dtypes_and_float_images(dtype):
    image = read_volume(CT).array.astype(np.float32) * np.float32(0.5) + np.float32(0.25)
    labels = read_volume(CT_SEG).array.astype(dtype)
    stats = intensity_statistics(image, labels, [1, 2, 5])
    for value in (1, 2, 5):
        assert stats[value] == oracle(image, labels, value)


def test_histogram_and_sorting_paths_agree_with_the_oracle(monkeypatch):
    """16-bit integer images take the histogram path, others the sorting path; both give the oracle's figures,
    also for labels of 1, 2 and 3 voxels (percentile interpolation at its edges) and for uint16 HU + 1024."""
    import text3dsam_cli.statistics as statistics

    rng = np.random.default_rng(7)
    ct = read_volume(CT).array
    labels = read_volume(CT_SEG).array.copy()
    for value, size in ((101, 1), (102, 2), (103, 3)):
        labels[np.unravel_index(rng.choice(labels.size, size, replace=False), labels.shape)] = value
    values = sorted(int(v) for v in np.unique(labels) if v > 0)
    images = {"int16": ct, "uint16+1024": (np.clip(ct, -1024, None) + 1024).astype(np.uint16),
              "uint8": rng.integers(0, 256, ct.shape, dtype=np.uint8),
              "int32": ct.astype(np.int32) * 3, "float64": ct * 0.1}
    for name, image in images.items():
        expected = {v: oracle(image, labels, v) for v in values}
        assert intensity_statistics(image, labels, values) == expected, name
        with monkeypatch.context() as patch:
            patch.setattr(statistics, "HISTOGRAM_BINS", 0)  # force the sorting path
            assert intensity_statistics(image, labels, values) == expected, name


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="does not match"):
        intensity_statistics(np.zeros((2, 3, 4)), np.zeros((2, 3, 5), np.uint8), [1])


def _check_sidecar(sidecar_path, input_path, label_path):
    sidecar = json.loads(sidecar_path.read_text())
    image = read_volume(input_path).array
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    assert labels.shape == image.shape
    for entry in sidecar["labels"]:
        assert entry["intensity"] == oracle(image, labels, entry["label"])
    assert "statistics" in sidecar["timings_s"]
    return sidecar


def test_segment_statistics_on_the_input_grid(small_checkpoint, tmp_path):
    """A RAS CT (reoriented to LAS for the model) and a float32 copy of it (normalised where it lies without
    --statistics): the statistics are of the values as read, in HU, on the input grid."""
    as_float = tmp_path / "ct_float.nii.gz"
    image = sitk.ReadImage(str(CT))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(as_float))
    for source in (CT, as_float):
        out = tmp_path / f"{source.name.split('.')[0]}_seg.nii.gz"
        result = runner.invoke(app, ["segment", str(source), "liver", "spleen", "-m", str(small_checkpoint),
                                     "-o", str(out), "--statistics"])
        assert result.exit_code == 0, result.output
        sidecar = _check_sidecar(out.with_name(out.name.replace(".nii.gz", ".json")), source, out)
        assert sidecar["orientation"]["input"] != sidecar["orientation"]["model"]
        assert any(e["voxels"] > 0 and e["intensity"]["min"] < -500 for e in sidecar["labels"])  # HU, not 0..255


def test_no_statistics_unless_asked(small_checkpoint, tmp_path, monkeypatch):
    import text3dsam_cli.statistics as statistics

    def refuse(*args, **kwargs):
        raise AssertionError("statistics computed without --statistics")

    monkeypatch.setattr(statistics, "intensity_statistics", refuse)
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(CT), "liver", "-m", str(small_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert all("intensity" not in e for e in sidecar["labels"]) and "statistics" not in sidecar["timings_s"]
