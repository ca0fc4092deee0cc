"""The high-level Python API: ``text3dsam segment``'s answer for a path, a nibabel image or a SimpleITK image.

```python
import text3dsam_cli

seg = text3dsam_cli.segment("ct.nii.gz", ["liver", "spleen"])   # or a nibabel / SimpleITK image
seg.labels, seg.sidecar["labels"], seg.to_nifti(), seg.to_sitk()
seg.save("ct_seg.nii.gz")                                     # label map + sidecar, as segment writes them

model = text3dsam_cli.Text3DSAM(device="cuda")                  # keeps the model loaded across calls
for path in paths:
    model.segment(path, ["liver"]).save(...)
```

Every call runs the CLI's own per-input steps (:func:`text3dsam_cli.pipeline.read_input`,
:func:`~text3dsam_cli.pipeline.resolve_prompts`, :func:`~text3dsam_cli.pipeline.segment_volume`: modality,
window and orientation, encode, decode, back to the input grid, quality; :func:`~text3dsam_cli.pipeline.write_outputs`
for :meth:`Segmentation.save`), so a result equals ``text3dsam segment``'s label map of the same scan. A nibabel
image is written to a temporary NIfTI file and read by the same reader as a file (one geometry rule); its
result comes back in nibabel's (x, y, z) array layout with the image's own header geometry.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli.errors import InputError, Text3DSAMError, UsageError
from text3dsam_cli.inference import MODES, Segmenter
from text3dsam_cli.io import Volume
from text3dsam_cli.orientation import check_request
from text3dsam_cli.pipeline import (
    FILE_SUFFIXES,
    InputResult,
    SegmentOptions,
    check_options,
    orientation_table,
    read_input,
    resolve_prompts,
    segment_volume,
    write_outputs,
)
from text3dsam_cli.prompts import add_presets, check_label_map_prompts, check_prompts, find_preset, parse_label_map

__all__ = ["CALL_OPTIONS", "INPUT_OPTIONS", "MODEL_OPTIONS", "Segmentation", "Text3DSAM", "segment"]

#: Options of :class:`Text3DSAM` (the model and how it runs): ``segment``'s ``--revision``, ``--precision``,
#: ``--mode``, ``--spacing``, ``--overlap``, ``--sw-batch-size``, ``--threads``; ``embedding_cache`` is the
#: opposite of ``--no-embedding-cache``.
MODEL_OPTIONS = ("revision", "precision", "mode", "spacing", "overlap", "sw_batch_size", "embedding_cache",
                 "threads")
#: Options of :meth:`Text3DSAM.segment` (one input): ``segment``'s options of the same names (``series`` is
#: ``--series``, the SeriesInstanceUID to read from a DICOM folder), and :data:`CALL_OPTIONS`.
INPUT_OPTIONS = ("modality", "window", "orientation", "largest_component", "min_size_ml", "probabilities",
                 "series", "strict_prompts", "max_prompts", "statistics", "presets")
#: Options of :class:`Text3DSAM` that one :meth:`Text3DSAM.segment` call may also set for itself.
CALL_OPTIONS = ("mode", "spacing", "overlap", "sw_batch_size")


def _kind(input: Any) -> str:
    """"path", "sitk", "nibabel" or "volume" (without importing SimpleITK or nibabel)."""
    if isinstance(input, (str, os.PathLike)):
        return "path"
    if isinstance(input, Volume):
        return "volume"
    modules = {cls.__module__.split(".")[0] for cls in type(input).__mro__}
    if "SimpleITK" in modules and hasattr(input, "GetSize"):
        return "sitk"
    if "nibabel" in modules and hasattr(input, "affine") and hasattr(input, "dataobj"):
        return "nibabel"
    if isinstance(input, np.ndarray):
        raise TypeError("a bare array has no geometry: give a path, a nibabel image or a SimpleITK image (or use "
                        "text3dsam_cli.inference.Segmenter on a prepared array, see docs/api.md)")
    raise TypeError(f"cannot segment a {type(input).__name__}: give a path (any input of 'text3dsam segment', a "
                    "DICOM folder included), a nibabel image or a SimpleITK image")


def _renamed(exc: Text3DSAMError, name: str) -> Text3DSAMError:
    """The same error naming ``name`` instead of a temporary file."""
    text = str(exc)
    if exc.path and text.startswith(f"{exc.path}: "):
        text = text[len(exc.path) + 2:]
    renamed = type(exc).__new__(type(exc))  # the same type and attributes (e.g. NonFiniteValues.kind)
    renamed.__dict__.update(exc.__dict__)
    Text3DSAMError.__init__(renamed, text, name)  # another message and path
    return renamed


@dataclass
class _Source:
    """An input read as a :class:`Volume`, and what is needed to give results back in its own terms."""

    volume: Volume
    name: str | None  # what the sidecar records as "input" (None: an image from memory)
    layout: str  # "zyx" (SimpleITK's, for paths and SimpleITK images) or "xyz" (nibabel's)
    nifti: Any = None  # the nibabel image given


def _read_sitk(image: Any) -> Volume:
    from text3dsam_cli.io.itk import volume_from_image
    from text3dsam_cli.io.limits import check_voxel_count

    name = "<SimpleITK image>"
    modality = None
    if image.HasMetaDataKey("0008|0060"):  # DICOM Modality, as SimpleITK's series reader keeps it
        modality = image.GetMetaData("0008|0060").strip().upper() or None
    check_voxel_count(image.GetSize(), name)
    return volume_from_image(image, Path(name), "simpleitk", modality, {})


def _read_nibabel(image: Any) -> Volume:
    """A nibabel image through a temporary NIfTI file and the NIfTI reader: the same geometry rule and checks
    (NaN, voxel limit, layout) as for a file, so the result equals segment's for the saved image."""
    import nibabel as nib

    filename = image.get_filename() if hasattr(image, "get_filename") else None
    name = filename or "<nibabel image>"
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is one; others (MGH, Analyze, ...) become NIfTI-1
        image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine)
    from text3dsam_cli.io import read_volume

    with tempfile.TemporaryDirectory(prefix="text3dsam-api-") as folder:
        path = Path(folder) / "image.nii"
        try:
            nib.save(image, path)
        except Exception as exc:  # nibabel refuses the image (dtype, shape)
            raise InputError(f"cannot be stored as NIfTI ({type(exc).__name__}: {exc})", name) from None
        try:
            volume = read_volume(path)
        except Text3DSAMError as exc:
            raise _renamed(exc, name) from None
    volume.path = Path(filename) if filename else None
    volume.source_format = "nibabel"
    return volume


