"""Per-label quality figures and component clean-up, checked against scipy's own counts on real label maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA
from scipy import ndimage
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.io import read_volume
from text3dsam_cli.quality import assess_labels, flags

SEG = DATA / "nifti" / "totalsegmentator" / "example_seg.nii.gz"
CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
FULL = np.ones((3, 3, 3), dtype=bool)


def _on_outer_face(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())


def test_real_label_map_matches_scipy_whole_volume_counts():
    volume = read_volume(SEG)
    labels = volume.array
    values = [*sorted(int(v) for v in np.unique(labels) if v), 200]  # 200: a label that is absent
    report = assess_labels(labels.copy(), values, volume.voxel_volume_ml)
    several = 0
    for value in values:
        mask = labels == value
        components, count = ndimage.label(mask, structure=FULL)
        sizes = np.bincount(components.ravel())[1:]
        entry = report[value]
        assert entry["components"] == count, value
        assert entry["voxels"] == int(mask.sum()), value
        assert entry["largest_component_ml"] == pytest.approx(sizes.max() * volume.voxel_volume_ml if count else 0,
                                                              abs=1e-4)
        assert entry["touches_border"] == _on_outer_face(mask), value
        several += count > 1
    assert several >= 3  # the map really has fragmented labels, and the check saw them
    assert report[200] == {"voxels": 0, "components": 0, "largest_component_ml": 0.0, "touches_border": False}
    assert any(e["touches_border"] for e in report.values()) and not all(e["touches_border"] for e in report.values())


def test_real_label_map_largest_component_and_min_size():
    volume = read_volume(SEG)
    values = sorted(int(v) for v in np.unique(volume.array) if v)
    ml = volume.voxel_volume_ml
    largest = volume.array.copy()
    report = assess_labels(largest, values, ml, largest_component=True)
    for value in values:
        count = ndimage.label(largest == value, structure=FULL)[1]
        assert count == 1 == report[value]["components"]
        before = np.bincount(ndimage.label(volume.array == value, structure=FULL)[0].ravel())[1:]
        assert (largest == value).sum() == before.max()  # exactly the largest one survives
        assert report[value]["removed_ml"] == pytest.approx((before.sum() - before.max()) * ml, abs=1e-3)
    assert set(np.unique(largest[largest != volume.array])) == {0}  # removed voxels become background

    threshold = 5.0
    kept = volume.array.copy()
    report = assess_labels(kept, values, ml, min_size_ml=threshold)
    for value in values:
        sizes = np.bincount(ndimage.label(volume.array == value, structure=FULL)[0].ravel())[1:]
        big = sizes[sizes * ml >= threshold]
        assert report[value]["components"] == big.size
        assert (kept == value).sum() == big.sum()


def test_border_flags_and_26_connectivity_on_synthetic_maps():
    shape = (10, 12, 14)
    labels = np.zeros(shape, np.uint8)
    labels[4:6, 5:7, 6:8] = 1  # interior
    labels[2, 2, 2] = 2
    labels[3, 3, 3] = 2  # touches the first voxel at a corner only: one 26-connected component
    report = assess_labels(labels, [1, 2], 0.001)
    assert report[1] == {"voxels": 8, "components": 1, "largest_component_ml": 0.008, "touches_border": False}
    assert report[2]["components"] == 1 and not report[2]["touches_border"]
    for axis in range(3):
        for end in (0, shape[axis] - 1):
            touching = labels.copy()
            index = [5, 6, 7]
            index[axis] = end
            touching[tuple(index)] = 1
            assert assess_labels(touching, [1], 0.001)[1]["touches_border"], (axis, end)
    # cleaning away the component on the border clears the flag; the other label is untouched
    edge = labels.copy()
    edge[0, 0, 0] = 1
    report = assess_labels(edge, [1, 2], 0.001, largest_component=True)
    assert report[1]["components"] == 1 and not report[1]["touches_border"] and edge[0, 0, 0] == 0
    assert report[1]["removed_ml"] == pytest.approx(0.001)
    assert np.array_equal(edge == 2, labels == 2)
    # min size larger than everything: the label becomes empty
    gone = labels.copy()
    report = assess_labels(gone, [1], 0.001, min_size_ml=1.0)
    assert report[1]["components"] == 0 and not (gone == 1).any()
    assert report[1]["voxels"] == 0 and flags(report[1]) == ["empty", "removed 0.008 ml"]


def test_segment_cleanup_applies_to_every_output_and_prints_a_table(small_checkpoint, tmp_path):
    runner = CliRunner()
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(CT), "liver", "spleen", "-m", str(small_checkpoint), "-o", str(out),
                                 "--largest-component", "--min-size-ml", "0.5", "--split"])
    assert result.exit_code == 0, result.output
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    for entry in sidecar["labels"]:
        mask = labels == entry["label"]
        count = ndimage.label(mask, structure=FULL)[1]
        assert count == entry["components"] <= 1
        assert {"largest_component_ml", "touches_border", "removed_ml"} <= set(entry)
        split = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"seg_label{entry['label']}.nii.gz")))
        assert np.array_equal(split, mask.astype(np.uint8))  # all outputs agree with the cleaned map
    assert "components" in result.stderr and "liver" in result.stderr
    quiet = runner.invoke(app, ["segment", str(CT), "liver", "-m", str(small_checkpoint), "-o",
                                str(tmp_path / "q.nii.gz"), "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    bad = runner.invoke(app, ["segment", str(CT), "liver", "-m", str(small_checkpoint), "-o",
                              str(tmp_path / "b.nii.gz"), "--min-size-ml", "-1"])
    assert bad.exit_code == 2 and "--min-size-ml" in bad.stderr and not (tmp_path / "b.nii.gz").exists()


def _reference_report(labels: np.ndarray, values: list[int], ml: float, largest: bool, min_ml: float | None):
    """Per-label scipy labelling: the definition the one-pass implementation must reproduce."""
    cleaned = labels.copy()
    report = {}
    for value in values:
        components, count = ndimage.label(labels == value, structure=FULL)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        keep = np.ones(count, bool)
        if largest and count > 1:
            keep[:] = False
            keep[int(np.argmax(sizes))] = True  # scipy numbers components in raster order too
        if min_ml:
            keep &= sizes * ml >= min_ml
        cleaned[np.isin(components, np.flatnonzero(~keep) + 1)] = 0
        kept = np.isin(components, np.flatnonzero(keep) + 1)
        entry = {"voxels": int(kept.sum()), "components": int(keep.sum()),
                 "largest_component_ml": round(float(sizes[keep].max()) * ml, 4) if keep.any() else 0.0,
                 "touches_border": _on_outer_face(kept)}
        if largest or min_ml:
            entry["removed_ml"] = round(float(sizes[~keep].sum()) * ml, 4)
        report[value] = entry
    return report, cleaned


@pytest.mark.parametrize("seed", range(6))
def test_one_pass_matches_per_label_definition_on_random_maps(seed):
    """Scattered multi-label maps with equal-sized components (ties) and touching labels of different values."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 20, size=3))
    labels = rng.integers(0, 4, size=shape).astype(np.uint8)
    labels[rng.random(shape) < 0.75] = 0
    labels[1:3, 1:3, 1:3] = 3  # two 8-voxel blocks of one label: a tie for the largest component
    labels[-3:-1, -3:-1, -3:-1] = 3
    values = [1, 2, 3, 7]  # 7 is absent
    for largest, min_ml in ((False, None), (True, None), (False, 0.004), (True, 0.004)):
        got_map = labels.copy()
        got = assess_labels(got_map, values, 0.001, largest_component=largest, min_size_ml=min_ml)
        want, want_map = _reference_report(labels, values, 0.001, largest, min_ml)
        assert got == want, (seed, largest, min_ml)
        assert np.array_equal(got_map, want_map), (seed, largest, min_ml)


