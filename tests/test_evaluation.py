"""``evaluate_folder`` and ``text3dsam eval`` on the shared challenge cases, against the official script's numbers.

Expected values come from running the organisers' unmodified ``CVPR25_text_eval.py`` (github.com/JunMa11/
CVPR-MedSegFMCompetition, commit 748e862, with its ``SurfaceDice.py``) in a separate venv (python 3.11,
numpy 1.26.3, scipy 1.12.0, connected-components-3d 3.12.4, pandas 2.2.1, scikit-image 0.26.0,
SimpleITK 2.5.7). Its docker steps were served by a stand-in ``docker`` on PATH that copied the prediction of
each input into ``./outputs`` (and a stub ``torch`` module, which the script imports only to call
``torch.cuda.empty_cache()``). Inputs: ``-i`` a folder with the challenge image npz files, ``-val_gts`` a
folder with ``CASE.npz`` links to ``CASE_gt.npz``, predictions ``/work/shared/reference/pred_segs/*.npz`` and
the microscopy predictions made by :func:`make_microscopy_predictions` below. The script rounds to 4 decimals.
For the ``zyx`` numbers it was given copies of the image files whose stored ``spacing`` was reversed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.errors import InputError, UsageError
from text3dsam_cli.evaluation import evaluate_folder, modality_of, summarize, write_csv
from text3dsam_cli.metrics import semantic_case_metrics

ROOT = Path(__file__).resolve().parents[1]
CHALLENGE = ROOT.parent / "shared" / "data" / "challenge"
PRED_SEGS = ROOT.parent / "shared" / "reference" / "pred_segs"
NIFTI = ROOT.parent / "shared" / "data" / "nifti" / "totalsegmentator"

CT = "CT_AMOS_amos_0018.npz"
MR = "MR_BraTS-T1c_bratsgli_0017.npz"
US = "US_Cardiac_patient0027_2CH_half_sequence.npz"
MICRO = "Microscopy_SELMA3D_patchvolume_nuclei_004_crop.npz"

# Official CVPR25_text_eval.py output (see the module docstring), spacing passed as stored (x, y, z).
OFFICIAL_XYZ = {
    CT: {"DSC": 0.0198, "NSD": 0.0174},
    MR: {"DSC": 0.0170, "NSD": 0.0844},
    US: {"DSC": 0.1116, "NSD": 0.2172},
    MICRO: {"F1": 0.3584, "DSC_TP": 0.8861},  # binary prediction: 246 six-connected components
}
# The same script on images whose stored spacing was reversed to (z, y, x): only NSD of anisotropic cases moves.
OFFICIAL_ZYX = {
    CT: {"DSC": 0.0198, "NSD": 0.0084},
    MR: {"DSC": 0.0170, "NSD": 0.0844},
    US: {"DSC": 0.1116, "NSD": 0.1690},
    MICRO: {"F1": 0.3584, "DSC_TP": 0.8861},
}
# The microscopy label-map prediction (several foreground values: used as instance ids, no components).
OFFICIAL_MICRO_LABELMAP = {"F1": 0.5806, "DSC_TP": 0.9844}

needs_data = pytest.mark.skipif(not (CHALLENGE.is_dir() and PRED_SEGS.is_dir()), reason="shared data missing")


def make_microscopy_predictions(gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic imperfect predictions made from an instance ground truth: (binary, instance label map).

    Every 3rd instance is missed, every 7th eroded once (6-connected), every 5th shifted by 2 voxels along
    the last axis (written only where no earlier instance is), plus 3x3x3 false positives in empty places.
    """
    gt = gt.astype(np.int32)
    labels = np.zeros(gt.shape, dtype=np.int32)
    struct = ndimage.generate_binary_structure(3, 1)
    for i, box in enumerate(ndimage.find_objects(gt), start=1):
        if box is None or i % 3 == 0:
            continue
        box = tuple(slice(max(0, s.start - 2), min(n, s.stop + 2)) for s, n in zip(box, gt.shape, strict=True))
        mask = gt[box] == i
        if i % 7 == 0:
            mask = ndimage.binary_erosion(mask, struct)
        if i % 5 == 0:
            shifted = np.zeros_like(mask)
            shifted[..., 2:] = mask[..., :-2]
            mask = shifted
        view = labels[box]
        view[mask & (view == 0)] = i
    next_id = int(gt.max()) + 1
    for z, y, x in ((2, 2, 2), (66, 46, 46), (130, 90, 10), (40, 88, 88), (100, 5, 90)):
        cube = (slice(z, z + 3), slice(y, y + 3), slice(x, x + 3))
        around = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in cube)
        if not gt[around].any() and not labels[around].any():
            labels[cube] = next_id
            next_id += 1
    return (labels > 0).astype(np.uint8), labels.astype(np.uint8)


