"""Intensity preprocessing: CT windows, percentile normalisation and the modality decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from text3dsam_cli.errors import UsageError
from text3dsam_cli.io.readers import read_volume
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.preprocess import (
    normalize_intensity,
    parse_window,
    percentile_normalize,
    resolve_modality,
    window_ct,
)

DATA = Path(__file__).parents[1].parent / "shared" / "data"


def _vol(values, modality: str | None = None, source_format: str = "nifti", name: str = "x.nii.gz") -> Volume:
    array = np.asarray(values)
    if array.ndim == 1:
        array = array.reshape(1, 1, -1)
    return Volume(array, path=Path(name), source_format=source_format, modality=modality)


# --- CT windows (worked out by hand) ----------------------------------------------------------------------


def test_soft_tissue_window() -> None:
    # L40 W400 -> [-160, 240]; 255 / 400 = 0.6375 per HU
    volume = _vol(np.array([-1000, -160, -60, 40, 240, 3000], np.int16), "CT")
    out = normalize_intensity(volume)
    np.testing.assert_allclose(out.ravel(), [0, 0, 63.75, 127.5, 255, 255], atol=1e-4)
    assert out.dtype == np.float32


def test_lung_window() -> None:
    # L-600 W1500 -> [-1350, 150]
    volume = _vol(np.array([-2000, -1350, -600, 0, 150], np.int16), "CT")
    out = normalize_intensity(volume, window="lung")
    np.testing.assert_allclose(out.ravel(), [0, 0, 127.5, 229.5, 255], atol=1e-4)


def test_bone_window() -> None:
    # L500 W1500 -> [-250, 1250]
    volume = _vol(np.array([-250, 0, 500, 1250], np.float32), "CT")
    out = normalize_intensity(volume, window="bone")
    np.testing.assert_allclose(out.ravel(), [0, 42.5, 127.5, 255], atol=1e-4)


def test_custom_window() -> None:
    volume = _vol(np.array([0, 50, 100], np.int16), "CT")
    np.testing.assert_allclose(normalize_intensity(volume, window="50,100").ravel(), [0, 127.5, 255], atol=1e-4)
    np.testing.assert_allclose(normalize_intensity(volume, window=(50, 100)).ravel(), [0, 127.5, 255], atol=1e-4)
    assert parse_window(" -600 , 1500 ") == (-600.0, 1500.0)
    assert parse_window("soft_tissue") == (40.0, 400.0)


@pytest.mark.parametrize("window", ["brain", "40", "40,0", "40,-10", "a,b", ""])
def test_bad_window(window: str) -> None:
    with pytest.raises(UsageError, match="window"):
        normalize_intensity(_vol(np.array([0, 1], np.int16), "CT"), window=window)


def test_window_leaves_input_untouched() -> None:
    array = np.array([-500.0, 0.0, 500.0], np.float32).reshape(1, 1, 3)
    copy = array.copy()
    out = window_ct(array, 40, 400)
    assert np.array_equal(array, copy)
    assert out is not array


# --- percentile normalisation ----------------------------------------------------------------------------


def test_percentiles_by_hand() -> None:
    # positives 1..201: numpy's linear percentile of 201 sorted values at q is value[q/100 * 200],
    # so 0.5% -> value[1] = 2 and 99.5% -> value[199] = 200; scale 255 / 198
    values = np.concatenate([np.zeros(50), np.arange(1, 202)]).astype(np.int16)
    volume = _vol(values, "MR")
    out = normalize_intensity(volume).ravel()
    assert np.all(out[:50] == 0)  # zeros stay zero
    lookup = dict(zip(values[50:].tolist(), out[50:].tolist(), strict=True))
    assert lookup[1] == 0 and lookup[2] == 0
    assert lookup[101] == pytest.approx(99 * 255 / 198, abs=1e-4)
    assert lookup[200] == pytest.approx(255) and lookup[201] == pytest.approx(255)
    assert out.min() == 0 and out.max() == pytest.approx(255)


def test_negative_values_end_up_zero() -> None:
    values = np.array([-5.0, 0.0, 1.0, 2.0, 3.0], np.float32)
    out = percentile_normalize(values.reshape(1, 1, 5)).ravel()
    # positives 1, 2, 3: 0.5% -> 1 + 0.01 * 1 = 1.01; 99.5% -> 2 + 0.99 * 1 = 2.99
    low, high = 1.01, 2.99
    np.testing.assert_allclose(out, [0, 0, 0, (2 - low) / (high - low) * 255, 255], atol=1e-3)


def test_no_positive_voxels_gives_zeros() -> None:
    out = normalize_intensity(_vol(np.array([0, -3, 0], np.int16), "MR"))
    assert out.dtype == np.float32 and not out.any()


def test_constant_foreground() -> None:
    out = normalize_intensity(_vol(np.array([0, 7, 7, 7], np.uint16), "PT")).ravel()
    np.testing.assert_array_equal(out, [0, 255, 255, 255])


def test_percentile_on_real_mr_volume() -> None:
    volume = read_volume(DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz")
    out = normalize_intensity(volume)
    positive = volume.array[volume.array > 0]
    low, high = np.percentile(positive, [0.5, 99.5])
    assert out.dtype == np.float32 and out.shape == volume.shape
    assert out.min() == 0 and out.max() == pytest.approx(255)
    assert np.all(out[volume.array <= low] == 0)
    assert np.all(out[volume.array >= high] == pytest.approx(255))


# --- npz and modality decisions ---------------------------------------------------------------------------


def test_npz_is_unchanged() -> None:
    volume = read_volume(DATA / "challenge" / "CT_AMOS_amos_0018.npz")
    out = normalize_intensity(volume, modality="CT", window="lung")  # already normalised: window ignored
    assert out.dtype == np.float32
    assert np.array_equal(out, volume.array.astype(np.float32))
    decision = resolve_modality(volume)
    assert (decision.modality, decision.source, decision.normalization) == ("CT", "npz", "none")


@pytest.mark.parametrize(("name", "modality"), [("MR_BraTS-T1c_bratsgli_0017.npz", "MR"),
                                                ("US_Cardiac_patient0027_2CH_half_sequence.npz", "US"),
                                                ("Microscopy_SELMA3D_patchvolume_nuclei_004_crop.npz",
                                                 "MICROSCOPY"),
                                                ("case.npz", None)])
def test_npz_modality_from_name(name: str, modality: str | None) -> None:
    volume = _vol(np.zeros(3, np.uint8), source_format="npz", name=name)
    assert resolve_modality(volume).modality == modality


def test_override_wins() -> None:
    volume = _vol(np.array([-1000, 0, 100], np.int16), modality="MR")
    decision = resolve_modality(volume, "ct")
    assert (decision.modality, decision.source, decision.normalization) == ("CT", "override", "ct_window")
    assert resolve_modality(volume, "MRI").modality == "MR"
    assert resolve_modality(volume, "pet").modality == "PT"


def test_dicom_tag_used() -> None:
    decision = resolve_modality(_vol(np.array([0, 10], np.int16), modality="CT"))
    assert (decision.modality, decision.source, decision.normalization) == ("CT", "dicom", "ct_window")
    decision = resolve_modality(_vol(np.array([-2000, 10], np.int16), modality="MR"))
    assert (decision.modality, decision.source, decision.normalization) == ("MR", "dicom", "percentile")


def test_heuristic_on_real_data() -> None:
    ct = resolve_modality(read_volume(DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"))
    assert (ct.modality, ct.source, ct.normalization) == ("CT", "heuristic", "ct_window")
    assert "-500" in ct.detail
    mr = resolve_modality(read_volume(DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz"))
    assert (mr.modality, mr.source, mr.normalization) == ("MR", "heuristic", "percentile")
    nrrd = resolve_modality(read_volume(DATA / "extra" / "pyradiomics" / "brain1_image.nrrd"))
    assert nrrd.normalization == "percentile"


def test_heuristic_threshold_edges() -> None:
    assert resolve_modality(_vol(np.array([-501, 0], np.int16))).modality == "CT"
    assert resolve_modality(_vol(np.array([-500, 0], np.int16))).modality == "MR"


def test_real_dicom_ct_soft_tissue() -> None:
    volume = read_volume(DATA / "dicom" / "totalsegmentator_ct" / "dicom")
    out = normalize_intensity(volume)
    hu = volume.array.astype(np.float32)
    expected = (np.clip(hu, -160, 240) + 160) * (255 / 400)
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_in_place_normalisation_reuses_a_float32_array_only_when_allowed():
    from text3dsam_cli.pipeline import prepare_scan

    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, size=(6, 7, 8)).astype(np.float32)
    for modality in ("CT", "MR"):
        kept = Volume(hu.copy(), modality=modality, source_format="nifti")
        copied = prepare_scan(kept, orientation="native").image
        assert np.array_equal(kept.array, hu)  # default: the caller's array is untouched
        owned = Volume(hu.copy(), modality=modality, source_format="nifti")
        reused = prepare_scan(owned, orientation="native", in_place=True).image
        assert np.shares_memory(reused, owned.array) and np.array_equal(reused, copied)
    ints = Volume(hu.astype(np.int16), modality="CT", source_format="nifti")
    image = prepare_scan(ints, orientation="native", in_place=True).image
    assert image.dtype == np.float32 and not np.shares_memory(image, ints.array)
    assert np.array_equal(ints.array, hu.astype(np.int16))


@pytest.mark.parametrize("layout", ["float32", "int16", "float64", "view"])
def test_slab_wise_mapping_equals_whole_array_passes(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import text3dsam_cli.preprocess as pre

    monkeypatch.setattr(pre, "SLAB_VALUES", 7 * 9 * 2)  # several slabs of two rows, shared by two threads
    rng = np.random.default_rng(3)
    source = rng.normal(0, 700, size=(23, 7, 9))
    source = {"float32": source.astype(np.float32), "int16": source.astype(np.int16), "float64": source,
              "view": source.astype(np.float32)[::-1, :, ::2]}[layout]

    def whole(low: float, high: float) -> np.ndarray:  # one pass per operation over the whole array
        out = source.astype(np.float32)
        np.clip(out, low, high, out=out)
        out -= np.float32(low)
        out *= np.float32(255.0 / (high - low))
        return out

    before = source.copy()
    assert np.array_equal(window_ct(source, 40, 400), whole(-160.0, 240.0))
    positive = source[source > 0]
    low, high = (float(v) for v in np.percentile(positive, (0.5, 99.5)))
    assert np.array_equal(percentile_normalize(source), whole(low, high))
    assert np.array_equal(source, before)  # not in place: the input is untouched
    if layout == "float32":
        expected = whole(-160.0, 240.0)
        assert window_ct(source, 40, 400, in_place=True) is source and np.array_equal(source, expected)