def _read(input: Any, series_uid: str | None) -> _Source:
    kind = _kind(input)
    if kind == "path":
        item, volume = read_input(input, series_uid)
        return _Source(volume, str(item.path), "zyx")
    if series_uid is not None:
        raise UsageError("series= picks a series of a DICOM folder; this input is an image in memory")
    if kind == "volume":
        return _Source(input.with_array(np.array(input.array)), str(input.path) if input.path else None, "zyx")
    if kind == "sitk":
        return _Source(_read_sitk(input), None, "zyx")
    volume = _read_nibabel(input)
    return _Source(volume, str(volume.path) if volume.path else None, "xyz", input)


def _prompt_arguments(prompts: Any) -> tuple[list[str], list[int] | None]:
    """``prompts`` as (prompts, label values): a list of texts (values 1..K), one text, a label map
    ``{value: text}`` (as a prompt file's JSON), or None (an npz's own ``text_prompts``). Every text is checked
    by the prompt rule (:func:`text3dsam_cli.prompts.check_prompts`): a UsageError names the first bad one."""
    if prompts is None:
        return [], None
    if isinstance(prompts, str):
        return check_prompts([prompts]), None
    if isinstance(prompts, Mapping):
        data = {str(k): v for k, v in prompts.items()}
        check_label_map_prompts(data)
        try:
            label_map = parse_label_map(data, context="prompts: ")
        except InputError as exc:
            raise UsageError(str(exc)) from None
        return [p.strip() for p in label_map.prompts], list(label_map.values)
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
        raise UsageError(f"prompts must be a list of texts, one text or a {{label value: text}} mapping, got "
                         f"{type(prompts).__name__}")
    if not prompts:
        raise UsageError("no prompts given (give None to use an npz input's own text_prompts)")
    return check_prompts(list(prompts)), None