def _micro_gt() -> np.ndarray:
    return np.load(CHALLENGE / MICRO.replace(".npz", "_gt.npz"))["gts"]


@pytest.fixture(scope="module")
def pred_dir(tmp_path_factory) -> Path:
    """The three reference predictions plus the binary microscopy prediction."""
    folder = tmp_path_factory.mktemp("preds")
    for name in (CT, MR, US):
        shutil.copy(PRED_SEGS / name, folder / name)
    binary, _ = make_microscopy_predictions(_micro_gt())
    np.savez_compressed(folder / MICRO, segs=binary)
    return folder


@pytest.fixture(scope="module")
def small_pred_dir(tmp_path_factory) -> Path:
    """MR and microscopy only (fast), for the CLI tests."""
    folder = tmp_path_factory.mktemp("small_preds")
    shutil.copy(PRED_SEGS / MR, folder / MR)
    binary, _ = make_microscopy_predictions(_micro_gt())
    np.savez_compressed(folder / MICRO, segs=binary)
    return folder


@pytest.fixture(scope="module")
def results_xyz(pred_dir) -> dict:
    return evaluate_folder(pred_dir, CHALLENGE)


def _assert_official(cases: dict, expected: dict) -> None:
    assert set(cases) == set(expected)
    for name, metrics in expected.items():
        assert set(cases[name]) == set(metrics), name
        for key, value in metrics.items():
            assert cases[name][key] == pytest.approx(value, abs=1e-4), (name, key)


@needs_data
def test_matches_official_script_xyz(results_xyz):
    _assert_official(results_xyz["cases"], OFFICIAL_XYZ)
    assert results_xyz["settings"]["spacing_order"] == "xyz"
    assert results_xyz["details"][CT]["spacing"] == pytest.approx([0.846, 0.846, 5.0])
    assert sorted(results_xyz["details"][MR]["per_class"]) == ["1", "2", "3", "4"]
    assert results_xyz["details"][MICRO]["type"] == "instance"
    assert (results_xyz["details"][MICRO]["TP"], results_xyz["details"][MICRO]["FP"]) == (81, 165)


@needs_data
def test_matches_official_script_zyx(pred_dir):
    results = evaluate_folder(pred_dir, CHALLENGE, spacing_order="zyx")
    _assert_official(results["cases"], OFFICIAL_ZYX)
    assert results["details"][CT]["spacing"] == pytest.approx([5.0, 0.846, 0.846])


@needs_data
def test_summary_per_modality_and_overall(results_xyz):
    summary = results_xyz["summary"]
    assert list(summary) == ["CT", "MR", "Microscopy", "US", "overall"]
    assert summary["Microscopy"] == {"cases": 1, "F1": results_xyz["cases"][MICRO]["F1"],
                                     "DSC_TP": results_xyz["cases"][MICRO]["DSC_TP"]}
    assert summary["overall"]["cases"] == 4
    expected = np.mean([results_xyz["cases"][c]["DSC"] for c in (CT, MR, US)])
    assert summary["overall"]["DSC"] == pytest.approx(expected)
    assert "DSC" not in summary["Microscopy"]


@needs_data
def test_microscopy_label_map_prediction(tmp_path):
    _, labels = make_microscopy_predictions(_micro_gt())
    np.savez_compressed(tmp_path / MICRO, segs=labels)
    cases = evaluate_folder(tmp_path, CHALLENGE)["cases"]
    _assert_official(cases, {MICRO: OFFICIAL_MICRO_LABELMAP})


@needs_data
def test_binary_prediction_with_more_than_254_components(tmp_path):
    # The crop's ground truth as a binary mask has 385 six-connected components. The official script adds
    # the component ids to a uint8 array, so they wrap at 256 and it reports F1 0.4816, DSC_TP 0.8588. Here
    # ids are int32: 176 of the 385 components match (IoU >= 0.5), 209 are false positives, 30 gt missed.
    gt = _micro_gt()
    np.savez_compressed(tmp_path / MICRO, segs=(gt > 0).astype(np.uint8))
    results = evaluate_folder(tmp_path, CHALLENGE)
    details = results["details"][MICRO]
    assert (details["TP"], details["FP"], details["FN"]) == (176, 209, 30)
    assert results["cases"][MICRO]["F1"] == pytest.approx(2 * 176 / (2 * 176 + 209 + 30))
    assert results["cases"][MICRO]["DSC_TP"] == pytest.approx(0.8980, abs=1e-4)


