"""``ViewSession``: one scan, one model, the image encoded once, decoded with whatever prompts the page sends.

Everything the viewer serves comes from here: the scan as NIfTI (the input's own intensities and grid), the
current label map on the input's exact grid (what ``text3dsam segment`` would write for the same prompts)
and its sidecar. The scan goes through :func:`text3dsam_cli.pipeline.prepare_scan` exactly as in
``segment``, so modality, normalisation and the map back to the input grid are the same.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli.errors import UsageError
from text3dsam_cli.inference import EncodedImage, SegmentationResult, Segmenter
from text3dsam_cli.io import InputItem, Volume, strip_image_suffix, write_volume
from text3dsam_cli.pipeline import (
    PreparedScan,
    build_sidecar,
    label_statistics,
    orientation_table,
    prepare_scan,
    read_input,
    segment_scan,
)
from text3dsam_cli.preprocess import DEFAULT_WINDOW
from text3dsam_cli.prompts import check_prompts as check_prompt_texts
from text3dsam_cli.quality import assess_labels

__all__ = ["CT_PRESETS", "MAX_PROMPTS", "MAX_PROMPT_CHARS", "ViewSession", "check_prompts", "nifti_bytes",
           "read_input"]

#: Most prompts one request may carry, and the longest prompt (characters).
MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 500

#: CT window presets offered by the page: name -> (level, width) in HU.
CT_PRESETS = {"soft tissue": (40, 400), "lung": (-600, 1500), "bone": (500, 1500), "brain": (40, 80),
              "liver": (60, 160)}


def nifti_bytes(volume: Volume) -> bytes:
    """``volume`` as gzipped NIfTI bytes, written by the same writer (and geometry) as ``segment``'s outputs."""
    with tempfile.TemporaryDirectory(prefix="text3dsam-view-") as folder:
        path = write_volume(volume, Path(folder) / "volume.nii.gz")
        return path.read_bytes()


