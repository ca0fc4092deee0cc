"""Score a folder of predictions against ground truth with the challenge's metrics (DSC, NSD, F1, DSC_TP).

:func:`evaluate_folder` pairs each prediction with its ground truth, finds each case's spacing, prompted
classes and instance flag, and calls :mod:`text3dsam_cli.metrics`. Two layouts are understood:

* **Challenge npz**: ``PRED/CASE.npz`` (key ``segs``) with ``GT/CASE_gt.npz`` or ``GT/CASE.npz`` (key
  ``gts``). Spacing, prompts (``text_prompts``: the prompted class ids and ``instance_label``) come from the
  image ``IMAGES/CASE.npz``; without ``images_dir`` from the ground-truth file when it holds them, else from
  ``GT/CASE.npz`` when that is the image (the challenge folder keeps ``CASE.npz`` and ``CASE_gt.npz`` side
  by side). Without prompts the classes come from ``labels_json``, else from the labels in the ground truth.
* **Label images** (every label-map format of :mod:`text3dsam_cli.io.formats` that stores geometry: NIfTI
  ``.nii.gz``/``.nii``, ``.nrrd``, ``.mha``): ``PRED/CASE.nii.gz`` with
  ``GT/CASE.nii.gz`` (or ``GT/CASE_gt.nii.gz``); spacing from the ground truth's header; classes from
  ``labels_json`` (``{"1": "liver", ...}``, an ``"instance_label": 1`` entry makes the cases instance
  cases) or all labels in the ground truth; semantic unless the JSON says otherwise.

**Spacing order.** The challenge stores ``spacing`` as (x, y, z) while arrays are (z, y, x), and the
official script passes the stored vector unchanged, so the 5 mm slice thickness of a CT acts along x.
``spacing_order="xyz"`` (default) reproduces that; ``"zyx"`` reverses the stored vector so that each value
meets its own array axis (physically right; changes NSD of anisotropic cases). NIfTI headers are (x, y, z)
too and are treated the same way.

Results hold plain floats; NaN marks a case without any evaluable class (a semantic case whose prompted
classes are all absent from the ground truth). Summaries average per metric over the cases that have a
number (NaN-skipping means), per modality (the case name's prefix before the first ``_``) and overall.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli.errors import InputError, Text3DSAMError, UsageError
from text3dsam_cli.io import formats
from text3dsam_cli.io.atomic import write_text
from text3dsam_cli.io.npz import NonFiniteValues, npz_keys, read_npz_array, read_text_prompts
from text3dsam_cli.io.readers import read_volume
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.metrics import instance_f1_dsc_tp, nan_mean, semantic_case_metrics
from text3dsam_cli.orientation import grid_reorientation, index_to_physical
from text3dsam_cli.prompts import parse_label_map, read_labels_json

__all__ = [
    "CSV_COLUMNS",
    "SPACING_ORDERS",
    "evaluate_folder",
    "modality_of",
    "results_to_json",
    "summarize",
    "write_csv",
    "write_json",
]

SPACING_ORDERS = ("xyz", "zyx")
SEMANTIC_METRICS = ("DSC", "NSD")
INSTANCE_METRICS = ("F1", "DSC_TP")
CSV_COLUMNS = ("CaseName", *SEMANTIC_METRICS, *INSTANCE_METRICS)
#: Label-image prediction endings understood (from the format registry: label maps that carry geometry).
LABEL_IMAGE_SUFFIXES = formats.label_image_suffixes()
NPZ_SUFFIX = formats.ChallengeNpz.suffixes[0]
#: Largest label value (class or instance id) eval accepts: the metrics index labels with tables this long.
MAX_LABEL_VALUE = (1 << 24) - 1


@dataclass
class _Case:
    name: str  # the prediction's file name, e.g. "CT_AMOS_amos_0018.npz"
    stem: str  # without the suffix
    suffix: str
    pred_path: Path
    gt_path: Path
    image_path: Path | None


def _suffix(name: str) -> str | None:
    for suffix in (NPZ_SUFFIX, *LABEL_IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return suffix
    return None


def modality_of(case_name: str) -> str:
    """The modality group of a case: its name's prefix before the first ``_`` ("CT", "MR", ...)."""
    stem = case_name[: -len(s)] if (s := _suffix(case_name)) else case_name
    return stem.split("_", 1)[0] if "_" in stem else "other"


