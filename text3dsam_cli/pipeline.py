"""The ``segment`` job as a Python API: inputs -> read (prefetched) -> preprocess -> Segmenter -> outputs.

Nothing here prints: progress goes through an ``on_event`` callback and the result is a :class:`RunSummary`
the CLI renders. Each input succeeds or fails on its own; a bad input never stops the batch.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli import __version__
from text3dsam_cli.errors import CheckpointError, InputError, Text3DSAMError, UsageError
from text3dsam_cli.inference import EncodedImage, SegmentationResult, Segmenter
from text3dsam_cli.io import (
    InputItem,
    Volume,
    dicomweb,
    expand_inputs,
    formats,
    read_text_prompts,
    read_volume,
    write_volume,
)
from text3dsam_cli.io.atomic import clean_stale_temps, write_json
from text3dsam_cli.io.writers import SHEARED_NIFTI, is_orthogonal
from text3dsam_cli.orientation import (
    DEFAULT_ORIENTATION,
    Reorientation,
    check_request,
    check_table,
    closest_code,
    reorientation,
)
from text3dsam_cli.outputs import (
    Claims,
    OutputPlan,
    discard_attempt,
    existing,
    is_done,
    plan_files,
    remove_marker,
    write_marker,
)
from text3dsam_cli.preprocess import (
    DEFAULT_WINDOW,
    KNOWN_MODALITIES,
    ModalityDecision,
    normalize_as,
    normalize_modality_name,
    parse_window,
    resolve_modality,
)
from text3dsam_cli.prompts import (
    check_known_prompts,
    check_label_map_prompts,
    check_prompts,
    match_prompt,
    parse_label_map,
    prompts_for,
    prompts_to_segment,
)
from text3dsam_cli.quality import assess_labels

log = logging.getLogger(__name__)

#: ``--format`` choices -> file ending (from the format registry, :mod:`text3dsam_cli.io.formats`).
FORMATS = formats.FORMAT_CHOICES
FILE_SUFFIXES = formats.OUTPUT_SUFFIXES
DEFAULT_OUTPUT_DIR = "text3dsam_output"
#: Default cap on prompts per input (``--max-prompts``; each prompt is decoded separately).
DEFAULT_MAX_PROMPTS = 256


@dataclass
class SegmentOptions:
    """Everything about a segment run that is not the inputs, the prompts or the model."""

    output: str | None = None
    fmt: str | None = None  # a FORMATS key; None: the input format's default_output (npz for npz, else nii.gz)
    series_uid: str | None = None
    modality: str | None = None
    window: str = DEFAULT_WINDOW
    orientation: str = "auto"  # "auto" (the model's table), "native" or a code such as "LAS"
    largest_component: bool = False  # keep one connected component per label
    min_size_ml: float | None = None  # drop components smaller than this
    split: bool = False
    probabilities: bool = False
    preview: bool = False
    dicom_seg: bool = False  # one field per companion format, named as the format (io/formats.py)
    rtstruct: bool = False
    skip_existing: bool = False
    strict_prompts: bool = False  # refuse prompts that are not phrasings of the vocabulary
    max_prompts: int | None = DEFAULT_MAX_PROMPTS
    statistics: bool = False  # intensity statistics of the input's values per label (sidecar labels[i].intensity)
    presets: tuple[str, ...] = ()  # names of the presets among the prompts (recorded in the sidecar)
    store: bool = False  # STOW-RS the DICOM outputs to the input's DICOMweb server, or to store_to (io/dicomweb.py)
    store_to: str | None = None
    dicomweb_token: str | None = field(default=None, repr=False)  # else $DICOMWEB_TOKEN; never written anywhere


@dataclass
class ItemOutcome:
    """What happened to one input."""

    input: str
    status: str  # "ok", "skipped" or "failed"
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    sidecar: dict[str, Any] | None = None
    exception: BaseException | None = field(default=None, repr=False)  # for --debug tracebacks


@dataclass
class RunSummary:
    """All outcomes of a run, in input order, plus throughput."""

    outcomes: list[ItemOutcome]
    seconds: float

    @property
    def failed(self) -> list[ItemOutcome]:
        """Inputs that failed."""
        return [o for o in self.outcomes if o.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (``--json``)."""
        done = [o for o in self.outcomes if o.status == "ok"]
        return {
            "version": __version__,
            "seconds": round(self.seconds, 3),
            "inputs": len(self.outcomes),
            "succeeded": len(done),
            "skipped": sum(o.status == "skipped" for o in self.outcomes),
            "failed": len(self.failed),
            "images_per_minute": round(60 * len(done) / self.seconds, 2) if self.seconds > 0 and done else None,
            "results": [{"input": o.input, "status": o.status, "outputs": o.outputs, "error": o.error,
                         "seconds": round(o.seconds, 3)} for o in self.outcomes],
        }


