"""Metrics on small hand-worked arrays, plus an independent brute-force check of the NSD definition."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from text3dsam_cli import metrics
from text3dsam_cli.metrics import (
    dice,
    instance_f1_dsc_tp,
    nan_mean,
    normalized_surface_dice,
    semantic_case_metrics,
    surfel_areas,
)

SQRT3_8 = math.sqrt(3) / 8  # area of the one triangle of a corner that sees a single foreground voxel


def cube(shape, corner, size, value=1, out=None):
    """Put a cube of ``value`` with the given corner and edge length into ``out`` (new zeros if None)."""
    out = np.zeros(shape, dtype=np.int32) if out is None else out
    out[tuple(slice(c, c + size) for c in corner)] = value
    return out


# ---------------------------------------------------------------------------------------------- Dice


def test_dice_of_shifted_cubes():
    a = cube((6, 6, 6), (1, 1, 1), 2)
    b = cube((6, 6, 6), (2, 1, 1), 2)  # shares 4 of 8 voxels
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_dice_of_two_empty_masks_is_nan():
    assert math.isnan(dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))))


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


# ------------------------------------------------------------------------------------ surfel areas


def test_surfel_areas_of_simple_codes():
    iso = surfel_areas((1.0, 1.0, 1.0))
    assert iso[0] == 0 and iso[255] == 0
    assert iso[1] == pytest.approx(SQRT3_8)  # one voxel: one corner triangle
    assert iso[3] == pytest.approx(math.sqrt(2) / 2)  # two voxels along axis 2: a diagonal quad
    assert iso[15] == pytest.approx(1.0)  # a half cube (i = 1 plane): a flat unit square
    # the quad of code 3 is a diagonal in (axis 0, axis 1) extruded along axis 2
    assert surfel_areas((1.0, 1.0, 2.0))[3] == pytest.approx(math.sqrt(2))
    assert surfel_areas((3.0, 4.0, 1.0))[3] == pytest.approx(0.5 * 5.0)
    # the flat square of code 15 spans axes 1 and 2
    assert surfel_areas((7.0, 2.0, 3.0))[15] == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("spacing", "total"),
    [
        # sum over all 256 codes, computed with the organisers' SurfaceDice.py (CVPR-MedSegFMCompetition)
        ((1.0, 1.0, 1.0), 241.3431397055366),
        ((0.846, 0.846, 5.0), 818.3424715755211),
        ((2.0, 0.5, 1.5), 432.3329238288701),
    ],
)
def test_surfel_table_matches_the_official_one(spacing, total):
    assert surfel_areas(spacing).sum() == pytest.approx(total, rel=1e-12)


# -------------------------------------------------------------------------------------------- NSD


def test_nsd_identical_masks():
    a = cube((8, 8, 8), (2, 2, 2), 3)
    assert normalized_surface_dice(a, a, (1.0, 1.0, 1.0)) == pytest.approx(1.0)


def test_nsd_two_single_voxels():
    # Voxels 3 apart along axis 0: each has 8 corners of area sqrt(3)/8; the 4 facing corners of each are
    # 2 voxels from the other's facing corners, the 4 far ones 3 voxels or more.
    a = cube((10, 3, 3), (2, 1, 1), 1)
    b = cube((10, 3, 3), (5, 1, 1), 1)
    assert normalized_surface_dice(b, a, (1.0, 1.0, 1.0), 2.0) == pytest.approx(0.5)
    assert normalized_surface_dice(b, a, (1.0, 1.0, 1.0), 1.9) == 0.0
    assert normalized_surface_dice(b, a, (1.0, 1.0, 1.0), 3.0) == pytest.approx(1.0)
    # spacing along axis 0 changes the gaps: 0.5 mm -> 1.0 / 1.5 mm (all within 2 mm), 2 mm -> 4 mm
    assert normalized_surface_dice(b, a, (0.5, 1.0, 1.0), 2.0) == pytest.approx(1.0)
    assert normalized_surface_dice(b, a, (2.0, 1.0, 1.0), 2.0) == 0.0
    # spacing along the other axes does not matter for this gap (only the surfel areas scale)
    assert normalized_surface_dice(b, a, (1.0, 3.0, 0.2), 2.0) == pytest.approx(0.5)


def test_nsd_empty_masks():
    a = cube((5, 5, 5), (1, 1, 1), 2)
    empty = np.zeros_like(a)
    assert normalized_surface_dice(empty, a, (1, 1, 1)) == 0.0
    assert normalized_surface_dice(a, empty, (1, 1, 1)) == 0.0
    assert math.isnan(normalized_surface_dice(empty, empty, (1, 1, 1)))


def test_nsd_mask_touching_the_array_border():
    # outside the array counts as background, so a full mask has a closed surface
    full = np.ones((3, 4, 5), dtype=bool)
    assert normalized_surface_dice(full, full, (1, 1, 1)) == pytest.approx(1.0)
    inner = cube((3, 4, 5), (0, 0, 0), 3).astype(bool)
    assert 0 < normalized_surface_dice(inner, full, (1, 1, 1)) < 1


def _reference_nsd(gt: np.ndarray, pred: np.ndarray, spacing, tol: float) -> float:
    """The surface-distance definition written the slow, obvious way (2x2x2 correlation, all-pairs distances)."""
    kernel = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])
    areas = surfel_areas(spacing)
    surfaces = []
    for mask in (gt, pred):
        padded = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.int64)
        padded[:-1, :-1, :-1] = mask
        codes = ndimage.correlate(padded, kernel, mode="constant", cval=0)
        border = (codes != 0) & (codes != 255)
        surfaces.append((np.argwhere(border) * np.asarray(spacing), areas[codes[border]]))
    (pts_g, area_g), (pts_p, area_p) = surfaces
    if len(pts_g) == 0 or len(pts_p) == 0:
        return 0.0
    dist = cdist(pts_g, pts_p)
    near_g = dist.min(axis=1) <= tol
    near_p = dist.min(axis=0) <= tol
    return (area_g[near_g].sum() + area_p[near_p].sum()) / (area_g.sum() + area_p.sum())


@pytest.mark.parametrize("path", ["auto", "offsets", "runs", "edt"])
def test_nsd_matches_brute_force_on_random_masks(path, monkeypatch):
    original = metrics._area_near
    if path == "edt":
        monkeypatch.setattr(metrics, "_EDT_COST_PER_VOXEL", 0)
    elif path in ("offsets", "runs"):
        monkeypatch.setattr(metrics, "_EDT_COST_PER_VOXEL", 1e18)
        monkeypatch.setattr(metrics, "_area_near", lambda *a: original(*a[:4], path == "runs"))
    rng = np.random.default_rng(7)
    for trial in range(25):
        shape = tuple(rng.integers(3, 14, 3))
        gt = ndimage.binary_dilation(rng.random(shape) < 0.04, iterations=int(rng.integers(0, 2)))
        pred = np.roll(gt, 1, axis=trial % 3) if trial % 4 == 0 else ndimage.binary_dilation(
            rng.random(shape) < 0.04, iterations=int(rng.integers(0, 2)))
        if not (gt.any() and pred.any()):
            continue
        spacing = tuple(float(s) for s in rng.choice([0.3, 0.846, 1.0, 2.0, 5.0], 3))
        tol = float(rng.choice([1.0, 2.0, 3.0]))
        expected = _reference_nsd(gt, pred, spacing, tol)
        assert normalized_surface_dice(pred, gt, spacing, tol) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------- semantic per case


def test_semantic_case_uses_prompted_classes_present_in_gt():
    gt = cube((10, 10, 10), (1, 1, 1), 3, value=1)
    cube((10, 10, 10), (6, 6, 6), 3, value=2, out=gt)
    cube((10, 10, 10), (1, 6, 1), 2, value=3, out=gt)  # in the gt but not prompted: ignored
    pred = gt.copy()
    pred[gt == 2] = 0  # class 2 missed entirely
    out = semantic_case_metrics(pred, gt, class_ids=[1, 2, 4], spacing=(1, 1, 1))  # 4: prompted, absent
    assert sorted(out["per_class"]) == [1, 2]
    assert out["per_class"][1] == {"DSC": 1.0, "NSD": pytest.approx(1.0)}
    assert out["per_class"][2] == {"DSC": 0.0, "NSD": 0.0}
    assert out["DSC"] == pytest.approx(0.5)
    assert out["NSD"] == pytest.approx(0.5)


def test_semantic_case_without_evaluable_class_is_nan():
    gt = cube((5, 5, 5), (1, 1, 1), 2, value=1)
    out = semantic_case_metrics(gt, gt, class_ids=[2, 3], spacing=(1, 1, 1))
    assert math.isnan(out["DSC"]) and math.isnan(out["NSD"]) and out["per_class"] == {}


def test_semantic_case_ignores_background_and_huge_pred_labels():
    gt = cube((6, 6, 6), (1, 1, 1), 2, value=1)
    pred = gt.astype(np.int64) * 70000  # a label outside the prompted range
    out = semantic_case_metrics(pred, gt, class_ids=[0, 1], spacing=(1, 1, 1))
    assert list(out["per_class"]) == [1]
    assert out["DSC"] == 0.0


# -------------------------------------------------------------------------------------- instances


def test_instance_hand_worked():
    gt = cube((4, 12, 12), (1, 1, 1), 2, value=1)
    cube((4, 12, 12), (1, 6, 6), 2, value=2, out=gt)
    pred = cube((4, 12, 12), (1, 1, 1), 2)  # exact copy of instance 1
    cube((4, 12, 12), (1, 7, 6), 2, out=pred)  # instance 2 shifted by one voxel: IoU 4 / 12
    pred[3, 10, 10] = 1  # a stray false positive
    out = instance_f1_dsc_tp(pred.astype(np.uint8), gt)
    # TP 1, FP 2, FN 1: precision 1/3, recall 1/2, F1 = 2 (1/6) / (5/6) = 0.4; DSC of the match = 1
    assert out == {"F1": pytest.approx(0.4), "DSC_TP": 1.0, "TP": 1, "FP": 2, "FN": 1}


def test_instance_iou_of_exactly_half_counts():
    gt = cube((4, 4, 4), (1, 1, 1), 2)
    pred = gt.copy()
    pred[2] = 0  # half of the cube: IoU 4 / 8 = 0.5 (>= threshold), Dice 8 / 12
    out = instance_f1_dsc_tp(pred, gt)
    assert out["TP"] == 1 and out["F1"] == 1.0
    assert out["DSC_TP"] == pytest.approx(2 / 3)


def test_binary_prediction_is_split_6_connected_and_touching_instances_merge():
    gt = cube((3, 4, 7), (0, 0, 0), 2, value=1)
    cube((3, 4, 7), (0, 0, 2), 2, value=2, out=gt)  # face-to-face with instance 1
    diagonal = np.zeros((3, 4, 7), dtype=np.uint8)
    diagonal[0, 0, 5] = diagonal[1, 1, 6] = 1  # touch only along an edge: two 6-connected components
    merged = instance_f1_dsc_tp((gt > 0).astype(np.uint8) | diagonal, gt)
    # the binary mask of both touching cubes is one component, IoU 8 / 16 with either: one match (Dice 2/3)
    assert (merged["TP"], merged["FP"], merged["FN"]) == (1, 2, 1)
    assert merged["DSC_TP"] == pytest.approx(2 / 3)
    # the same voxels as a label map keep their ids
    assert instance_f1_dsc_tp(gt, gt)["F1"] == 1.0


def test_instance_hungarian_beats_greedy_at_low_threshold():
    # 1-D instances along the last axis: A1 = [0, 10), A2 = [10, 20); P1 = [5, 15), P2 = [0, 3).
    # IoU(A1, P1) = IoU(A2, P1) = 1/3, IoU(A1, P2) = 0.3. Greedy A1-P1 leaves one match; the assignment
    # finds A1-P2 and A2-P1.
    gt = np.zeros((1, 1, 20), dtype=np.int32)
    gt[..., :10], gt[..., 10:] = 1, 2
    pred = np.zeros_like(gt)
    pred[..., 5:15], pred[..., 0:3] = 1, 2
    out = instance_f1_dsc_tp(pred, gt, iou_threshold=0.3)
    assert (out["TP"], out["FP"], out["FN"]) == (2, 0, 0)
    assert out["DSC_TP"] == pytest.approx((2 * 3 / 13 + 2 * 5 / 20) / 2)
    assert instance_f1_dsc_tp(pred, gt)["TP"] == 0  # nothing reaches IoU 0.5


def test_many_instances_do_not_overflow():
    # 400 separate 2x2x2 cubes on a 20 x 20 grid: ids beyond 255 must stay distinct
    gt = np.zeros((2, 60, 60), dtype=np.int32)
    for n in range(400):
        gt[0:2, 3 * (n // 20):3 * (n // 20) + 2, 3 * (n % 20):3 * (n % 20) + 2] = n + 1
    perfect = instance_f1_dsc_tp((gt > 0).astype(np.uint8), gt)
    assert perfect == {"F1": 1.0, "DSC_TP": 1.0, "TP": 400, "FP": 0, "FN": 0}
    dropped = gt.copy()
    dropped[(dropped % 4 == 0) & (dropped > 0)] = 0  # miss every 4th
    out = instance_f1_dsc_tp(dropped.astype(np.uint16), gt.astype(np.uint16))
    assert (out["TP"], out["FP"], out["FN"]) == (300, 0, 100)
    assert out["F1"] == pytest.approx(2 * 0.75 / 1.75)
    assert instance_f1_dsc_tp((dropped > 0).astype(bool), gt)["TP"] == 300


def test_instance_empty_cases_follow_the_official_zeros():
    gt = cube((4, 4, 4), (1, 1, 1), 2)
    empty = np.zeros_like(gt)
    assert instance_f1_dsc_tp(empty, gt) == {"F1": 0.0, "DSC_TP": 0.0, "TP": 0, "FP": 0, "FN": 1}
    assert instance_f1_dsc_tp(gt, empty) == {"F1": 0.0, "DSC_TP": 0.0, "TP": 0, "FP": 1, "FN": 0}
    assert instance_f1_dsc_tp(empty, empty)["F1"] == 0.0


def test_instance_labels_with_gaps_and_large_ids():
    gt = cube((3, 8, 8), (0, 0, 0), 2, value=7)
    cube((3, 8, 8), (0, 4, 4), 2, value=100_000, out=gt)
    pred = np.where(gt == 7, 3, np.where(gt > 0, -5, 0))  # negative ids are ids too
    out = instance_f1_dsc_tp(pred, gt.astype(np.int64) << 33)
    assert (out["TP"], out["FP"], out["FN"]) == (2, 0, 0)


# ------------------------------------------------------------------------------------------ means


def test_nan_mean_skips_nan_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nan_mean([math.nan, 1.0, 3.0]) == 2.0
        assert math.isnan(nan_mean([]))
        assert math.isnan(nan_mean([math.nan, math.nan]))