@pytest.mark.parametrize("seed", range(3))
def test_small_run_blocks_and_flipped_views_give_the_same_report(seed, monkeypatch):
    """Runs cut by block edges still add up, and a flipped (non-contiguous) view is assessed and cleaned in place."""
    import text3dsam_cli.quality as quality

    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 3, size=(9, 11, 13)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.6] = 0
    base = labels[::-1, :, ::-1].copy()
    view = base[::-1, :, ::-1]  # the same logical map as `labels`, stored flipped
    assert np.array_equal(view, labels) and not view.flags.c_contiguous
    want, want_map = _reference_report(labels, [1, 2], 0.001, True, None)
    monkeypatch.setattr(quality, "RUN_BLOCK", 7)
    got = assess_labels(view, [1, 2], 0.001, largest_component=True)
    assert got == want
    assert np.array_equal(base[::-1, :, ::-1], want_map)  # cleaned through the view


@pytest.mark.parametrize("seed", range(8))
def test_report_of_a_map_labelled_in_slabs_equals_the_whole_map_labelling(seed, monkeypatch):
    """Components cut by slab boundaries (joined straight, edge- and corner-wise, of one label only) are counted
    once, with their whole size and border contact, and a label on the last or first slice touches the border."""
    import text3dsam_cli.quality as quality

    rng = np.random.default_rng(200 + seed)
    shape = (int(rng.integers(7, 30)), int(rng.integers(5, 12)), int(rng.integers(5, 12)))
    labels = rng.integers(0, 4, size=shape).astype(np.uint8)
    labels[rng.random(shape) < (0.55 if seed % 2 else 0.8)] = 0
    labels[:, 1, 1] = 2  # one column through every slab: a single component across all cuts
    labels[3, 0, 0], labels[4, 1, 1] = 3, 3  # corner-wise across a cut (with 2-slice slabs)
    y, x = shape[1] // 2, shape[2] // 2
    for z, value in ((0, 5), (-1, 6)):  # alone on the first / last slice, away from the other faces
        labels[z, y - 1:y + 2, x - 1:x + 2] = 0
        labels[z + (1 if z == 0 else -1), y - 1:y + 2, x - 1:x + 2] = 0
        labels[z, y, x] = value
    values = [1, 2, 3, 5, 6, 9]
    want, _ = _reference_report(labels, values, 0.001, False, None)
    rows = int(rng.integers(1, 4))
    monkeypatch.setattr(quality, "LABEL_SLAB_VOXELS", rows * shape[1] * shape[2])
    monkeypatch.setattr(quality, "RUN_BLOCK", 5)
    calls = []
    monkeypatch.setattr(quality, "_figures_by_slab", lambda m, f=quality._figures_by_slab: calls.append(1) or f(m))
    got_map = labels.copy()
    assert assess_labels(got_map, values, 0.001) == want
    assert calls and np.array_equal(got_map, labels)  # the slab path ran, and a report changes nothing


def test_real_label_map_report_is_the_same_labelled_in_slabs(monkeypatch):
    import text3dsam_cli.quality as quality

    volume = read_volume(SEG)
    values = sorted(int(v) for v in np.unique(volume.array) if v)
    whole = assess_labels(volume.array.copy(), values, volume.voxel_volume_ml)
    monkeypatch.setattr(quality, "LABEL_SLAB_VOXELS", 7 * volume.array[:1].size)  # cuts every 7 slices
    assert assess_labels(volume.array.copy(), values, volume.voxel_volume_ml) == whole
