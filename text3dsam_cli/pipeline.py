"""The ``segment`` job as a Python API: inputs -> read (prefetched) -> preprocess -> Segmenter -> outputs.

Nothing here prints: progress goes through an ``on_event`` callback and the result is a :class:`RunSummary`
the CLI renders. Each input succeeds or fails on its own; a bad input never stops the batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli import __version__
from text3dsam_cli.errors import InputError, Text3DSAMError, UsageError
from text3dsam_cli.inference import SegmentationResult, Segmenter
from text3dsam_cli.io import InputItem, Volume, atomic_path, read_volume, write_volume
from text3dsam_cli.preprocess import DEFAULT_WINDOW, ModalityDecision, normalize_as, resolve_modality
from text3dsam_cli.prompts import check_known_prompts, match_prompt, prompts_for

log = logging.getLogger(__name__)

#: ``--format`` choices -> file ending.
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha", "npz": ".npz"}
FILE_SUFFIXES = tuple(FORMATS.values())
DEFAULT_OUTPUT_DIR = "text3dsam_output"


@dataclass
class SegmentOptions:
    """Everything about a segment run that is not the inputs, the prompts or the model."""

    output: str | None = None
    fmt: str | None = None  # None: npz for npz inputs, nii.gz otherwise
    series_uid: str | None = None
    modality: str | None = None
    window: str = DEFAULT_WINDOW
    split: bool = False
    probabilities: bool = False
    preview: bool = False
    dicom_seg: bool = False
    rtstruct: bool = False
    skip_existing: bool = False
    strict_prompts: bool = False  # refuse prompts that are not phrasings of the vocabulary


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


def _has_file_suffix(path: str) -> bool:
    return path.lower().endswith(FILE_SUFFIXES)


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
            suffix = FORMATS[fmt] if fmt else (".npz" if item.kind == "npz" else ".nii.gz")
            outputs.append(folder / f"{item.stem}{suffix}")
    inputs = {item.path.resolve() for item in items}
    for out in outputs:
        if out.resolve() in inputs:
            raise UsageError(f"output {out} would overwrite an input")
    return outputs


def output_stem(path: Path) -> str:
    """``out/case.nii.gz`` -> ``out/case`` (for sidecars, split masks, previews)."""
    name = path.name
    for suffix in FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return str(path.with_name(name[: -len(suffix)]))
    return str(path)


def label_statistics(labels: np.ndarray, values: Sequence[int], prompts: Sequence[str],
                     voxel_ml: float) -> list[dict[str, Any]]:
    """Per prompt: label value, voxel count and volume in ml."""
    counts = np.bincount(labels.ravel(), minlength=max(values, default=0) + 1)
    return [{"label": int(v), "prompt": p, "voxels": int(counts[v]), "volume_ml": round(float(counts[v]) * voxel_ml, 4)}
            for v, p in zip(values, prompts)]


def prompt_values(prompts: Sequence[str], values: Sequence[int]) -> dict[str, int | list[int]]:
    """The sidecar's ``prompts`` map: prompt -> label value, or -> the list of its values when a prompt is given
    more than once (so no label is lost; the ``labels`` list stays the full, ordered account)."""
    grouped: dict[str, list[int]] = {}
    for prompt, value in zip(prompts, values):
        grouped.setdefault(prompt, []).append(int(value))
    return {p: v[0] if len(v) == 1 else v for p, v in grouped.items()}


def build_sidecar(item: InputItem, volume: Volume, result: SegmentationResult, model_source: dict[str, Any],
                  modality: dict[str, Any], outputs: dict[str, str], timings: dict[str, float]) -> dict[str, Any]:
    """The JSON written beside each output."""
    return {
        "text3dsam_version": __version__,
        "input": str(item.path),
        "input_format": volume.source_format,
        "model": model_source,
        "mode": result.mode,
        "device": result.device,
        "modality": modality,
        "prompts": prompt_values(result.prompts, result.label_values),
        "labels": [{**entry, "vocabulary": match_prompt(entry["prompt"]).to_dict()} for entry in
                   label_statistics(result.labels, result.label_values, result.prompts, volume.voxel_volume_ml)],
        "geometry": volume.geometry(),
        "outputs": outputs,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    """Atomically write pretty JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@dataclass