def _input_options(options: dict[str, Any]) -> tuple[SegmentOptions, str]:
    """The per-input options as ``SegmentOptions`` (checked as segment checks them) and the orientation."""
    unknown = sorted(set(options) - set(INPUT_OPTIONS))
    if unknown:
        model = [k for k in unknown if k in MODEL_OPTIONS]
        where = f" ({', '.join(model)}: an option of Text3DSAM(...))" if model else ""
        raise TypeError(f"unknown option(s) {', '.join(unknown)}{where}; options are "
                        f"{', '.join(INPUT_OPTIONS + CALL_OPTIONS)}")
    known = {f.name for f in fields(SegmentOptions)}
    values = {("series_uid" if k == "series" else k): v for k, v in options.items()}
    assert set(values) <= known
    if "presets" in values:  # one name or several; unknown names are a UsageError (with the closest ones)
        names = [values["presets"]] if isinstance(values["presets"], str) else list(values["presets"] or ())
        values["presets"] = tuple(find_preset(name).name for name in names)
    opts = SegmentOptions(**values)
    check_options(opts)
    try:
        orientation = check_request(opts.orientation)
    except UsageError as exc:
        raise UsageError(f"orientation: {exc}") from None
    return opts, orientation


class Segmentation:
    """One input segmented: what ``text3dsam segment`` writes, in memory.

    ``labels``: the label map on the input's grid, in the input's own array layout (nibabel's (x, y, z) for a
    nibabel image; SimpleITK's (z, y, x) for a SimpleITK image or a path), label ``label_values[k]`` for
    ``prompts[k]``. ``probabilities``: ``(K, *labels.shape)`` float16 per prompt when asked
    (``probabilities=True``), else None. ``sidecar``: the JSON dict ``segment`` writes beside the label map
    (``outputs`` filled in by :meth:`save`).
    """

    def __init__(self, done: InputResult, source: _Source, model_source: dict[str, Any]) -> None:
        self._done = done
        self._source = source
        self._model_source = model_source
        result = done.result
        self.prompts: list[str] = list(result.prompts)
        self.label_values: list[int] = [int(v) for v in result.label_values]
        xyz = source.layout == "xyz"
        self.labels: np.ndarray = result.labels.T if xyz else result.labels
        probs = result.probabilities
        self.probabilities: np.ndarray | None = (probs.transpose(0, 3, 2, 1) if xyz and probs is not None
                                                 else probs)
        self.sidecar: dict[str, Any] = done.sidecar(source.name, model_source, {})

    def __repr__(self) -> str:
        return (f"Segmentation(prompts={self.prompts!r}, label_values={self.label_values!r}, "
                f"shape={tuple(self.labels.shape)}, dtype={self.labels.dtype})")

    @property
    def volume(self) -> Volume:
        """The label map as a :class:`~text3dsam_cli.io.Volume` on the input's grid ((z, y, x) array, SimpleITK's
        geometry terms): what :func:`text3dsam_cli.io.write_volume` writes."""
        return self._done.volume.with_array(self._done.result.labels)

    def to_nifti(self) -> Any:
        """The label map as a nibabel image: for a nibabel input, with its affine and its header's geometry
        (qform, sform and their codes as given); otherwise the NIfTI file ``segment`` writes, in memory."""
        import nibabel as nib

        given = self._source.nifti
        if given is not None:
            if isinstance(given, nib.Nifti1Image):  # Nifti2Image included
                image = type(given)(self.labels, given.affine, given.header)
            else:
                image = nib.Nifti1Image(self.labels, given.affine)
            image.set_data_dtype(self.labels.dtype)
            image.header.set_slope_inter(1.0, 0.0)
            image.header["cal_min"], image.header["cal_max"] = 0, 0
            return image
        from text3dsam_cli.io import write_volume

        with tempfile.TemporaryDirectory(prefix="text3dsam-api-") as folder:
            path = write_volume(self.volume, Path(folder) / "labels.nii")
            loaded = nib.load(path, mmap=False)
            return nib.Nifti1Image(np.asarray(loaded.dataobj), loaded.affine, loaded.header)

    def to_sitk(self) -> Any:
        """The label map as a SimpleITK image ((z, y, x) voxels) with the input's origin, spacing, direction."""
        from text3dsam_cli.io import volume_to_image

        return volume_to_image(self.volume)

    def save(self, path: str | os.PathLike[str], *, split: bool = False) -> list[str]:
        """Write the label map to ``path`` (its ending picks the format, as ``segment -o``) with the sidecar
        ``<stem>.json`` beside it, and the probabilities (when computed) and ``--split`` masks as ``segment``
        names them: each file atomically, nothing left of a failed attempt, ``segment``'s collision rule.
        Returns the written files (label map first, sidecar last); ``sidecar`` then lists them."""
        from text3dsam_cli.io import formats
        from text3dsam_cli.io.atomic import clean_stale_temps
        from text3dsam_cli.outputs import Claims, plan_files

        target = Path(path)
        if not target.name.lower().endswith(FILE_SUFFIXES):
            raise UsageError(f"not an output file type{formats.unwritable_hint(target)}; give a file ending in "
                             f"{', '.join(FILE_SUFFIXES)}", target)
        check_options(SegmentOptions(output=str(target)))
        source = self._done.volume.path
        plan = plan_files(target, FILE_SUFFIXES, self.label_values, split, self.probabilities is not None, False)
        claims = Claims([source] if source is not None else [])
        problem = claims.claim(plan, str(source or "segmentation"))
        if problem is not None:
            raise UsageError(problem, target)
        clean_stale_temps([*plan.files, plan.marker])
        files, sidecar = write_outputs(self._source.name, self._done, plan, self._model_source)
        self.sidecar = sidecar
        return files