def companions(options: SegmentOptions) -> list[formats.Format]:
    """The companion formats (DICOM-SEG, RTSTRUCT) a run writes: those whose options field is set."""
    return [f for f in formats.COMPANION_FORMATS if getattr(options, f.name, False)]


def option_name(fmt: formats.Format) -> str:
    """The command-line switch of a companion format (``dicom_seg`` -> ``--dicom-seg``)."""
    return "--" + fmt.name.replace("_", "-")


def _has_file_suffix(path: str) -> bool:
    return path.lower().endswith(FILE_SUFFIXES)


_FILE_ENDING = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")


def check_options(options: SegmentOptions) -> None:
    """Refuse option values that cannot work, before any model is loaded (``UsageError``, exit status 2)."""
    if options.fmt is not None and options.fmt not in FORMATS:
        raise UsageError(f"unknown --format {options.fmt!r} (use {', '.join(FORMATS)})")
    parse_window(options.window)
    if options.modality is not None and normalize_modality_name(options.modality) not in KNOWN_MODALITIES:
        raise UsageError(f"unknown --modality {options.modality!r} (use one of {', '.join(sorted(KNOWN_MODALITIES))})")
    if options.min_size_ml is not None and not options.min_size_ml >= 0:
        raise UsageError("--min-size-ml must be a volume in ml >= 0")
    if options.max_prompts is not None and options.max_prompts < 1:
        raise UsageError("--max-prompts must be at least 1 (or 0 on the command line for no limit)")
    for companion in companions(options):
        missing = companion.missing()
        if missing:
            raise UsageError(f"{option_name(companion)}: {missing}")
    target = options.output
    if not target:
        return
    path = Path(target)
    is_file = _has_file_suffix(target)
    if not is_file and not path.is_dir() and _FILE_ENDING.search(path.name):
        raise UsageError(f"-o {target}: not an output file type{formats.unwritable_hint(path)}; give a file ending in "
                         f"{', '.join(FILE_SUFFIXES)}, or a folder (a new folder's name must not end like a file)")
    folder = path.parent if is_file else path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"-o {target}: cannot create the output folder, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"-o {target}: {existing} is not writable")


def plan_outputs(items: Sequence[InputItem], options: SegmentOptions) -> list[Path]:
    """Output path of each input: the ``-o`` file for one input, else ``<folder>/<name>`` (see docs/segment.md)."""
    fmt = options.fmt
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r} (use {', '.join(FORMATS)})")
    target = options.output
    if target and _has_file_suffix(target):
        if len(items) != 1:
            raise UsageError(f"-o {target} names a file but there are {len(items)} inputs: give a folder")
        outputs = [Path(target)]
    else:
        folder = Path(target or DEFAULT_OUTPUT_DIR)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"-o {folder} exists and is not a folder")
        outputs = []
        for item in items:
            outputs.append(folder / (f"{item.stem}{FORMATS[fmt]}" if fmt else item.name))
    dicomweb.check_store((item.path for item in items), options.store, options.store_to, bool(companions(options)))
    inputs = {os.path.realpath(item.path) for item in items}
    for out in outputs:
        if os.path.realpath(out) in inputs:
            raise UsageError(f"output {out} would overwrite an input")
    return outputs


def _stored_label_values(path: Path) -> list[int] | None:
    """The label values an npz's ``text_prompts`` announce (for planning; None when unreadable or invalid:
    reading the input then reports the problem)."""
    try:
        stored = read_text_prompts(path)
        if not stored:
            return None
        label_map = parse_label_map(stored, path, "text_prompts: ")
    except Text3DSAMError:
        return None
    return prompts_to_segment(label_map.prompts, label_map.values, bool(label_map.instance))[1]


def check_input_prompts(items: Sequence[InputItem], prompts: Sequence[str]) -> None:
    """Without prompt arguments, the prompts of every npz input (its ``text_prompts``) must be prompts by the
    prompt rule (:func:`~text3dsam_cli.prompts.check_label_map_prompts`): a UsageError naming the file, before
    the model loads. (Other problems of ``text_prompts`` fail that input alone when it is read.)"""
    if prompts:
        return
    for item in items:
        if item.kind != "npz" or item.error is not None:
            continue
        try:
            stored = read_text_prompts(item.path)
        except Text3DSAMError:
            continue
        check_label_map_prompts(stored, item.path, "text_prompts: ")