class ViewSession:
    """The state behind ``text3dsam view``: thread-safe, one segmentation at a time."""

    def __init__(self, segmenter: Segmenter, volume: Volume, item: InputItem | None = None,
                 modality: str | None = None, window: str = DEFAULT_WINDOW) -> None:
        self.segmenter = segmenter
        self.volume = volume
        if item is None:
            path = Path(volume.path or "scan")
            item = InputItem(path, volume.source_format, strip_image_suffix(path.name))
        self.item = item
        self.scan: PreparedScan = prepare_scan(volume, modality, window, table=orientation_table(segmenter))
        self.encoded: EncodedImage | None = None
        self.result: SegmentationResult | None = None
        self.last_timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._image_bytes: bytes | None = None
        self._labels_bytes: bytes | None = None

    @classmethod
    def open(cls, input: str, segmenter: Segmenter, modality: str | None = None, window: str = DEFAULT_WINDOW,
             series_uid: str | None = None) -> ViewSession:
        """A session for one input read by ``segment``'s rules (see :func:`read_input`)."""
        item, volume = read_input(input, series_uid)
        return cls(segmenter, volume, item, modality, window)

    # -- model ------------------------------------------------------------------------------------------------
    def encode(self) -> float:
        """Run the image encoder (once per session); return the seconds it took (0 when already done)."""
        with self._lock:
            return self._encode()

    def _encode(self) -> float:
        if self.encoded is not None:
            return 0.0
        self.encoded = self.segmenter.encode(self.scan.image, self.scan.spacing)
        return self.encoded.seconds

    def segment(self, prompts: list[str]) -> dict[str, Any]:
        """Label map for ``prompts`` (values 1..K in this order) on the input grid; the API's JSON answer."""
        prompts = check_prompts(prompts)
        with self._lock:
            t0 = time.perf_counter()
            encode = self._encode()
            if not prompts:
                self.result = None
                self._labels_bytes = None
                self.last_timings = {"encode": encode, "total": time.perf_counter() - t0}
                return self.describe()
            assert self.encoded is not None
            # segment's own step: decode, then back to the input grid (text3dsam_cli.pipeline.segment_scan)
            result = segment_scan(self.segmenter, self.scan, prompts, list(range(1, len(prompts) + 1)),
                                  encoded=self.encoded)
            self.result = result
            self._labels_bytes = None
            self.last_timings = {"encode": encode, **{k: v for k, v in result.timings.items() if k != "total"},
                                 "total": time.perf_counter() - t0}
            return self.describe()

    # -- answers ----------------------------------------------------------------------------------------------
    def labels(self) -> list[dict[str, Any]]:
        """Per prompt: label value, prompt, voxels, volume in ml and the quality report (legend rows)."""
        result = self.result
        if result is None:
            return []
        return label_statistics(result.labels, result.label_values, result.prompts, self.volume.voxel_volume_ml,
                                self._quality())

    def _quality(self) -> dict[int, dict[str, Any]]:
        """The :mod:`~text3dsam_cli.quality` report of the current label map (components, border, ...)."""
        assert self.result is not None
        return assess_labels(self.result.labels, self.result.label_values, self.volume.voxel_volume_ml)

    def describe(self) -> dict[str, Any]:
        """The ``POST /api/segment`` answer for the current state."""
        return {"labels": self.labels(), "timings": {k: round(v, 4) for k, v in self.last_timings.items()}}

    def info(self) -> dict[str, Any]:
        """What the page shows about the scan and the model (``GET /api/info``)."""
        decision = self.scan.describe()
        ct = decision.get("modality") == "CT"
        return {
            "input": self.item.path.name,
            "input_format": self.volume.source_format,
            "geometry": self.volume.geometry(),
            "modality": decision,
            "model": dict(self.segmenter.model.source),
            "device": str(self.segmenter.device),
            "mode": self.segmenter.mode,
            "encoded": self.encoded is not None,
            "window_presets": {name: {"level": lw[0], "width": lw[1]} for name, lw in CT_PRESETS.items()} if ct
            else {},
        }

    def image_nifti(self) -> bytes:
        """The scan as the page shows it: the input's own intensities on its own grid, as gzipped NIfTI."""
        with self._lock:
            if self._image_bytes is None:
                array = np.asarray(self.volume.array)
                if array.dtype == np.float64:
                    array = array.astype(np.float32)
                self._image_bytes = nifti_bytes(self.volume.with_array(array))
            return self._image_bytes

    def labels_nifti(self) -> bytes:
        """The current label map on the input's exact grid as gzipped NIfTI (empty map before any prompt)."""
        with self._lock:
            if self._labels_bytes is None:
                labels = self.result.labels if self.result is not None else np.zeros(self.volume.shape, np.uint8)
                self._labels_bytes = nifti_bytes(self.volume.with_array(labels))
            return self._labels_bytes

    def sidecar(self) -> dict[str, Any]:
        """The JSON ``segment`` writes beside the label map, for the current prompts."""
        with self._lock:
            if self.result is None:
                raise UsageError("no prompts yet: add a prompt first")
            return build_sidecar(self.item, self.volume, self.result, dict(self.segmenter.model.source),
                                 self.scan.describe(), {"labels": "labels.nii.gz"}, self.last_timings,
                                 self.scan.orientation, self._quality())


def check_prompts(prompts: Any) -> list[str]:
    """The request's prompt list, validated: strings that are prompts by the one prompt rule
    (:func:`text3dsam_cli.prompts.check_prompts`: not empty, not invisible, valid text), distinct, not too many
    or too long."""
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UsageError('"prompts" must be a list of strings')
    cleaned = [p.strip() for p in check_prompt_texts(prompts)]
    if len(cleaned) > MAX_PROMPTS:
        raise UsageError(f"too many prompts ({len(cleaned)}; at most {MAX_PROMPTS})")
    if any(len(p) > MAX_PROMPT_CHARS for p in cleaned):
        raise UsageError(f"prompt longer than {MAX_PROMPT_CHARS} characters")
    if len(set(cleaned)) != len(cleaned):
        raise UsageError("a prompt repeats")
    return cleaned