class PreparedScan:
    """A scan made ready for the model: the 0..255 float32 image and everything needed to map results back.

    ``image`` and ``spacing`` (x, y, z mm) are what the model sees; :meth:`to_input_grid` brings an array
    computed on ``image``'s grid (a label map, or (K, z, y, x) probabilities) back onto the input volume's
    exact grid. ``describe`` is the sidecar's account of the preprocessing.
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    modality: ModalityDecision
    window: str

    def to_input_grid(self, array: np.ndarray) -> np.ndarray:
        """An array on the model's grid (trailing axes z, y, x) on the input volume's grid."""
        return array

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description of the modality decision and the normalisation."""
        decision = self.modality
        info: dict[str, Any] = {"modality": decision.modality, "source": decision.source,
                                "normalization": decision.normalization, "detail": decision.detail}
        if decision.normalization == "ct_window":
            info["window"] = self.window
        return info


def prepare_scan(volume: Volume, modality: str | None = None, window: str = DEFAULT_WINDOW) -> PreparedScan:
    """Decide the modality once, normalise the intensities, and record how to map results back."""
    decision = resolve_modality(volume, modality)
    image = normalize_as(volume, decision, window)
    return PreparedScan(image=image, spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
                        modality=decision, window=window)


class SegmentRun:
    """Runs a list of inputs through one :class:`Segmenter`, reading the next input while the current one infers."""

    def __init__(self, segmenter: Segmenter, prompts: Sequence[str], options: SegmentOptions,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None, read_ahead: int = 1,
                 label_values: Sequence[int] | None = None) -> None:
        self.segmenter = segmenter
        self.label_values = list(label_values) if label_values is not None else None
        if self.label_values is not None and len(self.label_values) != len(prompts):
            raise UsageError("one label value per prompt is needed")
        self.read_ahead = max(0, read_ahead)
        self.prompts = [str(p) for p in prompts]
        if any(not p.strip() for p in self.prompts):
            raise UsageError("empty prompt: prompts must contain text")
        self.options = options
        self.on_event = on_event or (lambda kind, data: None)

    def _read(self, item: InputItem) -> Volume:
        return read_volume(item.path, series_uid=self.options.series_uid)

    def _prefetched(self, items: Sequence[InputItem], todo: Sequence[bool]) -> Iterator[tuple[InputItem, Future]]:
        """Yield (item, future volume); with ``read_ahead`` the next inputs are read while this one infers."""
        workers = max(1, self.read_ahead)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="text3dsam-read") as pool:
            pending: dict[int, Future] = {}
            for index, item in enumerate(items):
                for ahead in range(index, min(len(items), index + 1 + self.read_ahead)):
                    if ahead not in pending and todo[ahead]:
                        pending[ahead] = pool.submit(self._read, items[ahead])
                future = pending.pop(index, None)
                if future is None:  # skipped input: nothing to read
                    future = Future()
                    future.set_result(None)
                yield item, future

    def run(self, items: Sequence[InputItem]) -> RunSummary:
        """Process every input; failures are recorded, never raised (except usage errors)."""
        start = time.perf_counter()
        outputs = plan_outputs(items, self.options)
        todo = [not (self.options.skip_existing and out.exists()) for out in outputs]
        outcomes: list[ItemOutcome] = []
        for (item, future), out, do in zip(self._prefetched(items, todo), outputs, todo):
            t0 = time.perf_counter()
            self.on_event("start", {"input": str(item.path), "output": str(out)})
            if not do:
                outcome = ItemOutcome(str(item.path), "skipped", [str(out)])
            else:
                try:
                    outcome = self._process(item, future, out)
                except Text3DSAMError as exc:
                    outcome = ItemOutcome(str(item.path), "failed", error=str(exc), exception=exc)
                except MemoryError:
                    outcome = ItemOutcome(str(item.path), "failed", error=f"{item.path}: out of memory")
                except Exception as exc:  # an unexpected failure on one input must not end the batch
                    log.debug("unexpected failure on %s", item.path, exc_info=True)
                    outcome = ItemOutcome(str(item.path), "failed", error=f"{item.path}: {type(exc).__name__}: {exc}",
                                          exception=exc)
            outcome.seconds = time.perf_counter() - t0
            outcomes.append(outcome)
            self.on_event("done", {"outcome": outcome})
        return RunSummary(outcomes, time.perf_counter() - start)

    def _process(self, item: InputItem, future: Future, out: Path) -> ItemOutcome:
        t_read = time.perf_counter()
        volume: Volume = future.result()
        waited = time.perf_counter() - t_read
        prompts, values, instance = prompts_for(volume, self.prompts, self.label_values)
        if self.options.strict_prompts:
            check_known_prompts(prompts, item.path)
        if self.options.dicom_seg and volume.source_format != "dicom":
            raise InputError("--dicom-seg needs a DICOM series input", item.path)
        if self.options.rtstruct and volume.source_format != "dicom":
            raise InputError("--rtstruct needs a DICOM series input", item.path)
        sources = None
        if self.options.rtstruct:  # refuse a series that cannot be referenced before the model runs
            from text3dsam_cli.io.dicomseg import read_source_series

            sources = read_source_series(volume, "RTSTRUCT")
        t0 = time.perf_counter()
        scan = prepare_scan(volume, self.options.modality, self.options.window)
        t_pre = time.perf_counter() - t0
        result = self.segmenter.segment(scan.image, prompts, values, spacing=scan.spacing, instance=instance,
                                        keep_probabilities=self.options.probabilities)
        scan.image = np.empty(0, dtype=np.float32)  # free the model input before writing
        result.labels = scan.to_input_grid(result.labels)
        if result.probabilities is not None:
            result.probabilities = scan.to_input_grid(result.probabilities)
        written: dict[str, str] = {}
        t0 = time.perf_counter()
        stem = output_stem(out)
        source = str(self.segmenter.model.source.get("model") or "Text3DSAM")
        name = source if self.segmenter.model.source.get("commit") else f"Text3DSAM ({Path(source).name})"
        if self.options.dicom_seg:  # first: the output most likely to be refused (source UIDs, highdicom)
            from text3dsam_cli.io.dicomseg import write_dicom_seg

            path = Path(f"{stem}.seg.dcm")
            write_dicom_seg(volume, result.labels, result.label_values, result.prompts, path, model_name=name)
            written["dicom_seg"] = str(path)
        if self.options.rtstruct:
            from text3dsam_cli.io.rtstruct import write_rtstruct

            path = Path(f"{stem}.rtstruct.dcm")
            write_rtstruct(volume, result.labels, result.label_values, result.prompts, path, model_name=name,
                           sources=sources)
            written["rtstruct"] = str(path)
        written["labels"] = str(self._write_labels(volume, result, out))
        suffix = out.name[len(Path(stem).name):]
        if self.options.split:
            for value, prompt in zip(result.label_values, result.prompts):
                path = Path(f"{stem}_label{value}{suffix}")
                write_volume(volume.with_array((result.labels == value).astype(np.uint8)), path)
                written[f"mask:{prompt}"] = str(path)
        if self.options.probabilities and result.probabilities is not None:
            written.update(self._write_probabilities(volume, result, stem, suffix))
        if self.options.preview:
            from text3dsam_cli.preview import write_preview

            path = Path(f"{stem}_preview.png")
            write_preview(volume, result.labels, result.label_values, result.prompts, path)
            written["preview"] = str(path)
        timings = {"read_wait": waited, "preprocess": t_pre, **result.timings, "write": time.perf_counter() - t0}
        sidecar = build_sidecar(item, volume, result, dict(self.segmenter.model.source), scan.describe(), written,
                                timings)
        sidecar_path = Path(f"{stem}.json")
        write_json(sidecar, sidecar_path)
        files = [written["labels"], *[v for k, v in written.items() if k != "labels"], str(sidecar_path)]
        return ItemOutcome(str(item.path), "ok", files, sidecar=sidecar)

    def _write_labels(self, volume: Volume, result: SegmentationResult, out: Path) -> Path:
        if out.name.lower().endswith(".npz"):
            from text3dsam_cli.io import write_challenge_npz

            return write_challenge_npz(out, segs=result.labels)
        return write_volume(volume.with_array(result.labels), out)

    def _write_probabilities(self, volume: Volume, result: SegmentationResult, stem: str,
                             suffix: str) -> dict[str, str]:
        probs = result.probabilities
        assert probs is not None
        if suffix.lower() == ".npz":
            from text3dsam_cli.io import write_challenge_npz

            path = Path(f"{stem}_probabilities.npz")
            write_challenge_npz(path, probabilities=probs,
                                label_values=np.asarray(result.label_values, dtype=np.int32))
            return {"probabilities": str(path)}
        written = {}
        for j, (value, prompt) in enumerate(zip(result.label_values, result.prompts)):
            path = Path(f"{stem}_prob{value}{suffix}")
            write_volume(volume.with_array(probs[j]), path)
            written[f"probabilities:{prompt}"] = str(path)
        return written

