"""Orientation codes and pure permutation/flip reorientation: codes, round trips, same physical voxels."""

from __future__ import annotations

import itertools
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA

from text3dsam_cli.errors import UsageError
from text3dsam_cli.io import read_volume, volume_to_image
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.orientation import (
    DEFAULT_ORIENTATION,
    check_code,
    check_request,
    check_table,
    closest_code,
    model_table,
    reorient,
    reorientation,
)

ALL_CODES = ["".join(letters) for perm in itertools.permutations(["LR", "PA", "SI"])
             for letters in itertools.product(*perm)]
NIFTI = DATA / "nifti" / "totalsegmentator"
D2N = DATA / "dicom" / "dicom2nifti"
REAL = [NIFTI / "example_ct_sm.nii.gz", NIFTI / "example_mr_sm.nii.gz",
        *sorted(D2N.glob("*/001_ground_truth*.nii.gz"))]


def test_all_48_codes_and_bad_codes() -> None:
    assert len(ALL_CODES) == 48 and len(set(ALL_CODES)) == 48
    assert all(check_code(code.lower()) == code for code in ALL_CODES)
    for bad in ["", "LA", "LASI", "LLS", "LRS", "XYZ", "PAS", "SIL"[:2] + "x"]:
        with pytest.raises(UsageError, match="orientation code"):
            check_code(bad)
    assert check_request("AUTO") == "auto" and check_request("native") == "native"
    assert check_request(" ras ") == "RAS"


def test_tables() -> None:
    assert model_table(None) == DEFAULT_ORIENTATION == {"CT": "LAS", "PT": "LAS", "MR": "LPS"}
    assert model_table({"mode": "whole"}) == DEFAULT_ORIENTATION
    assert model_table({"orientation": {"mri": "ras", "PET": "lps"}}) == {"MR": "RAS", "PT": "LPS"}
    assert model_table({"orientation": {}}) == {}
    with pytest.raises(UsageError, match="CT"):
        check_table({"CT": "LAX"})