class Text3DSAM:
    """A loaded model, ready to segment inputs as ``text3dsam segment`` does (the model stays loaded).

    ``model``: a checkpoint folder or hub repo id (default ``$TEXT3DSAM_MODEL``, else ``MagicXin/Text3DSAM``),
    a model loaded by :func:`text3dsam_cli.model.load_model`, or a :class:`~text3dsam_cli.inference.Segmenter`.
    ``device``: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps``. The other options are
    ``segment``'s (:data:`MODEL_OPTIONS`).
    """

    def __init__(self, model: Any = None, device: str = "auto", *, revision: str | None = None,
                 precision: str = "auto", mode: str = "auto", spacing: Sequence[float] | None = None,
                 overlap: float = 0.5, sw_batch_size: int = 2, embedding_cache: bool = True,
                 threads: int | None = None) -> None:
        from text3dsam_cli.devices import set_threads
        from text3dsam_cli.model import Text3DSAM as Network
        from text3dsam_cli.model import load_model

        _check_model_options(mode, overlap)
        set_threads(threads)
        if isinstance(model, Segmenter):
            self.segmenter = model
        else:
            net = model if isinstance(model, Network) else load_model(model, revision)
            self.segmenter = Segmenter(net, device=device, precision=precision, mode=mode, spacing=spacing,
                                       overlap=overlap, sw_batch_size=sw_batch_size,
                                       embedding_cache=embedding_cache)
        self._table = orientation_table(self.segmenter)

    def __repr__(self) -> str:
        return f"Text3DSAM(model={self.segmenter.model.source.get('model')!r}, device={str(self.device)!r})"

    @property
    def device(self) -> Any:
        """The torch device the model runs on."""
        return self.segmenter.device

    def segment(self, input: Any, prompts: Any = None, **options: Any) -> Segmentation:
        """Segment one input (a path, a nibabel image or a SimpleITK image) with ``prompts`` (a list of texts,
        label values 1..K; one text; a ``{label value: text}`` mapping; or None for an npz's own prompts).

        ``options``: :data:`INPUT_OPTIONS` (``modality``, ``window``, ``orientation``, ``largest_component``,
        ``min_size_ml``, ``probabilities``, ``series``, ``strict_prompts``, ``max_prompts``, ``statistics``,
        ``presets``: a preset name or a list of them, as ``--preset``) and, for this call
        only, :data:`CALL_OPTIONS` (``mode``, ``spacing``, ``overlap``, ``sw_batch_size``). Bad prompts or
        options raise :class:`~text3dsam_cli.errors.UsageError`, an unreadable input
        :class:`~text3dsam_cli.errors.InputError` (both :class:`~text3dsam_cli.errors.Text3DSAMError`).
        """
        texts, values = _prompt_arguments(prompts)
        run = {k: options.pop(k) for k in CALL_OPTIONS if k in options}
        opts, orientation = _input_options(options)
        _check_model_options(run.get("mode", "auto"), run.get("overlap", 0.5))
        if opts.presets:  # the named training datasets' classes after the prompts (as segment --preset)
            texts, values = add_presets(opts.presets, texts, values)
        source = _read(input, opts.series_uid)
        texts, values = resolve_prompts(source.volume, texts, values, opts, source.name)
        with _run_options(self.segmenter, run):
            done = segment_volume(self.segmenter, source.volume, texts, values, opts, orientation, self._table)
        return Segmentation(done, source, dict(self.segmenter.model.source))