def _folder(path: str | os.PathLike[str], what: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise InputError(f"{what} folder does not exist", folder)
    if not folder.is_dir():
        raise InputError(f"{what} path is not a folder", folder)
    return folder


def _find_cases(pred_dir: Path, gt_dir: Path, images_dir: Path | None) -> tuple[list[_Case], dict[str, str]]:
    """The cases to score and, by prediction name, those that cannot be scored (no ground truth or image)."""
    cases = []
    failed: dict[str, str] = {}
    for pred_path in sorted(pred_dir.iterdir()):
        suffix = _suffix(pred_path.name)
        if suffix is None or not pred_path.is_file() or pred_path.name.startswith("."):
            continue
        stem = pred_path.name[: -len(suffix)]
        candidates = [gt_dir / f"{stem}_gt{suffix}", gt_dir / f"{stem}{suffix}"]
        gt_path = next((p for p in candidates if p.is_file()), None)
        if gt_path is None:
            looked = " or ".join(str(p) for p in candidates)
            failed[pred_path.name] = str(InputError(f"no ground truth for this prediction (looked for {looked})",
                                                    pred_path))
            continue
        image_path = None
        if suffix == NPZ_SUFFIX:
            if images_dir is not None:
                image_path = images_dir / pred_path.name
                if not image_path.is_file():
                    failed[pred_path.name] = str(InputError(f"no image file for this prediction (looked for "
                                                            f"{image_path})", pred_path))
                    continue
            elif gt_path.name != pred_path.name and (gt_dir / pred_path.name).is_file():
                image_path = gt_dir / pred_path.name  # the challenge layout: CASE.npz beside CASE_gt.npz
        cases.append(_Case(pred_path.name, stem, suffix, pred_path, gt_path, image_path))
    if not cases and not failed:
        endings = ", ".join((NPZ_SUFFIX, *LABEL_IMAGE_SUFFIXES))
        raise InputError(f"no predictions ({endings} files) in the folder", pred_dir)
    return cases, failed


def _as_labels(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Check a label map: 3-D, integer (or boolean, or float holding whole numbers), values 0..MAX_LABEL_VALUE.
    ``what`` names it in messages (``'gts'``, ``the ground truth``, ...)."""
    if array.ndim != 3:
        raise InputError(f"{what} has shape {array.shape}, expected a 3-D label map", path)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            kind = "NaN" if np.isnan(array).any() else "infinite"
            raise InputError(f"{what} holds {kind} values: a label map holds whole numbers 0..{MAX_LABEL_VALUE}",
                             path)
        if not np.array_equal(array, np.round(array)):
            raise InputError(f"{what} has dtype {array.dtype} with fractional values, expected integer labels", path)
    elif array.dtype.kind not in "biu":
        raise InputError(f"{what} has dtype {array.dtype}, expected integer labels", path)
    if array.size and array.dtype.kind != "b" and not (array.dtype.kind == "u" and array.dtype.itemsize <= 2):
        low, high = array.min(), array.max()
        if low < 0 or high > MAX_LABEL_VALUE:
            bad = low if low < 0 else high
            raise InputError(f"label value out of range: {what} holds {bad:.15g} (labels are whole numbers "
                             f"0..{MAX_LABEL_VALUE})", path)
    return array.astype(np.int32) if array.dtype.kind == "f" else array


def _read_label_image(path: Path, role: str) -> Volume:
    """A label image (``role``: "ground truth" or "prediction") as a :class:`Volume` whose array has passed
    :func:`_as_labels`."""
    try:
        volume = read_volume(path)
    except NonFiniteValues as exc:
        raise InputError(f"the {role} holds {exc.kind} values: a label map holds whole numbers "
                         f"0..{MAX_LABEL_VALUE}", path) from None
    volume.array = _as_labels(np.asarray(volume.array), path, f"the {role}")
    return volume


def _same_grid(a: Volume, b: Volume) -> bool:
    if a.shape != b.shape:
        return False
    ma, oa = index_to_physical(a)
    mb, ob = index_to_physical(b)
    scale = max(1e-6, float(np.max(np.abs(a.spacing))))
    return bool(np.allclose(ma, mb, atol=1e-4 * scale) and np.allclose(oa, ob, atol=1e-3 * scale))


def align_to_reference(pred: Volume, gt: Volume, path: Path) -> np.ndarray:
    """The prediction's labels on the ground truth's voxel grid.

    Identical grids: the array as it is. The same voxels stored in another axis order or direction (e.g. a
    flipped NIfTI): permuted/flipped exactly (:func:`text3dsam_cli.orientation.grid_reorientation`). Anything
    else (other spacing, shifted origin, rotation): ``InputError`` instead of scoring misaligned arrays.
    """
    if _same_grid(pred, gt):
        return np.asarray(pred.array)
    change = grid_reorientation(pred, gt)
    if change is not None:
        return np.ascontiguousarray(change.apply(np.asarray(pred.array)))
    raise InputError("the prediction's voxel grid differs from the ground truth's (shape "
                     f"{pred.shape} vs {gt.shape}, spacing {_fmt(pred.spacing)} vs {_fmt(gt.spacing)}, origin "
                     f"{_fmt(pred.origin)} vs {_fmt(gt.origin)}); resample it onto the ground truth's grid first "
                     f"({gt.path})", path)


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _read_labels_json(path: str | os.PathLike[str] | None) -> tuple[list[int] | None, bool | None]:
    """Class ids and instance flag from ``{"1": "liver", ..., "instance_label": 0}`` (None when no file)."""
    label_map = read_labels_json(path)
    return (None, None) if label_map is None else (sorted(label_map.values), label_map.instance)


def _class_ids_from_mapping(data: dict[str, Any], path: Path) -> tuple[list[int], bool | None]:
    label_map = parse_label_map(data, path, "text_prompts: ")
    return sorted(label_map.values), label_map.instance


def _stored_spacing(path: Path, keys: list[str]) -> tuple[float, ...] | None:
    if "spacing" not in keys:
        return None
    value = read_npz_array(path, "spacing").astype(np.float64).reshape(-1)
    if value.size != 3 or not np.all(np.isfinite(value)) or np.any(value <= 0):
        raise InputError(f"'spacing' should hold 3 positive numbers, got {value.tolist()}", path)
    return tuple(float(v) for v in value)


def _npz_case_info(case: _Case, labels: tuple[list[int] | None, bool | None]
                   ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None, list[int] | None, bool]:
    """Prediction, ground truth, stored spacing, prompted class ids and instance flag of an npz case."""
    pred = _as_labels(read_npz_array(case.pred_path, "segs"), case.pred_path, "'segs'")
    gt = _as_labels(read_npz_array(case.gt_path, "gts"), case.gt_path, "'gts'")
    if pred.shape != gt.shape:
        raise InputError(f"prediction shape {pred.shape} differs from the ground truth's {gt.shape} "
                         f"({case.gt_path})", case.pred_path)
    sources = [case.image_path, case.gt_path] if case.image_path is not None else [case.gt_path]
    spacing, prompts, prompts_path = None, None, case.gt_path
    for source in sources:
        keys = npz_keys(source)
        if spacing is None:
            spacing = _stored_spacing(source, keys)
        if prompts is None and "text_prompts" in keys:
            prompts, prompts_path = read_text_prompts(source), source
    class_ids, instance = labels
    if prompts is not None:
        class_ids, instance = _class_ids_from_mapping(prompts, prompts_path)
    return pred, gt, spacing, class_ids, bool(instance)


def _spacing_for_arrays(stored: tuple[float, ...], order: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in stored)
    return values if order == "xyz" else values[::-1]  # type: ignore[return-value]


def _evaluate_case(case: _Case, spacing_order: str, labels: tuple[list[int] | None, bool | None],
                   tolerance_mm: float) -> tuple[dict[str, float], dict[str, Any]]:
    if case.suffix == NPZ_SUFFIX:
        pred, gt, stored, class_ids, instance = _npz_case_info(case, labels)
    else:
        gt_volume = _read_label_image(case.gt_path, "ground truth")
        pred = align_to_reference(_read_label_image(case.pred_path, "prediction"), gt_volume, case.pred_path)
        gt, stored = np.asarray(gt_volume.array), gt_volume.spacing
        class_ids, instance = labels[0], bool(labels[1])
    if instance:
        result = instance_f1_dsc_tp(pred, gt)
        metrics = {k: result[k] for k in INSTANCE_METRICS}
        details = {"type": "instance", **{k: result[k] for k in ("TP", "FP", "FN")}}
        return metrics, details
    if stored is None:
        where = case.image_path or case.gt_path
        raise InputError("no 'spacing' for this semantic case (give --images with the challenge images)", where)
    if class_ids is None:
        class_ids = [int(v) for v in np.unique(gt) if v > 0]
    spacing = _spacing_for_arrays(stored, spacing_order)
    result = semantic_case_metrics(pred, gt, class_ids, spacing, tolerance_mm)
    metrics = {k: result[k] for k in SEMANTIC_METRICS}
    details = {
        "type": "semantic",
        "spacing": list(spacing),
        "per_class": {str(c): v for c, v in result["per_class"].items()},
    }
    return metrics, details


def summarize(cases: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-modality and overall means of each metric (NaN-skipping); ``cases`` counts the cases of a group."""
    groups: dict[str, list[dict[str, float]]] = {}
    for name, metrics in cases.items():
        groups.setdefault(modality_of(name), []).append(metrics)
    groups = dict(sorted(groups.items()))
    groups["overall"] = list(cases.values())
    summary: dict[str, dict[str, float]] = {}
    for group, members in groups.items():
        entry: dict[str, float] = {"cases": len(members)}
        for metric in (*SEMANTIC_METRICS, *INSTANCE_METRICS):
            values = [m[metric] for m in members if metric in m]
            if values:
                entry[metric] = nan_mean(values)
        summary[group] = entry
    return summary


def evaluate_folder(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str],
                    images_dir: str | os.PathLike[str] | None = None, spacing_order: str = "xyz",
                    labels_json: str | os.PathLike[str] | None = None, tolerance_mm: float = 2.0,
                    on_case: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate every prediction in ``pred_dir`` against ``gt_dir``.

    Returns ``{"cases": {name: {"DSC", "NSD"} or {"F1", "DSC_TP"}}, "summary": {modality | "overall":
    {"cases": n, metric: mean}}, "details": {name: {...}}, "settings": {...}}``. ``on_case(name, index,
    total)`` is called before each case. A case that cannot be scored (no ground truth, mismatching shapes or
    grids, missing keys, unreadable files) does not stop the others: it is listed under ``"failed"``
    (name -> one-line reason). Raises :class:`InputError` only for missing folders or an empty prediction
    folder. Label images are compared on the ground truth's grid (see :func:`align_to_reference`).
    """
    if spacing_order not in SPACING_ORDERS:
        raise UsageError(f"spacing order must be one of {', '.join(SPACING_ORDERS)}, got {spacing_order!r}")
    pred_path = _folder(pred_dir, "prediction")
    gt_path = _folder(gt_dir, "ground-truth")
    images_path = None if images_dir is None else _folder(images_dir, "image")
    labels = _read_labels_json(labels_json)
    found, failed = _find_cases(pred_path, gt_path, images_path)
    cases: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, Any]] = {}
    for index, case in enumerate(found):
        if on_case is not None:
            on_case(case.name, index, len(found))
        try:
            cases[case.name], details[case.name] = _evaluate_case(case, spacing_order, labels, tolerance_mm)
        except Text3DSAMError as exc:
            failed[case.name] = str(exc)
        except MemoryError:
            failed[case.name] = f"{case.pred_path}: out of memory"
        except (ValueError, RuntimeError, OSError) as exc:  # one bad case must not stop the scoring
            failed[case.name] = f"{case.pred_path}: {type(exc).__name__}: {exc}"
    return {
        "cases": cases,
        "summary": summarize(cases),
        "failed": dict(sorted(failed.items())),
        "details": details,
        "settings": {"spacing_order": spacing_order, "tolerance_mm": tolerance_mm, "iou_threshold": 0.5},
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def results_to_json(results: dict[str, Any]) -> str:
    """The results as JSON text (NaN written as ``null``)."""
    return json.dumps(_json_safe(results), indent=2) + "\n"


def write_json(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write :func:`results_to_json` to ``path`` (atomically)."""
    return write_text(path, results_to_json(results), errors="surrogateescape")  # case names keep their bytes


def write_csv(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """One row per case: ``CaseName,DSC,NSD,F1,DSC_TP`` (empty cells where a metric does not apply or is NaN)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, metrics in results["cases"].items():
        row = [name]
        for column in CSV_COLUMNS[1:]:
            value = metrics.get(column)
            row.append("" if value is None or math.isnan(value) else repr(float(value)))
        writer.writerow(row)
    return write_text(path, buffer.getvalue(), errors="surrogateescape")