def label_counts(labels: np.ndarray, values: Sequence[int]) -> dict[int, int]:
    """Voxels per label value, counted slab by slab: no int64 copy of the whole volume (``np.bincount`` on the
    full array would make one, 8 bytes per voxel)."""
    wanted = sorted({int(v) for v in values if int(v) >= 0})
    counts = dict.fromkeys(wanted, 0)
    if not wanted or labels.size == 0:
        return counts
    flat = labels.reshape(labels.shape[0], -1) if labels.ndim > 1 else labels.reshape(1, -1)
    step = max(1, (1 << 22) // max(1, flat.shape[1]))
    top = wanted[-1]
    for start in range(0, flat.shape[0], step):
        block = flat[start:start + step].ravel()
        if block.dtype.kind == "i" and block.size and int(block.min()) < 0:
            block = block[block >= 0]
        binned = np.bincount(block, minlength=top + 1)
        for v in wanted:
            counts[v] += int(binned[v]) if v < binned.size else 0
    return counts


def label_statistics(labels: np.ndarray, values: Sequence[int], prompts: Sequence[str],
                     voxel_ml: float, quality: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per prompt: label value, voxel count, volume in ml, and the :mod:`~text3dsam_cli.quality` figures (whose
    voxel counts, when given for every value, spare a counting pass)."""
    if quality is not None and all(int(v) > 0 and "voxels" in quality.get(int(v), {}) for v in values):
        counts = {int(v): int(quality[int(v)]["voxels"]) for v in values}
    else:
        counts = label_counts(labels, values)
    return [{"label": int(v), "prompt": p, "voxels": counts.get(int(v), 0),
             "volume_ml": round(float(counts.get(int(v), 0)) * voxel_ml, 4), **(quality or {}).get(int(v), {})}
            for v, p in zip(values, prompts)]


def prompt_values(prompts: Sequence[str], values: Sequence[int]) -> dict[str, int | list[int]]:
    """The sidecar's ``prompts`` map: prompt -> label value, or -> the list of its values when a prompt is given
    more than once (so no label is lost; the ``labels`` list stays the full, ordered account)."""
    grouped: dict[str, list[int]] = {}
    for prompt, value in zip(prompts, values):
        grouped.setdefault(prompt, []).append(int(value))
    return {p: v[0] if len(v) == 1 else v for p, v in grouped.items()}


def build_sidecar(item: InputItem | str | None, volume: Volume, result: SegmentationResult,
                  model_source: dict[str, Any], modality: dict[str, Any], outputs: dict[str, str],
                  timings: dict[str, float], orientation: dict[str, Any] | None = None,
                  quality: dict[int, dict[str, Any]] | None = None,
                  intensity: dict[int, dict[str, Any]] | None = None,
                  presets: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON written beside each output. ``item``: the input (its path is recorded), or the name to record
    (None for an image that came from memory, e.g. through the Python API). ``intensity``: label value -> its
    intensity statistics (:func:`text3dsam_cli.statistics.intensity_statistics`, ``segment --statistics``),
    added to each label; ``presets``: the presets named on the command line, recorded when there are any."""
    sidecar = {
        "text3dsam_version": __version__,
        "input": str(item.path) if isinstance(item, InputItem) else item,
        "input_format": volume.source_format,
        "model": model_source,
        "mode": result.mode,
        **({"sliding": result.sliding} if result.sliding is not None else {}),
        "device": result.device,
        "modality": modality,
        "orientation": orientation,
        "prompts": prompt_values(result.prompts, result.label_values),
        "labels": [{**entry, "vocabulary": match_prompt(entry["prompt"]).to_dict(),
                    **({"intensity": intensity.get(entry["label"])} if intensity is not None else {})}
                   for entry in label_statistics(result.labels, result.label_values, result.prompts,
                                                 volume.voxel_volume_ml, quality)],
        "geometry": volume.geometry(),
        **({"dicom_series": volume.meta["dicom_series"]} if "dicom_series" in volume.meta else {}),
        "outputs": outputs,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
    if presets:
        sidecar["presets"] = list(presets)
    return sidecar


@dataclass
class PreparedScan:
    """A scan made ready for the model: the 0..255 float32 image and everything needed to map results back.

    ``image`` and ``spacing`` (x, y, z mm) are what the model sees, in the orientation the model expects;
    :meth:`to_input_grid` brings an array computed on ``image``'s grid (a label map, or (K, z, y, x)
    probabilities) back onto the input volume's exact grid. ``describe`` is the sidecar's account of the
    preprocessing, ``orientation`` its ``{"input": code, "model": code, "source": ..., "detail": ...}``.
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    modality: ModalityDecision
    window: str | tuple[float, float]
    orientation: dict[str, Any] = field(default_factory=dict)
    reorientation: Reorientation | None = None

    def to_input_grid(self, array: np.ndarray) -> np.ndarray:
        """An array on the model's grid (trailing axes z, y, x) on the input volume's grid (C-contiguous)."""
        if self.reorientation is None or self.reorientation.is_identity:
            return array
        return np.ascontiguousarray(self.reorientation.undo(array))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description of the modality decision and the normalisation."""
        decision = self.modality
        info: dict[str, Any] = {"modality": decision.modality, "source": decision.source,
                                "normalization": decision.normalization, "detail": decision.detail}
        if decision.normalization == "ct_window":
            info["window"] = self.window
        if decision.warning:
            info["warning"] = decision.warning
        return info


def orientation_target(volume: Volume, modality: str | None, request: str = "auto",
                       table: dict[str, Any] | None = None) -> tuple[str | None, dict[str, Any]]:
    """The code the model should see ``volume`` in (None: as stored) and the sidecar's account of why.

    ``request`` is ``auto`` (the entry of ``table`` for ``modality``; ``table`` None means the published
    model's :data:`~text3dsam_cli.orientation.DEFAULT_ORIENTATION`), ``native`` or a code. Challenge npz
    inputs are never reoriented: their arrays are exactly what the model was trained on.
    """
    request = check_request(request)
    if volume.source_format == "npz":
        return None, {"input": None, "model": None, "source": "npz",
                      "detail": "challenge npz arrays reach the model as stored"}
    code = closest_code(volume.direction)
    if request == "native":
        target, source, detail = None, "native", "--orientation native: as stored"
    elif request != "auto":
        target, source, detail = request, "override", "given explicitly"
    else:
        known = dict(DEFAULT_ORIENTATION) if table is None else check_table(table)
        where = "the published model's default table" if table is None else "the checkpoint's inference.orientation"
        target = known.get(modality or "")
        source = "default" if table is None else "checkpoint"
        detail = (f"{modality} -> {target} from {where}" if target else
                  f"modality {modality} is not in {where}: as stored")
    return target, {"input": code, "model": target or code, "source": source, "detail": detail}


def prepare_scan(volume: Volume, modality: str | None = None, window: str | tuple[float, float] = DEFAULT_WINDOW,
                 orientation: str = "auto", table: dict[str, Any] | None = None,
                 in_place: bool = False, prompts: Sequence[str] = ()) -> PreparedScan:
    """Decide the modality once, reorient to the model's orientation, normalise, and record how to map back.

    ``orientation`` and ``table``: see :func:`orientation_target`. Reorienting is a pure permutation/flip of
    the axes (never a resampling); the spacing follows the permutation. ``in_place``: the intensities of
    ``volume`` are not needed afterwards, so a float32 array may be normalised where it lies (no second
    whole-volume copy; a whole-body float CT is 0.8 GB). ``prompts``: the prompts to be segmented, which may
    decide the modality (:func:`~text3dsam_cli.preprocess.resolve_modality`).
    """
    decision = resolve_modality(volume, modality, prompts)
    target, info = orientation_target(volume, decision.modality, orientation, table)
    change = None
    if target is not None:
        change = reorientation(volume.direction, volume.shape, target)
        if not change.is_identity:
            # One copy in the stored dtype, so normalisation reads (and the model gets) C-ordered memory.
            moved = change.volume(volume)
            volume = Volume(np.ascontiguousarray(moved.array), moved.spacing, moved.origin, moved.direction,
                            volume.path, volume.source_format, volume.modality, volume.meta)
    image = normalize_as(volume, decision, window, in_place=in_place)
    return PreparedScan(image=image, spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
                        modality=decision, window=window, orientation=info, reorientation=change)


def read_input(input: str | os.PathLike[str], series_uid: str | None = None) -> tuple[InputItem, Volume]:
    """Read ONE input (a file, a DICOM series folder, an npz) by ``segment``'s rules (``expand_inputs`` then
    ``read_volume``); a folder of several inputs is refused. What the viewer and the Python API read."""
    items = expand_inputs([input])
    if len(items) != 1:
        raise UsageError(f"{os.fspath(input)}: one scan is needed, but this holds {len(items)} inputs: give one "
                         "of them")
    if items[0].error is not None:
        raise InputError(items[0].error, items[0].path)
    return items[0], read_volume(items[0].path, series_uid=series_uid)


def orientation_table(segmenter: Segmenter) -> dict[str, Any] | None:
    """The checkpoint's recorded ``inference.orientation`` table, checked (None: the published default)."""
    recorded = (segmenter.model.config.inference or {}).get("orientation")
    try:
        return None if recorded is None else check_table(recorded)
    except UsageError as exc:
        raise CheckpointError(f"config.json: {exc}", segmenter.model.source.get("model")) from None


def resolve_prompts(volume: Volume, prompts: Sequence[str], label_values: Sequence[int] | None,
                    options: SegmentOptions,
                    where: str | os.PathLike[str] | None = None) -> tuple[list[str], list[int]]:
    """The prompts and label values one input is segmented with: the given prompts (checked by the prompt
    rule, :func:`~text3dsam_cli.prompts.check_prompts`) or the input's own ``text_prompts``;
    ``--strict-prompts`` and ``--max-prompts``; a challenge instance case's first prompt alone."""
    where = volume.path if where is None else where
    prompts, values, instance = prompts_for(volume, prompts, label_values)
    if options.strict_prompts:
        check_known_prompts(prompts, where)
    if options.max_prompts and len(prompts) > options.max_prompts:
        raise InputError(f"{len(prompts)} prompts, more than --max-prompts {options.max_prompts} "
                         "(each prompt is decoded separately; raise the limit to run them all)", where)
    return prompts_to_segment(prompts, values, instance)


def release_intensities(volume: Volume) -> None:
    """Let go of ``volume``'s voxels (kept: its geometry and shape), once nothing reads them any more."""
    volume.array = np.broadcast_to(np.zeros((), dtype=volume.array.dtype), volume.array.shape)


def segment_scan(segmenter: Segmenter, scan: PreparedScan, prompts: Sequence[str], values: Sequence[int], *,
                 encoded: EncodedImage | None = None, probabilities: bool = False) -> SegmentationResult:
    """The model on a prepared scan, the result brought back to the input's grid (:meth:`PreparedScan.to_input_grid`).

    Without ``encoded`` the scan's image is handed over to :meth:`Segmenter.segment` (``scan.image`` is empty
    afterwards, so that the float32 copy is freed before the label map is made); with ``encoded`` (what
    :meth:`Segmenter.encode` made of ``scan.image``, as the viewer keeps it) only the prompts are decoded.
    """
    if encoded is None:
        image, scan.image = [scan.image], np.empty(0, dtype=np.float32)
        result = segmenter.segment(image, prompts, values, spacing=scan.spacing, keep_probabilities=probabilities)
        del image
    else:
        result = segmenter.segment_encoded(encoded, prompts, values, keep_probabilities=probabilities)
    t0 = time.perf_counter()
    result.labels = scan.to_input_grid(result.labels)
    if result.probabilities is not None:
        result.probabilities = scan.to_input_grid(result.probabilities)
    result.timings["to_input_grid"] = time.perf_counter() - t0
    return result


@dataclass
class InputResult:
    """One input segmented (:func:`segment_volume`): the result on the input's grid and its account."""

    volume: Volume
    scan: PreparedScan
    result: SegmentationResult
    quality: dict[int, dict[str, Any]]
    timings: dict[str, float]
    intensity: dict[int, dict[str, Any]] | None = None  # --statistics: label value -> intensity statistics
    presets: tuple[str, ...] = ()

    def sidecar(self, item: InputItem | str | None, model_source: dict[str, Any], outputs: dict[str, str],
                timings: dict[str, float] | None = None) -> dict[str, Any]:
        """The sidecar of this result (:func:`build_sidecar`)."""
        return build_sidecar(item, self.volume, self.result, model_source, self.scan.describe(), outputs,
                             self.timings if timings is None else timings, self.scan.orientation, self.quality,
                             self.intensity, self.presets)


def segment_volume(segmenter: Segmenter, volume: Volume, prompts: Sequence[str], values: Sequence[int],
                   options: SegmentOptions, orientation: str = "auto", table: dict[str, Any] | None = None,
                   keep_intensities: bool = False) -> InputResult:
    """Everything ``segment`` does to one read input between reading and writing, in one call for the CLI
    (:class:`SegmentRun`) and the Python API (:mod:`text3dsam_cli.api`): :func:`prepare_scan` (modality,
    window, orientation), :func:`segment_scan` (encode, decode, back to the input grid) and
    :func:`~text3dsam_cli.quality.assess_labels` (clean-up, quality figures).

    ``prompts``/``values`` come from :func:`resolve_prompts` (they also take part in the modality decision).
    Unless ``keep_intensities`` (the preview draws them) or ``options.statistics`` (intensity statistics per
    label, :mod:`text3dsam_cli.statistics`), the volume's voxels are normalised where they lie and then let go:
    ``volume`` keeps its geometry.
    """
    keep_intensities = keep_intensities or options.statistics
    t0 = time.perf_counter()
    scan = prepare_scan(volume, options.modality, options.window, orientation, table,
                        in_place=not keep_intensities, prompts=prompts)
    t_pre = time.perf_counter() - t0
    if not keep_intensities:
        release_intensities(volume)
    result = segment_scan(segmenter, scan, prompts, values, probabilities=options.probabilities)
    t0 = time.perf_counter()
    # Clean-up (if asked) happens here, before any output is written, so every output agrees. (Not overlapped
    # with the writes: cc3d holds the GIL for its whole labelling, which stalled them; docs/performance.md.)
    quality = assess_labels(result.labels, result.label_values, volume.voxel_volume_ml,
                            options.largest_component, options.min_size_ml)
    timings = {"preprocess": t_pre, **result.timings, "quality": time.perf_counter() - t0}
    intensity = None
    if options.statistics:  # the input's own values inside each (cleaned) label, one pass for all labels
        from text3dsam_cli.statistics import intensity_statistics

        t0 = time.perf_counter()
        intensity = intensity_statistics(volume.array, result.labels, result.label_values)
        timings["statistics"] = time.perf_counter() - t0
    return InputResult(volume, scan, result, quality, timings, intensity, tuple(options.presets))


def model_name(model_source: dict[str, Any]) -> str:
    """The model's name in DICOM objects: its repo id, or ``Text3DSAM (<folder name>)``."""
    source = str(model_source.get("model") or "Text3DSAM")
    return source if model_source.get("commit") else f"Text3DSAM ({Path(source).name})"


def write_outputs(item: InputItem | str | None, done: InputResult, plan: OutputPlan, model_source: dict[str, Any],
                  timings: dict[str, float] | None = None, sources: dict[str, Any] | None = None,
                  before_sidecar: Callable[[dict[str, str], dict[str, Any]], None] | None = None,
                  ) -> tuple[list[str], dict[str, Any]]:
    """Write every output of ``plan`` and then the sidecar, as ``segment`` does: an in-progress marker first,
    each file atomically, and on any failure nothing of this attempt left (the marker goes last).

    ``timings`` (default ``done.timings``) gets the ``write`` time. ``before_sidecar(written, sidecar)`` runs
    once the files are written, before the sidecar is (``--store`` sends the DICOM outputs there and records
    it in the sidecar; if it raises, nothing of this attempt stays). Returns the written files (label map
    first, sidecar last) and the sidecar.
    """
    t0 = time.perf_counter()
    written: dict[str, str] = {}
    created: list[str] = []
    before = existing(plan)
    write_marker(plan, plan.files)
    try:
        _write_files(done.volume, done.result, plan, written, created, model_name(model_source), sources)
        timings = {**(done.timings if timings is None else timings), "write": time.perf_counter() - t0}
        sidecar = done.sidecar(item, model_source, written, timings)
        if before_sidecar is not None:
            before_sidecar(written, sidecar)
        write_json(plan.sidecar, sidecar)
    except BaseException:  # nothing half-done stays: remove what this attempt wrote (the marker goes last)
        discard_attempt(plan, created, before)
        raise
    remove_marker(plan)
    files = [written["labels"], *[v for k, v in written.items() if k != "labels"], str(plan.sidecar)]
    return files, sidecar


def _write_files(volume: Volume, result: SegmentationResult, plan: OutputPlan, written: dict[str, str],
                 created: list[str], name: str, sources: dict[str, Any] | None = None) -> None:
    """Write every output of ``plan`` but the sidecar, recording each in ``written`` and ``created``."""
    extras = plan.extras

    def record(key: str, path: Path) -> None:
        created.append(str(path))
        written[key] = str(path)

    for companion in formats.COMPANION_FORMATS:  # first: the outputs most likely to be refused
        path = extras.get(companion.name)
        if path is not None:
            companion.write(volume, result.labels, result.label_values, result.prompts, path, model_name=name,
                            sources=(sources or {}).get(companion.name))
            record(companion.name, path)
    record("labels", write_volume(volume.with_array(result.labels), plan.labels))  # format from the name
    for value, prompt in zip(result.label_values, result.prompts):
        path = extras.get(f"mask:{value}")
        if path is not None:
            write_volume(volume.with_array((result.labels == value).astype(np.uint8)), path)
            record(f"mask:{prompt}", path)
    label_format = formats.output_format(plan.labels)
    if result.probabilities is not None and label_format is not None:
        for key, path in label_format.write_probabilities(volume, result.probabilities, result.label_values,
                                                          result.prompts, extras):
            record(key, path)
    if "preview" in extras:
        from text3dsam_cli.preview import write_preview

        write_preview(volume, result.labels, result.label_values, result.prompts, extras["preview"])
        record("preview", extras["preview"])


#: ``TEXT3DSAM_WRITE_BEHIND``: 1 writes each input's outputs on a writer thread while the next input is
#: processed, 0 writes them in turn; unset: :func:`wants_write_behind` decides.
WRITE_BEHIND_ENV = "TEXT3DSAM_WRITE_BEHIND"


def write_behind_setting() -> bool | None:
    """``TEXT3DSAM_WRITE_BEHIND`` as True/False, None when unset; a usage error for anything else."""
    text = os.environ.get(WRITE_BEHIND_ENV, "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    if text:
        raise UsageError(f"{WRITE_BEHIND_ENV}={os.environ[WRITE_BEHIND_ENV]!r}: expected 1 or 0")
    return None


def wants_write_behind(segmenter: Segmenter, asked: bool | None = None) -> bool:
    """Whether a folder run writes an input's outputs while the next input is processed.

    ``asked`` (or ``TEXT3DSAM_WRITE_BEHIND``) decides when given. Otherwise: on an accelerator, where the CPU
    waits for the device and compression has cores to itself; not on the CPU, where the model already uses
    every core (docs/performance.md has the measurement)."""
    if asked is None:
        asked = write_behind_setting()
    if asked is not None:
        return asked
    return segmenter.device.type != "cpu"


class SegmentRun:
    """Runs a list of inputs through one :class:`Segmenter`, reading the next input while the current one infers.

    With ``write_behind`` (:func:`wants_write_behind`) an input's outputs are written on a writer thread while
    the next input is read, prepared and segmented; outcomes and ``on_event`` calls stay in input order, in the
    calling thread, and at most one input's outputs wait to be written."""

    def __init__(self, segmenter: Segmenter, prompts: Sequence[str], options: SegmentOptions,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None, read_ahead: int = 1,
                 label_values: Sequence[int] | None = None, write_behind: bool | None = None) -> None:
        self.segmenter = segmenter
        self.write_behind = wants_write_behind(segmenter, write_behind)
        self.label_values = list(label_values) if label_values is not None else None
        if self.label_values is not None and len(self.label_values) != len(prompts):
            raise UsageError("one label value per prompt is needed")
        self.read_ahead = max(0, read_ahead)
        self.prompts = check_prompts(prompts)
        check_options(options)
        self.options = options
        self.orientation = check_request(options.orientation)
        self.orientation_table = orientation_table(segmenter)
        self.on_event = on_event or (lambda kind, data: None)
        self._on_server: set[int] = set()  # plans skipped because the DICOMweb server holds their outputs

    def _read(self, item: InputItem) -> Volume:
        if isinstance(item.path, dicomweb.DicomWebSource):
            return dicomweb.read_source(item.path, self.options.series_uid, self.options.dicomweb_token)
        return read_volume(item.path, series_uid=self.options.series_uid)

    def _stored(self, item: InputItem, plan: OutputPlan) -> bool:
        """``--skip-existing`` for a DICOMweb input: its DICOM outputs are on the server already (a failed
        look-up marks the input failed)."""
        o = self.options
        try:
            stored = dicomweb.already_stored(item.path, o.series_uid, self.prompts,
                                             model_name(self.segmenter.model.source),
                                             [c.name for c in companions(o)], o.store_to, o.dicomweb_token)
            if stored:
                self._on_server.add(id(plan))
            return stored
        except Text3DSAMError as exc:
            text = str(exc)
            plan.error = text if text.startswith(f"{item.path}: ") else f"{item.path}: {text}"
            return False

    def _prefetched(self, items: Sequence[InputItem], todo: Sequence[bool],
                    early: MutableMapping[int, Future] | None = None) -> Iterator[tuple[InputItem, Future]]:
        """Yield (item, future volume); with ``read_ahead`` the next inputs are read while this one infers.
        ``early``: reads already started by the caller (index -> future), used for inputs still to be done and
        taken out of the mapping (so that a volume read for an input that fails its checks is not kept)."""
        workers = max(1, self.read_ahead)
        pending: dict[int, Future] = {}
        for index in list(early or {}):
            future = early.pop(index)  # type: ignore[union-attr]
            if 0 <= index < len(todo) and todo[index]:
                pending[index] = future
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="text3dsam-read") as pool:
            for index, item in enumerate(items):
                for ahead in range(index, min(len(items), index + 1 + self.read_ahead)):
                    if ahead not in pending and todo[ahead]:
                        pending[ahead] = pool.submit(self._read, items[ahead])
                future = pending.pop(index, None)
                if future is None:  # skipped input: nothing to read
                    future = Future()
                    future.set_result(None)
                yield item, future

    def _plan(self, item: InputItem, out: Path) -> OutputPlan:
        """Every output path of one input (label values from the prompts, or from an npz's text_prompts)."""
        values: list[int] | None = None
        if self.prompts:
            values = self.label_values or list(range(1, len(self.prompts) + 1))
        elif item.kind == "npz" and item.error is None:
            values = _stored_label_values(item.path)
        o = self.options
        return plan_files(out, FILE_SUFFIXES, values, o.split, o.probabilities, o.preview, companions(o))

    def run(self, items: Sequence[InputItem], early: MutableMapping[int, Future] | None = None) -> RunSummary:
        """Process every input; failures are recorded, never raised (except usage errors). ``early``: reads
        of some inputs already under way (index -> future :class:`Volume`, as :func:`read_volume` gives);
        the run takes them out of the mapping."""
        start = time.perf_counter()
        check_input_prompts(items, self.prompts)
        plans = [self._plan(item, out) for item, out in zip(items, plan_outputs(items, self.options))]
        claims = Claims(item.path for item in items)
        for item, plan in zip(items, plans):
            problem = item.error or claims.claim(plan, str(item.path))
            if problem is not None:
                plan.error = problem if problem.startswith(f"{item.path}: ") else f"{item.path}: {problem}"
        clean_stale_temps(f for plan in plans if plan.error is None for f in (*plan.files, plan.marker))
        todo = []
        for item, plan in zip(items, plans):  # _stored may mark a plan failed (the server could not be asked)
            done = plan.error is None and self.options.skip_existing and (is_done(plan) or self._stored(item, plan))
            todo.append(plan.error is None and not done)
        outcomes: list[ItemOutcome] = []
        waiting: tuple[InputItem, float, Future] | None = None  # the input whose outputs are being written

        def finish(item: InputItem, t0: float, outcome: ItemOutcome | Future) -> None:
            if isinstance(outcome, Future):
                try:
                    outcome = outcome.result()
                except BaseException as exc:  # mapped like a failure in the calling thread
                    outcome = self._failed(item, exc)
            outcome.seconds = time.perf_counter() - t0
            dicomweb.release([item.path])  # the temporary copy of a retrieved series
            outcomes.append(outcome)
            self.on_event("done", {"outcome": outcome})

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="text3dsam-write") as writer:
            for (item, future), plan, do in zip(self._prefetched(items, todo, early), plans, todo):
                t0 = time.perf_counter()
                self.on_event("start", {"input": str(item.path), "output": str(plan.labels)})
                result: ItemOutcome | Future
                if plan.error is not None:
                    result = ItemOutcome(str(item.path), "failed", error=plan.error)
                elif not do:  # no local outputs listed when the server holds them (dicomweb.already_stored)
                    result = ItemOutcome(str(item.path), "skipped", [] if id(plan) in self._on_server else
                                         [str(p) for p in plan.files])
                else:
                    try:
                        write = self._process(item, future, plan, claims)
                        result = writer.submit(write) if self.write_behind else write()
                    except BaseException as exc:  # an interrupt is raised again by _failed
                        result = self._failed(item, exc)
                if waiting is not None:  # the previous input's outputs, written meanwhile
                    finish(*waiting)
                    waiting = None
                if isinstance(result, Future):
                    waiting = (item, t0, result)
                else:
                    finish(item, t0, result)
            if waiting is not None:
                finish(*waiting)
        return RunSummary(outcomes, time.perf_counter() - start)

    @staticmethod
    def _failed(item: InputItem, exc: BaseException) -> ItemOutcome:
        """One input's failure as its outcome; an interrupt (or exit) is raised again, ending the run."""
        if isinstance(exc, Text3DSAMError):
            text = str(exc) if str(exc).startswith(f"{item.path}: ") else f"{item.path}: {exc}"
            return ItemOutcome(str(item.path), "failed", error=text, exception=exc)
        if isinstance(exc, MemoryError):
            return ItemOutcome(str(item.path), "failed", error=f"{item.path}: out of memory")
        if not isinstance(exc, Exception):
            raise exc
        # an unexpected failure on one input must not end the batch
        log.debug("unexpected failure on %s", item.path, exc_info=exc)
        return ItemOutcome(str(item.path), "failed", error=f"{item.path}: {type(exc).__name__}: {exc}",
                           exception=exc)

    def _process(self, item: InputItem, future: Future, plan: OutputPlan,
                 claims: Claims) -> Callable[[], ItemOutcome]:
        """Read (wait for the prefetched volume), check, prepare and segment one input; returns the writing of
        its outputs, to be called in this thread or on the writer thread."""
        t_read = time.perf_counter()
        volume: Volume = future.result()
        waited = time.perf_counter() - t_read
        o = self.options
        prompts, values = resolve_prompts(volume, self.prompts, self.label_values, o, item.path)
        wanted = companions(o)
        for companion in wanted:
            if volume.source_format != companion.source_format:
                raise InputError(f"{option_name(companion)} needs a DICOM series input", item.path)
        # Refuse a series that cannot be referenced before the model runs (what is read is kept for writing).
        sources = {companion.name: companion.check_source(volume) for companion in wanted}
        if not is_orthogonal(volume.direction) and any(
                not fmt.keeps_shear for fmt in map(formats.output_format, plan.files) if fmt is not None):
            raise InputError(SHEARED_NIFTI, item.path)
        # Only the preview shows the input's intensities; otherwise they are let go once normalised.
        done = segment_volume(self.segmenter, volume, prompts, values, o, self.orientation,
                              self.orientation_table, keep_intensities=o.preview)
        result = done.result
        final = plan_files(plan.labels, FILE_SUFFIXES, result.label_values, o.split, o.probabilities and
                           result.probabilities is not None, o.preview, wanted)
        if final.files != plan.files:  # label values known only now (an npz's own prompts): check again
            problem = claims.claim(final, str(item.path))
            if problem is not None:
                raise InputError(problem, item.path)
        store = o.store or bool(o.store_to)

        def dicomweb_record(written: dict[str, str], sidecar: dict[str, Any]) -> None:
            """The server the input came from, and what went back to it (``--store``)."""
            if "dicomweb" in volume.meta or store:
                sidecar["dicomweb"] = dict(volume.meta.get("dicomweb", {}))
                if store:
                    sidecar["dicomweb"]["store"] = dicomweb.store_outputs(
                        item.path, written, [c.name for c in wanted], o.store_to, o.dicomweb_token)

        def write() -> ItemOutcome:
            files, sidecar = write_outputs(item, done, final, dict(self.segmenter.model.source),
                                           {"read_wait": waited, **done.timings}, sources, dicomweb_record)
            return ItemOutcome(str(item.path), "ok", files, sidecar=sidecar)

        return write