@contextlib.contextmanager
def _run_options(segmenter: Segmenter, run: dict[str, Any]) -> Iterator[None]:
    """``segmenter`` with :data:`CALL_OPTIONS` set for one call (as ``Segmenter(...)`` would set them)."""
    if not run:
        yield
        return
    recipe = segmenter.model.config.inference or {}
    saved = {k: getattr(segmenter, k) for k in CALL_OPTIONS}
    if "mode" in run:
        segmenter.mode = recipe.get("mode", "whole") if run["mode"] == "auto" else run["mode"]
    if "spacing" in run:
        chosen = run["spacing"] or recipe.get("spacing")
        segmenter.spacing = tuple(float(v) for v in chosen) if chosen else None
    if "overlap" in run:
        segmenter.overlap = float(run["overlap"])
    if "sw_batch_size" in run:
        segmenter.sw_batch_size = max(1, int(run["sw_batch_size"]))
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(segmenter, key, value)


def _check_model_options(mode: str, overlap: float) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r} (use {', '.join(MODES)})")
    if not 0 <= overlap < 1:
        raise UsageError("overlap must be in [0, 1)")


def segment(input: Any, prompts: Any = None, *, model: Any = None, device: str = "auto",
            **options: Any) -> Segmentation:
    """Segment one input as ``text3dsam segment`` does, in one call: ``Text3DSAM(model, device,
    ...).segment(input, prompts, ...)``. ``options``: :data:`MODEL_OPTIONS` and :data:`INPUT_OPTIONS`.

    Prompts and options are checked before the model loads (a :class:`~text3dsam_cli.errors.UsageError`).
    To segment several inputs, make one :class:`Text3DSAM` and call its ``segment``: the model loads once.
    """
    model_options = {k: options.pop(k) for k in MODEL_OPTIONS if k in options}
    _prompt_arguments(prompts)
    _input_options(dict(options))
    _check_model_options(model_options.get("mode", "auto"), model_options.get("overlap", 0.5))
    return Text3DSAM(model, device, **model_options).segment(input, prompts, **options)