@needs_data
def test_images_folder_and_gt_only_folder(tmp_path, small_pred_dir):
    gts = tmp_path / "gts"
    gts.mkdir()
    for name in (MR, MICRO):
        gt_name = name.replace(".npz", "_gt.npz")
        (gts / gt_name).symlink_to(CHALLENGE / gt_name)
    cases = evaluate_folder(small_pred_dir, gts, images_dir=CHALLENGE)["cases"]
    _assert_official(cases, {MR: OFFICIAL_XYZ[MR], MICRO: OFFICIAL_XYZ[MICRO]})
    # without the images the instance flag is unknown: the microscopy case is scored as semantic and the
    # crop's ground truth has no spacing
    failed = evaluate_folder(small_pred_dir, gts)["failed"]
    assert any("spacing" in reason for reason in failed.values())


# ------------------------------------------------------------------------------------------ CLI

runner = CliRunner()


@needs_data
def test_cli_json_to_stdout_and_csv(small_pred_dir, tmp_path):
    csv_path = tmp_path / "out" / "metrics.csv"
    result = runner.invoke(app, ["eval", "--pred", str(small_pred_dir), "--gt", str(CHALLENGE), "--json", "-",
                                 "--csv", str(csv_path), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    _assert_official(data["cases"], {MR: OFFICIAL_XYZ[MR], MICRO: OFFICIAL_XYZ[MICRO]})
    assert data["summary"]["overall"]["cases"] == 2
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "CaseName,DSC,NSD,F1,DSC_TP"
    assert rows[1].startswith(f"{MR},0.01") and rows[1].endswith(",,")
    assert rows[2].startswith(f"{MICRO},,,0.358")


@needs_data
def test_cli_table_on_stderr_and_json_file(small_pred_dir, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "--pred", str(small_pred_dir), "--gt", str(CHALLENGE), "--json", str(out),
                                 "--spacing-order", "zyx"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "overall" in result.stderr and "0.0844" in result.stderr and "0.8861" in result.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["spacing_order"] == "zyx"
    assert data["cases"][MR]["NSD"] == pytest.approx(OFFICIAL_ZYX[MR]["NSD"], abs=1e-4)


def test_cli_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["eval", "--pred", str(empty), "--gt", str(tmp_path)])
    assert result.exit_code == 1
    assert "no predictions" in result.stderr and str(empty) in result.stderr
    result = runner.invoke(app, ["eval", "--pred", str(empty), "--gt", str(tmp_path), "--spacing-order", "yxz"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["eval", "--gt", str(tmp_path)])
    assert result.exit_code == 2


# ------------------------------------------------------------------------------------ input errors


def _write(path: Path, **arrays) -> Path:
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    return pred, gt


def test_missing_ground_truth(folders):
    pred, gt = folders
    _write(pred / "CT_x.npz", segs=np.zeros((2, 2, 2), np.uint8))
    failed = evaluate_folder(pred, gt)["failed"]
    assert "no ground truth" in failed["CT_x.npz"] and failed["CT_x.npz"].startswith(str(pred / "CT_x.npz"))


def test_shape_mismatch(folders):
    pred, gt = folders
    _write(pred / "CT_x.npz", segs=np.zeros((2, 2, 2), np.uint8))
    _write(gt / "CT_x_gt.npz", gts=np.zeros((2, 2, 3), np.uint8), spacing=np.ones(3))
    failed = evaluate_folder(pred, gt)["failed"]
    assert "shape" in failed["CT_x.npz"] and failed["CT_x.npz"].startswith(str(pred / "CT_x.npz"))


def test_missing_keys(folders):
    pred, gt = folders
    _write(pred / "CT_x.npz", seg=np.zeros((2, 2, 2), np.uint8))
    _write(gt / "CT_x.npz", gts=np.zeros((2, 2, 2), np.uint8))
    failed = evaluate_folder(pred, gt)["failed"]
    assert "'segs'" in failed["CT_x.npz"] and failed["CT_x.npz"].startswith(str(pred / "CT_x.npz"))
    _write(pred / "CT_x.npz", segs=np.zeros((2, 2, 2), np.uint8))
    _write(gt / "CT_x.npz", labels=np.zeros((2, 2, 2), np.uint8))
    failed = evaluate_folder(pred, gt)["failed"]
    assert "'gts'" in failed["CT_x.npz"] and failed["CT_x.npz"].startswith(str(gt / "CT_x.npz"))


def test_missing_image_and_bad_folders(folders, tmp_path):
    pred, gt = folders
    _write(pred / "CT_x.npz", segs=np.zeros((2, 2, 2), np.uint8))
    _write(gt / "CT_x_gt.npz", gts=np.zeros((2, 2, 2), np.uint8))
    assert "no image file" in evaluate_folder(pred, gt, images_dir=tmp_path)["failed"]["CT_x.npz"]
    with pytest.raises(InputError, match="does not exist"):
        evaluate_folder(tmp_path / "nope", gt)
    with pytest.raises(InputError, match="no predictions"):
        evaluate_folder(gt / "..", gt)  # only folders in it
    with pytest.raises(UsageError):
        evaluate_folder(pred, gt, spacing_order="xzy")


def test_float_labels_and_labels_json(folders, tmp_path):
    pred, gt = folders
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[3:5, 3:5, 3:5] = 2
    _write(pred / "MR_a.npz", segs=labels.astype(np.float32))
    _write(gt / "MR_a_gt.npz", gts=labels, spacing=np.array([1.0, 1.0, 2.0]))
    results = evaluate_folder(pred, gt)
    assert results["cases"]["MR_a.npz"] == {"DSC": 1.0, "NSD": 1.0}
    assert sorted(results["details"]["MR_a.npz"]["per_class"]) == ["1", "2"]  # all gt labels by default
    # a labels JSON naming only absent classes leaves nothing to evaluate: NaN, skipped by the summary
    (tmp_path / "labels.json").write_text(json.dumps({"7": "kidney"}))
    _write(pred / "MR_b.npz", segs=labels)
    _write(gt / "MR_b_gt.npz", gts=np.where(labels == 2, 7, 0).astype(np.uint8), spacing=np.ones(3))
    results = evaluate_folder(pred, gt, labels_json=tmp_path / "labels.json")
    assert math.isnan(results["cases"]["MR_a.npz"]["DSC"])
    assert results["cases"]["MR_b.npz"]["DSC"] == 0.0
    assert results["summary"]["MR"] == {"cases": 2, "DSC": 0.0, "NSD": 0.0}
    write_csv(results, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[1] == "MR_a.npz,,,,"
    (tmp_path / "bad.json").write_text('{"liver": 1}')
    with pytest.raises(InputError, match="not an integer"):
        evaluate_folder(pred, gt, labels_json=tmp_path / "bad.json")


def test_summary_and_modality_helpers():
    assert modality_of("PET_autoPET_x.npz") == "PET"
    assert modality_of("case1.nii.gz") == "other"
    summary = summarize({"CT_a.npz": {"DSC": math.nan, "NSD": math.nan}, "CT_b.npz": {"DSC": 0.5, "NSD": 0.25}})
    assert summary["CT"] == {"cases": 2, "DSC": 0.5, "NSD": 0.25}
    all_nan = summarize({"CT_a.npz": {"DSC": math.nan, "NSD": math.nan}})
    assert math.isnan(all_nan["overall"]["DSC"])


# ----------------------------------------------------------------------------------------- NIfTI


@pytest.mark.skipif(not NIFTI.is_dir(), reason="shared NIfTI data missing")
def test_nifti_pairs(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    image = sitk.ReadImage(str(NIFTI / "example_seg.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    shifted = np.roll(array, 1, axis=2)  # one voxel along x
    out = sitk.GetImageFromArray(shifted)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(pred / "ct_case.nii.gz"))
    shutil.copy(NIFTI / "example_seg.nii.gz", gt / "ct_case.nii.gz")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "spleen", "5": "liver"}))
    results = evaluate_folder(pred, gt, labels_json=labels)
    case = results["cases"]["ct_case.nii.gz"]
    expected = semantic_case_metrics(shifted, array, [1, 5], image.GetSpacing())
    assert case == {"DSC": pytest.approx(expected["DSC"]), "NSD": pytest.approx(expected["NSD"])}
    assert 0.5 < case["DSC"] < 1
    assert list(results["summary"]) == ["ct", "overall"]
    # without labels every label in the ground truth is scored
    every = evaluate_folder(pred, gt)["details"]["ct_case.nii.gz"]["per_class"]
    assert len(every) == len(np.unique(array)) - 1


def test_nifti_instance_case_from_labels_json(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    truth = np.zeros((4, 10, 10), np.uint16)
    truth[1:3, 1:3, 1:3], truth[1:3, 6:8, 6:8] = 300, 301
    for folder, array in ((gt, truth), (pred, (truth == 300).astype(np.uint8))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.5, 0.5, 2.0))
        sitk.WriteImage(image, str(folder / "Microscopy_n.nii.gz"))
    (tmp_path / "labels.json").write_text(json.dumps({"1": "nucleus", "instance_label": 1}))
    results = evaluate_folder(pred, gt, labels_json=tmp_path / "labels.json")
    assert results["cases"]["Microscopy_n.nii.gz"] == {"F1": pytest.approx(2 / 3), "DSC_TP": 1.0}
    (tmp_path / "labels.json").write_text(json.dumps({"1": "nucleus", "instance_label": "yes"}))
    with pytest.raises(InputError, match="instance_label"):
        evaluate_folder(pred, gt, labels_json=tmp_path / "labels.json")


def _nifti_pair(folders, gt_array: np.ndarray) -> tuple[Path, Path]:
    """The TotalSegmentator example segmentation as prediction, ``gt_array`` on its grid as ground truth."""
    pred, gt = folders
    source = sitk.ReadImage(str(NIFTI / "example_seg.nii.gz"))
    sitk.WriteImage(source, str(pred / "case.nii.gz"))
    image = sitk.GetImageFromArray(gt_array)
    image.CopyInformation(source)
    sitk.WriteImage(image, str(gt / "case.nii.gz"))
    return pred, gt


@pytest.mark.parametrize("value", [2_000_000_000, -5, 1 << 24, 4_000_000_000])
def test_ground_truth_label_out_of_range_is_named(folders, value):
    """The issue's probe: values like 2,000,000,000 or -5 said "out of memory" (or scored silently)."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(NIFTI / "example_seg.nii.gz"))).astype(np.int64)
    labels[labels == 5] = value
    dtype = np.uint32 if value > 2**31 - 1 else np.int32
    pred, gt = _nifti_pair(folders, labels.astype(dtype))
    result = runner.invoke(app, ["eval", "--pred", str(pred), "--gt", str(gt)])
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"{gt / 'case.nii.gz'}: label value out of range: the ground truth holds {value}" in output, output
    assert "out of memory" not in output and "Traceback" not in output
    npz_pred, npz_gt = folders[0] / "CT_x.npz", folders[1] / "CT_x_gt.npz"
    _write(npz_pred, segs=np.zeros((2, 2, 2), np.uint8))
    _write(npz_gt, gts=np.full((2, 2, 2), value, dtype), spacing=np.ones(3))
    failed = evaluate_folder(*folders)["failed"]["CT_x.npz"]
    assert failed.startswith(f"{npz_gt}: label value out of range: 'gts' holds {value}"), failed


def test_ground_truth_with_nan_says_so(folders):
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(NIFTI / "example_seg.nii.gz"))).astype(np.float32)
    labels[3, 40, 50] = np.nan
    pred, gt = _nifti_pair(folders, labels)
    failed = evaluate_folder(pred, gt)["failed"]["case.nii.gz"]
    assert failed == f"{gt / 'case.nii.gz'}: the ground truth holds NaN values: a label map holds whole numbers " \
                     "0..16777215"
    _write(folders[0] / "CT_x.npz", segs=np.zeros((2, 2, 2), np.uint8))
    _write(folders[1] / "CT_x_gt.npz", gts=np.full((2, 2, 2), np.nan, np.float32), spacing=np.ones(3))
    assert "'gts' holds NaN values" in evaluate_folder(*folders)["failed"]["CT_x.npz"]


@needs_data
@pytest.mark.parametrize("case", [CT, US])
def test_anisotropic_nifti_pair_scores_as_the_official_script(tmp_path, case):
    """A NIfTI pair on an anisotropic grid (CT 0.846 x 0.846 x 5 mm; US 1.232 x 1.232 x 1 mm) scores what the
    organisers' script gave for the same arrays and spacing as challenge npz (OFFICIAL_XYZ): the NIfTI path reads
    the spacing from the header in the right order."""
    from text3dsam_cli.io import read_text_prompts

    stem = case[: -len(".npz")]
    spacing = [float(s) for s in np.load(CHALLENGE / case)["spacing"]]  # x, y, z
    assert max(spacing) / min(spacing) > 1.2
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    arrays = {pred: np.load(PRED_SEGS / case)["segs"], gt: np.load(CHALLENGE / f"{stem}_gt.npz")["gts"]}
    for folder, array in arrays.items():
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(folder / f"{stem}.nii.gz"))
    prompts = read_text_prompts(CHALLENGE / case)
    (tmp_path / "labels.json").write_text(json.dumps(prompts))
    results = evaluate_folder(pred, gt, labels_json=tmp_path / "labels.json")
    assert results["details"][f"{stem}.nii.gz"]["spacing"] == pytest.approx(spacing)
    _assert_official({case: results["cases"][f"{stem}.nii.gz"]}, {case: OFFICIAL_XYZ[case]})
