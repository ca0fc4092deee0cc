"""Training data: discover cases (challenge npz or nnU-Net folders), attach prompts, cache resized volumes.

Two layouts are understood (see ``docs/train.md``):

* **Challenge npz**: a folder (searched recursively) of ``CASE.npz`` files with ``imgs`` and the ground truth
  either inside (``gts``) or beside it as ``CASE_gt.npz``. Prompts come from the file's ``text_prompts``
  or, with a prompt file (``CVPR25_TextSegFMData_with_class.json``: ``{dataset: {"1": [phrasings], ...,
  "instance_label": 0}}``), from the entry of the case's dataset, found by :func:`match_dataset`.
* **nnU-Net**: ``dataset.json`` + ``imagesTr/CASE_0000.<ext>`` + ``labelsTr/CASE.<ext>``; ``labels`` maps
  names to values (``{"background": 0, "liver": 1}``), names to phrasings (values by position:
  ``{"background": ["background"], "liver": ["liver", "liver in CT"]}``), values to phrasings
  (``{"1": "liver"}`` or ``{"1": ["liver", "liver in CT"]}``), or names to nnU-Net regions
  (``{"tumour": [1, 2]}``). Raw scans get
  the same preprocessing as ``text3dsam segment`` (reoriented by the model's orientation table, then
  normalised), with the modality from ``channel_names``; their label maps follow the image's reorientation.
  Challenge npz are used as stored, as ``segment`` does.

Every sample is one class that is present in its case's ground truth, so an epoch is the list of
(case, class) pairs, as in the paper.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from text3dsam_cli.errors import InputError
from text3dsam_cli.io import formats
from text3dsam_cli.io.npz import npz_keys, read_npz_array, read_text_prompts
from text3dsam_cli.io.readers import read_volume
from text3dsam_cli.io.volume import shape_text
from text3dsam_cli.preprocess import DEFAULT_WINDOW
from text3dsam_cli.prompts import is_label_map, parse_label_map, parse_phrasings, read_prompt_collection

log = logging.getLogger(__name__)

GT_SUFFIX = "_gt.npz"
#: Endings of single-file images with geometry (nnU-Net images and labels), from the format registry.
IMAGE_SUFFIXES = tuple(s for f in formats.INPUT_FORMATS if f.stores_geometry and not f.reads_folders
                       for s in f.suffixes)


@dataclass(frozen=True)
class ClassSpec:
    """One segmentation target: the label value(s) forming it and its prompt phrasings.

    ``values`` empty means "every non-zero label" (instance datasets: all instances form one target).
    """

    key: str
    values: tuple[int, ...]
    prompts: tuple[str, ...]

    def mask(self, labels: np.ndarray | torch.Tensor) -> Any:
        """Binary mask of this class in a label array (numpy or torch, same kind back)."""
        if not self.values:
            return labels > 0
        if isinstance(labels, torch.Tensor):
            return torch.isin(labels, torch.tensor(self.values, dtype=labels.dtype, device=labels.device))
        return np.isin(labels, self.values)


@dataclass
class CaseSpec:
    """One training case: where its image and ground truth live, its classes and how to normalise it."""

    name: str
    image: Path
    labels: Path  # the npz holding ``gts`` (the image itself or CASE_gt.npz), or a label image
    layout: str  # "npz" or "nnunet"
    classes: list[ClassSpec]
    modality: str | None = None
    instance: bool = False


@dataclass
class DataSource:
    """Cases found in a data folder plus notes worth telling the user (e.g. skipped files)."""

    root: Path
    layout: str
    cases: list[CaseSpec]
    notes: list[str] = field(default_factory=list)


# -- prompt files ----------------------------------------------------------------------------------------------


def match_dataset(case_path: Path, keys: Sequence[str]) -> str | None:
    """The prompt-file dataset a case belongs to, or None.

    A parent folder named exactly like a dataset wins (the challenge's ``CT/CT_AMOS/...`` layout); otherwise
    the longest dataset name that, followed by ``_``, begins the file name (``CT_AMOS_amos_0018`` ->
    ``CT_AMOS``), also tried with the modality prefix removed (``PET_autoPET_x`` -> ``autoPET``).
    Matching ignores case.
    """
    lower = {k.lower(): k for k in keys}
    for parent in case_path.parents:
        if parent.name.lower() in lower:
            return lower[parent.name.lower()]
    stem = case_path.name[: -len(".npz")] if case_path.name.lower().endswith(".npz") else case_path.stem
    stem = stem.lower()
    variants = [stem]
    if "_" in stem:
        variants.append(stem.split("_", 1)[1])
    best: str | None = None
    for name in variants:
        for key in lower:
            if (name == key or name.startswith(key + "_")) and (best is None or len(key) > len(best)):
                best = key
    return lower[best] if best is not None else None


def classes_from_label_map(data: dict[str, Any], where: Path) -> tuple[list[ClassSpec], bool]:
    """``{"1": "text" | [texts], ..., "instance_label": 0|1}`` -> classes and the instance flag (validated by
    :func:`text3dsam_cli.prompts.parse_label_map`)."""
    label_map = parse_label_map(data, where)
    instance = bool(label_map.instance)
    classes = [ClassSpec(str(value), () if instance else (value,), tuple(t.strip() for t in texts))
               for value, texts in zip(label_map.values, label_map.phrasings)]
    return classes, instance


# -- challenge npz ---------------------------------------------------------------------------------------------


def _npz_cases(root: Path, prompt_file: dict[str, Any] | None, prompt_path: Path | None) -> DataSource:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.npz") if not p.name.startswith("."))
    images = [p for p in files if not p.name.lower().endswith(GT_SUFFIX)]
    if not images:
        raise InputError("no training cases here (expected challenge .npz files, or an nnU-Net folder with "
                         "dataset.json, imagesTr/ and labelsTr/)", root)
    flat = prompt_file is not None and is_label_map(prompt_file)
    keys = [] if prompt_file is None or flat else list(prompt_file)
    cases, notes = [], []
    for image in images:
        members = npz_keys(image)
        if "imgs" not in members:
            notes.append(f"{image}: skipped (no 'imgs' array)")
            continue
        gt = image.with_name(image.name[: -len(".npz")] + GT_SUFFIX)
        if "gts" in members:
            labels = image
        elif gt.is_file():
            labels = gt
        else:
            raise InputError(f"no ground truth: neither a 'gts' array in the file nor {gt.name} beside it", image)
        source: tuple[dict[str, Any], Path] | None = None
        if prompt_file is not None and prompt_path is not None:
            if flat:
                source = (prompt_file, prompt_path)
            elif (dataset := match_dataset(image, keys)) is not None:
                source = (prompt_file[dataset], prompt_path)
        if source is None:
            stored = read_text_prompts(image)
            if not stored:
                hint = " and its name matches no dataset of the prompt file" if prompt_file is not None else \
                    "; pass a prompt file with --prompts"
                raise InputError(f"no prompts: the file has no text_prompts{hint}", image)
            source = (stored, image)
            if prompt_file is not None and not flat:
                notes.append(f"{image}: no dataset of the prompt file matches its name; using its text_prompts")
        classes, instance = classes_from_label_map(source[0], source[1])
        name = image.name[: -len(".npz")]
        cases.append(CaseSpec(name, image, labels, "npz", classes, None, instance))
    if not cases:
        raise InputError("no usable training cases (no npz file holds an 'imgs' array)", root)
    return DataSource(root, "npz", cases, notes)


# -- nnU-Net ---------------------------------------------------------------------------------------------------


def _humanize(name: str) -> str:
    return re.sub(r"[_\s]+", " ", name).strip()


def _stripped(value: Any, key: str, where: Path) -> tuple[str, ...]:
    return tuple(t.strip() for t in parse_phrasings(value, key, where))


def classes_from_nnunet_labels(labels: Any, where: Path) -> list[ClassSpec]:
    """nnU-Net ``labels`` (names -> values or regions, or the inverted values -> phrasings) -> classes."""
    if not isinstance(labels, dict) or not labels:
        raise InputError("dataset.json has no 'labels' object", where)
    classes = []
    for position, (key, value) in enumerate(labels.items()):
        if re.fullmatch(r"\d+", str(key).strip()):  # inverted form {"1": "liver"} / {"1": [phrasings]}
            number = int(key)
            if number:
                classes.append(ClassSpec(str(number), (number,), _stripped(value, key, where)))
            continue
        if isinstance(value, bool):
            raise InputError(f"label {key!r}: expected a label value, got {value!r}", where)
        if isinstance(value, int):
            if value:
                classes.append(ClassSpec(str(value), (value,), (_humanize(key),)))
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value):
            region = tuple(sorted({v for v in value if v}))
            if region:
                classes.append(ClassSpec(key, region, (_humanize(key),)))
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            # {"background": [...], "liver": ["liver", "liver in CT"]}: values follow the order, as in nnU-Net
            if position:
                classes.append(ClassSpec(str(position), (position,), _stripped(value, key, where)))
        else:
            raise InputError(f"label {key!r}: expected a label value, a list of values (a region) or a list of "
                             f"prompt phrasings, got {value!r}", where)
    singles = [c.values[0] for c in classes if len(c.values) == 1]
    if len(set(singles)) != len(singles):
        raise InputError("dataset.json 'labels' gives the same label value twice", where)
    if not classes:
        raise InputError("dataset.json 'labels' names no foreground class", where)
    return classes


def _override_phrasings(classes: list[ClassSpec], data: dict[str, Any], where: Path) -> list[ClassSpec]:
    """Replace the phrasings of single-value classes with those of a prompt label map."""
    label_map = parse_label_map(data, where)
    out = []
    for spec in classes:
        texts = label_map.phrasings_of(spec.values[0]) if len(spec.values) == 1 else None
        if texts is not None:
            spec = ClassSpec(spec.key, spec.values, tuple(t.strip() for t in texts))
        out.append(spec)
    return out


def _nnunet_modality(meta: dict[str, Any]) -> str | None:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if isinstance(channels, dict) and channels:
        first = channels.get("0", next(iter(channels.values())))
        return str(first) if first else None
    return None


def _nnunet_cases(root: Path, prompt_file: dict[str, Any] | None, prompt_path: Path | None) -> DataSource:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError("nnU-Net folder without dataset.json", root)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read dataset.json ({exc})", meta_path) from None
    if not isinstance(meta, dict):
        raise InputError("dataset.json is not a JSON object", meta_path)
    classes = classes_from_nnunet_labels(meta.get("labels"), meta_path)
    if prompt_file is not None and prompt_path is not None:
        if is_label_map(prompt_file):
            classes = _override_phrasings(classes, prompt_file, prompt_path)
        else:
            names = [str(meta.get("name") or ""), root.name]
            dataset = next((d for n in names for d in prompt_file if n and n.lower() == d.lower()), None)
            if dataset is not None:
                classes = _override_phrasings(classes, prompt_file[dataset], prompt_path)
    modality = _nnunet_modality(meta)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise InputError(f"nnU-Net folder without {folder.name}/", root)
    ending = str(meta.get("file_ending") or "")
    suffixes = (ending,) if ending else IMAGE_SUFFIXES
    cases, notes = [], []
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if isinstance(channels, dict) and len(channels) > 1:
        notes.append(f"{meta_path}: {len(channels)} channels; training uses channel 0000 only")
    for image in sorted(images_dir.iterdir()):
        suffix = next((s for s in suffixes if image.name.lower().endswith(s.lower())), None)
        if suffix is None or image.name.startswith("."):
            continue
        stem = image.name[: -len(suffix)]
        if not stem.endswith("_0000"):
            continue
        name = stem[: -len("_0000")]
        label = labels_dir / f"{name}{suffix}"
        if not label.is_file():
            raise InputError(f"no label file {label.name} in labelsTr/", image)
        cases.append(CaseSpec(name, image, label, "nnunet", classes, modality, False))
    if not cases:
        raise InputError(f"no images named CASE_0000{suffixes[0]} in imagesTr/", images_dir)
    return DataSource(root, "nnunet", cases, notes)


def discover_cases(path: str | os.PathLike[str], prompts: str | os.PathLike[str] | None = None) -> DataSource:
    """Find the training cases under ``path`` (an npz file or folder, or an nnU-Net dataset folder)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError("no such file or folder", root)
    prompt_path = Path(prompts).expanduser() if prompts else None
    prompt_file = read_prompt_collection(prompt_path) if prompt_path else None
    if root.is_dir() and ((root / "dataset.json").is_file() or (root / "imagesTr").is_dir()):
        return _nnunet_cases(root, prompt_file, prompt_path)
    if root.is_file() and not root.name.lower().endswith(".npz"):
        raise InputError("not a training data folder or .npz file", root)
    return _npz_cases(root, prompt_file, prompt_path)


# -- loading and caching ---------------------------------------------------------------------------------------


def load_case(case: CaseSpec, window: str | tuple[float, float] = DEFAULT_WINDOW,
              modality: str | None = None, orientation: dict[str, str] | None = None,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution image (float32 0..255, preprocessed like ``segment``) and integer label map.

    ``orientation`` is the modality -> code table (None: the published model's default); images other than
    npz are reoriented by it exactly as ``segment`` does, and the label map with them.
    """
    from text3dsam_cli.pipeline import prepare_scan

    volume = read_volume(case.image)
    scan = prepare_scan(volume, modality or case.modality, window, "auto", orientation)
    image = scan.image
    labels = read_npz_array(case.labels, "gts") if case.layout == "npz" else read_volume(case.labels).array
    if labels.dtype.kind not in "biu":
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int32)
        else:
            raise InputError(f"ground truth has dtype {labels.dtype}, expected integer labels", case.labels)
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    if tuple(labels.shape) != volume.shape:
        raise InputError(f"ground truth shape {shape_text(labels.shape)} differs from the image's "
                         f"{shape_text(volume.shape)}", case.labels)
    if scan.reorientation is not None and not scan.reorientation.is_identity:
        labels = np.ascontiguousarray(scan.reorientation.apply(labels))
    return image, labels


def resize_pair(image: np.ndarray, labels: np.ndarray, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image trilinear (align_corners=False) and labels nearest to ``size``: (D,H,W) float32 and int tensors."""
    size = tuple(int(s) for s in size)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0]
    lab = torch.from_numpy(np.ascontiguousarray(labels).astype(np.float32, copy=False))[None, None]
    lab = F.interpolate(lab, size=size, mode="nearest")[0, 0]
    dtype = torch.uint8 if labels.size == 0 or int(labels.max()) <= 255 else torch.int32
    return x.contiguous(), lab.to(dtype).contiguous()


@dataclass
class Sample:
    """One training sample: which case and class it is."""

    case: int
    cls: int


class TrainingSet:
    """Cases resized to the model input, cached in memory, and the (case, class) sample list of an epoch.

    Only classes present in a case's ground truth become samples. Construction reads every case once
    (``on_case(i, n, name)`` reports progress); with ``cache=False`` volumes are re-read for each sample.
    """

    def __init__(self, source: DataSource, image_size: Sequence[int], window: str | tuple[float, float] =
                 DEFAULT_WINDOW, modality: str | None = None, cache: bool = True,
                 on_case: Callable[[int, int, str], None] | None = None,
                 orientation: dict[str, str] | None = None) -> None:
        self.source = source
        self.cases = source.cases
        self.image_size = tuple(int(s) for s in image_size)
        self.window = window
        self.modality = modality
        self.cache = cache
        self.orientation = orientation
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.samples: list[Sample] = []
        self.notes = list(source.notes)
        for index, case in enumerate(self.cases):
            if on_case is not None:
                on_case(index, len(self.cases), case.name)
            image, labels = load_case(case, window, modality, orientation)
            present = set(np.unique(labels).tolist())
            used = [i for i, spec in enumerate(case.classes)
                    if (spec.values and present & set(spec.values)) or (not spec.values and present - {0})]
            if not used:
                self.notes.append(f"{case.image}: no prompted class in its ground truth; not used")
            self.samples.extend(Sample(index, i) for i in used)
            if cache:
                self._cache[index] = resize_pair(image, labels, self.image_size)
        if not self.samples:
            raise InputError("no training samples: no case has a prompted class present in its ground truth",
                             source.root)

    def __len__(self) -> int:
        return len(self.samples)

    def volume(self, case: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The case's image and label map at ``image_size`` (cached tensors: do not modify in place)."""
        if case in self._cache:
            return self._cache[case]
        image, labels = load_case(self.cases[case], self.window, self.modality, self.orientation)
        return resize_pair(image, labels, self.image_size)

    def item(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Sample ``index``: image (1,D,H,W) float32, binary target (1,D,H,W) float32, one random phrasing."""
        sample = self.samples[index]
        image, labels = self.volume(sample.case)
        spec = self.cases[sample.case].classes[sample.cls]
        target = spec.mask(labels).to(torch.float32)
        prompt = spec.prompts[int(rng.integers(len(spec.prompts)))]
        return image[None], target[None], prompt


@dataclass
class ValidationCase:
    """A validation case at full resolution: preprocessed image, label map and its classes."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    classes: list[ClassSpec]


def load_validation(source: DataSource, window: str | tuple[float, float] = DEFAULT_WINDOW,
                    modality: str | None = None, orientation: dict[str, str] | None = None,
                    ) -> list[ValidationCase]:
    """Read every validation case at full resolution (scored on the grid the model sees: reoriented, not
    resampled)."""
    out = []
    for case in source.cases:
        image, labels = load_case(case, window, modality, orientation)
        out.append(ValidationCase(case.name, image, labels, case.classes))
    return out