def test_identity_is_lps_and_codes_agree_with_simpleitk_and_nibabel() -> None:
    assert closest_code(np.eye(3).ravel()) == "LPS"
    for path in REAL:
        volume = read_volume(path)
        nib_code = "".join(nib.aff2axcodes(nib.load(str(path)).affine))
        itk_code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(volume.direction)
        assert closest_code(volume.direction) == nib_code == itk_code, path


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _world_points(volume: Volume) -> np.ndarray:
    """(z, y, x, 3) LPS point of every voxel centre."""
    z, y, x = np.indices(volume.shape)
    index = np.stack([x, y, z], axis=-1).astype(np.float64)
    matrix = np.asarray(volume.direction).reshape(3, 3)
    return np.asarray(volume.origin) + (index * np.asarray(volume.spacing)) @ matrix.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_target_keeps_each_voxel_at_its_physical_point(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (3, 4, 5)  # all axes differ: a mixed-up permutation cannot pass
    direction = _rotation(seed) if seed else np.eye(3)[:, [2, 0, 1]] * [1, -1, 1]
    volume = Volume(rng.integers(0, 1000, shape).astype(np.int16), spacing=(0.7, 1.1, 2.5),
                    origin=tuple(rng.uniform(-100, 100, 3)), direction=tuple(direction.ravel()))
    before = {tuple(np.round(p, 6)): v for p, v in zip(_world_points(volume).reshape(-1, 3), volume.array.ravel())}
    for target in ALL_CODES:
        moved, change = reorient(volume, target)
        assert closest_code(moved.direction) == target
        assert np.shares_memory(moved.array, volume.array) or change.is_identity
        after = {tuple(np.round(p, 6)): v for p, v in zip(_world_points(moved).reshape(-1, 3),
                                                           moved.array.ravel())}
        assert after == before, target
        # exact inverse, for label maps and for (K, z, y, x) probabilities
        assert np.array_equal(change.undo(moved.array), volume.array)
        probs = rng.random((2, *moved.shape)).astype(np.float16)
        assert np.array_equal(change.apply(change.undo(probs)), probs)


@pytest.mark.parametrize("target", ["LPS", "LAS", "RAS", "PSR", "IRA", "ASL"])
def test_matches_simpleitk_dicomorient_on_real_scans(target: str) -> None:
    for path in [*REAL[:2], D2N / "hitachi_anatomical_001" / "dicom"]:  # RAS CT, LPS MR, oblique MR
        volume = read_volume(path)
        moved, change = reorient(volume, target)
        expected = sitk.DICOMOrient(volume_to_image(volume), target)
        assert np.array_equal(moved.array, sitk.GetArrayFromImage(expected))
        np.testing.assert_allclose(moved.spacing, expected.GetSpacing(), atol=1e-9)
        np.testing.assert_allclose(moved.origin, expected.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(moved.direction, expected.GetDirection(), atol=1e-9)
        assert change.source == closest_code(volume.direction)


def test_oblique_gets_closest_code_and_keeps_its_exact_direction() -> None:
    volume = read_volume(D2N / "hitachi_anatomical_001" / "dicom")
    assert closest_code(volume.direction) == "PIR"
    moved, _ = reorient(volume, "LPS")
    matrix = np.asarray(moved.direction).reshape(3, 3)
    assert not np.allclose(np.abs(matrix), np.eye(3), atol=0.1)  # still oblique: nothing was resampled
    assert np.all(np.diag(matrix) > 0.5) and closest_code(moved.direction) == "LPS"


def test_shape_checks_and_identity() -> None:
    change = reorientation(np.eye(3).ravel(), (2, 3, 4), "LPS")
    assert change.is_identity and change.output_shape == (2, 3, 4)
    array = np.zeros((2, 3, 4))
    assert change.apply(array) is array and change.undo(array) is array
    change = reorientation(np.eye(3).ravel(), (2, 3, 4), "SPL")
    assert change.output_shape == (4, 3, 2)
    with pytest.raises(ValueError):
        change.apply(np.zeros((4, 3, 2)))
    with pytest.raises(ValueError):
        change.undo(np.zeros((2, 3, 4)))


@pytest.mark.parametrize("seed", [0, 1])
def test_grid_reorientation_equals_nearest_resampling(seed: int) -> None:
    """eval's alignment rule: the permutation/flip onto another storage of the same voxels is exactly what
    SimpleITK's nearest-neighbour resampling onto that grid gives; any other grid gets None."""
    from text3dsam_cli.orientation import grid_reorientation

    rng = np.random.default_rng(seed)
    direction = np.eye(3)[:, [2, 0, 1]] * [1, -1, 1] if seed else np.eye(3)
    volume = Volume(rng.integers(0, 1000, (3, 4, 5)).astype(np.int32), spacing=(0.7, 1.1, 2.5),
                    origin=tuple(rng.uniform(-100, 100, 3)), direction=tuple(direction.ravel()))
    for target in ALL_CODES:
        moved, _ = reorient(volume, target)
        change = grid_reorientation(volume, moved)
        assert change is not None and change.output_shape == moved.shape
        ours = change.apply(volume.array)
        resampled = sitk.GetArrayFromImage(sitk.Resample(volume_to_image(volume), volume_to_image(moved),
                                                         sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        assert np.array_equal(ours, moved.array) and np.array_equal(ours, resampled), target
    shifted = Volume(volume.array, volume.spacing, tuple(np.add(volume.origin, (0.3, 0, 0))), volume.direction)
    finer = Volume(volume.array, (0.35, 1.1, 2.5), volume.origin, volume.direction)
    assert grid_reorientation(volume, shifted) is None and grid_reorientation(volume, finer) is None


# ----------------------------------------------------------------- the default table against the training data

CHALLENGE = DATA / "challenge"


def _organ_centroids(case: str, names: dict[str, str]) -> dict[str, np.ndarray]:
    """(z, y, x) centroid of each named organ in a challenge case's ground truth; the label ids are looked up by
    the organ's name in the case's own ``text_prompts``."""
    from text3dsam_cli.io import read_challenge_npz

    prompts = read_challenge_npz(CHALLENGE / f"{case}.npz").meta["text_prompts"]
    gts = np.load(CHALLENGE / f"{case}_gt.npz")["gts"]
    found = {}
    for organ, phrase in names.items():
        ids = [int(k) for k, text in prompts.items()
               if k != "instance_label" and re.search(rf"\b{phrase}\b", str(text).lower())]
        assert len(ids) == 1, (organ, ids)
        found[organ] = np.argwhere(gts == ids[0]).mean(0)
    return found


def test_ct_entry_is_the_amos_training_order() -> None:
    """CT -> LAS read off the AMOS case's ground truth: x grows to the patient's left (spleen, left kidney), y to
    anterior (gallbladder and stomach in front of the kidneys), z to superior (bladder below the oesophagus)."""
    c = _organ_centroids("CT_AMOS_amos_0018", {
        "spleen": "spleen", "liver": "liver", "right kidney": "right kidney", "left kidney": "left kidney",
        "gallbladder": "gallbladder", "stomach": "stomach", "bladder": "bladder", "esophagus": "esophagus"})
    z, y, x = 0, 1, 2
    x_letter = "L" if c["spleen"][x] > c["liver"][x] and c["left kidney"][x] > c["right kidney"][x] else "R"
    kidneys = (c["left kidney"][y] + c["right kidney"][y]) / 2
    y_letter = "A" if min(c["gallbladder"][y], c["stomach"][y]) > kidneys else "P"
    z_letter = "S" if c["bladder"][z] < c["esophagus"][z] else "I"
    assert c["spleen"][x] - c["liver"][x] > 100 and c["gallbladder"][y] - kidneys > 40  # far from a tie
    assert c["esophagus"][z] - c["bladder"][z] > 30
    assert DEFAULT_ORIENTATION["CT"] == x_letter + y_letter + z_letter == "LAS"


def test_mr_entry_agrees_with_the_brats_training_order() -> None:
    """MR -> LPS against the BraTS case: z grows to superior (the brain's cross-section shrinks towards the
    vertex), and y is the front-back axis (the brain is longer along y than along x). The signs of x and y
    cannot be read robustly from one skull-stripped, nearly symmetric brain with a tumour and a resection cavity;
    L and P follow BraTS's standard storage (SRI-24, nibabel affine diag(-1, -1, 1)), see docs/formats.md."""
    from text3dsam_cli.io import read_challenge_npz

    brain = read_challenge_npz(CHALLENGE / "MR_BraTS-T1c_bratsgli_0017.npz").array > 20
    area = brain.sum((1, 2))
    top, bottom = area[-5:].mean(), area[:15].max()
    assert top < 0.5 * bottom  # the vertex is at high z
    ys, xs = np.nonzero(brain[brain.shape[0] // 3])
    length, width = np.ptp(ys), np.ptp(xs)
    assert length > 1.1 * width  # y runs front to back, x left to right
    code = DEFAULT_ORIENTATION["MR"]
    assert code[2] == "S" and code[1] in "AP" and code[0] in "LR"
    assert code == "LPS"
