"""Inference strategies: whole-volume (the paper's) and sliding-window, with a running argmax on the input grid.

Both strategies produce one low-resolution logit field per prompt covering the whole image; a single
upsampling step (:mod:`text3dsam_cli.upsampling`) then brings it to the input grid with the authors' label rule,
so K full-resolution probability volumes never exist at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from text3dsam_cli.devices import autocast_dtype, resolve_device, strict_float32
from text3dsam_cli.embedding_store import EmbeddingStore
from text3dsam_cli.errors import UsageError
from text3dsam_cli.model import Text3DSAM
from text3dsam_cli.model.decoder import ImageContext
from text3dsam_cli.prompts import check_prompts
from text3dsam_cli.upsampling import upsample_argmax

log = logging.getLogger(__name__)

MODES = ("auto", "whole", "sliding")


@dataclass
class SegmentationResult:
    """A label map on the input grid plus what produced it."""

    labels: np.ndarray  # (z, y, x) uint8 (uint16 when a label value exceeds 255)
    label_values: list[int]
    prompts: list[str]
    probabilities: np.ndarray | None = None  # (K, z, y, x) float16, only when requested
    mode: str = "whole"
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    sliding: dict[str, Any] | None = None  # sliding mode: the plan that ran (see :func:`sliding_record`)


@dataclass
class EncodedImage:
    """An image after the image encoder: what :meth:`Segmenter.segment_encoded` decodes with any prompts.

    ``contexts`` holds (window start, decoder context) pairs: one for the whole-volume strategy, one per
    window for sliding (``plan`` then holds the grid and window layout). ``logits`` caches each decoded
    prompt's low-resolution logits. ``shape`` is the (z, y, x) shape of the image that was encoded.
    """

    shape: tuple[int, int, int]
    mode: str
    contexts: Sequence[tuple[tuple[int, int, int], ImageContext]]
    plan: dict[str, Any]
    reusable: bool = True
    device: str = "cpu"
    seconds: float = 0.0
    logits: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    used: bool = False


def gaussian_weights(size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian importance map (sigma = size/8, as nnU-Net and MONAI), normalised to max 1."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0].view(-1, 1, 1) * axes[1].view(1, -1, 1) * axes[2].view(1, 1, -1)
    return (w / w.max()).clamp_(min=1e-3)


def sliding_record(plan: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's account of a sliding-window plan: ``target_spacing`` (x, y, z mm; the input's spacing when
    no target was set, None when neither is known), ``grid`` (z, y, x: the resampled grid the windows tile, in
    the model's voxel order, before padding), ``window`` (z, y, x), the number of ``windows`` and ``overlap``."""
    spacing = plan.get("target_spacing")
    return {"target_spacing": None if spacing is None else [float(s) for s in spacing],
            "grid": [int(g) for g in plan["grid"]], "window": [int(w) for w in plan["window"]],
            "windows": len(plan["positions"]), "overlap": float(plan["overlap"])}


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Start offsets covering [0, size) with windows of ``window`` (last one flush with the end)."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


class Segmenter:
    """Model + device policy + prompt embeddings, built once and reused for a whole batch of images.

    ``mode`` ``auto`` follows the checkpoint's ``config.inference.mode`` (default ``whole``).
    ``spacing`` (x, y, z mm) is the sliding-window target spacing; None keeps the input spacing.
    ``embedding_cache``: True uses the on-disk prompt-embedding store of this model's text encoder
    (:mod:`text3dsam_cli.embedding_store`), False computes every prompt (kept for this Segmenter only), or a
    given :class:`~text3dsam_cli.embedding_store.EmbeddingStore`.
    """

    def __init__(self, model: Text3DSAM, device: str | torch.device = "auto", precision: str = "auto",
                 mode: str = "auto", spacing: Sequence[float] | None = None, overlap: float = 0.5,
                 sw_batch_size: int = 2, prompt_batch_size: int | None = None,
                 embedding_cache: bool | EmbeddingStore = True) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown inference mode {mode!r} (use {', '.join(MODES)})")
        if not 0 <= overlap < 1:
            raise UsageError("--overlap must be in [0, 1)")
        recipe = model.config.inference or {}
        self.mode = recipe.get("mode", "whole") if mode == "auto" else mode
        recorded = recipe.get("spacing")
        self.spacing = tuple(float(s) for s in (spacing or recorded)) if (spacing or recorded) else None
        self.overlap = overlap
        self.sw_batch_size = max(1, sw_batch_size)
        self.precision = precision
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        # Prompts decoded together: bounded on CPU, where the full-resolution decoder stage is memory-bound.
        self.prompt_batch_size = max(1, prompt_batch_size or (16 if self.device.type == "cuda" else 4))
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.model = model.to(self.device).eval()
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._store: EmbeddingStore | None = embedding_cache if isinstance(embedding_cache, EmbeddingStore) else None
        self._use_store = bool(embedding_cache)

    # -- prompts -------------------------------------------------------------------------------------------
    def embedding_store(self) -> EmbeddingStore | None:
        """The on-disk store for this model's text encoder (opened on first use), or None when disabled."""
        if self._use_store and self._store is None:
            self._store = EmbeddingStore.for_model(self.model)
        return self._store if self._use_store else None

    def embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(K, C) float32 embeddings: from this Segmenter's memory, else the store, else the text encoder.

        Text is always encoded in float32 (the encoder is small), so stored vectors do not depend on precision.
        """
        todo = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        store = self.embedding_store() if todo else None
        if store is not None:
            for prompt, vector in store.get(todo).items():
                self._prompt_cache[prompt] = torch.from_numpy(vector).to(self.device)
            todo = [p for p in todo if p not in self._prompt_cache]
        computed: dict[str, np.ndarray] = {}
        for start in range(0, len(todo), self.prompt_batch_size):
            batch = todo[start : start + self.prompt_batch_size]
            with torch.inference_mode():
                emb = self.model.encode_prompts(batch).float()
            for prompt, vector in zip(batch, emb):
                self._prompt_cache[prompt] = vector
                computed[prompt] = vector.cpu().numpy()
        if store is not None and computed:
            store.put(computed)
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The model's precision: autocast for bf16/fp16; on CUDA float32 without TF32."""
        if self.amp_dtype is None:
            return strict_float32() if self.device.type == "cuda" else contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- strategies ----------------------------------------------------------------------------------------
    def _decode(self, ctx: ImageContext, text: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, text.shape[0], self.prompt_batch_size):
            out.append(self.model.decode(ctx, text[start : start + self.prompt_batch_size]).float())
        return torch.cat(out)[:, 0]

    def _sliding_plan(self, shape: Sequence[int], spacing: Sequence[float] | None) -> dict[str, Any]:
        """Resampled grid, padding and window positions of the sliding strategy for a (z, y, x) image."""
        window = tuple(self.model.config.image_size)
        if self.spacing and spacing:
            # spacing is (x, y, z); the array is (z, y, x)
            target = [shape[i] * float(spacing[2 - i]) / self.spacing[2 - i] for i in range(3)]
        else:
            target = list(shape)
        target_spacing = self.spacing if (self.spacing and spacing) else spacing
        # Resampled grid in multiples of 4 so window offsets map exactly onto the 1/4-resolution canvas.
        grid = [max(4, round(t / 4) * 4) for t in target]
        padded = [max(g, w) for g, w in zip(grid, window)]
        steps = [max(4, int(w * (1 - self.overlap)) // 4 * 4) for w in window]
        starts = [window_starts(p, w, s) for p, w, s in zip(padded, window, steps)]
        positions = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
        return {"window": window, "grid": grid, "padded": padded, "positions": positions,
                "target_spacing": None if target_spacing is None else tuple(float(s) for s in target_spacing),
                "overlap": self.overlap}

    def _window_contexts(self, image: torch.Tensor, plan: dict[str, Any],
                         ) -> Iterator[tuple[tuple[int, int, int], ImageContext]]:
        """Encode the sliding windows ``sw_batch_size`` at a time; yield (window start, decoder context)."""
        window, grid, padded, positions = plan["window"], plan["grid"], plan["padded"], plan["positions"]
        with torch.inference_mode():
            resampled = F.interpolate(image[None, None], size=grid, mode="trilinear", align_corners=False)
            resampled = F.pad(resampled, [0, padded[2] - grid[2], 0, padded[1] - grid[1], 0, padded[0] - grid[0]])
        for first in range(0, len(positions), self.sw_batch_size):
            batch = positions[first : first + self.sw_batch_size]
            with torch.inference_mode(), self._autocast():
                windows = torch.cat([resampled[..., a : a + window[0], b : b + window[1], c : c + window[2]]
                                     for a, b, c in batch])
                features = self.model.image_encoder(windows)
                contexts = [self.model.seg_decoder.prepare([f[i : i + 1] for f in features])
                            for i in range(len(batch))]
            del features, windows
            yield from zip(batch, contexts)

    def _sliding_logits(self, contexts: Iterable[tuple[tuple[int, int, int], ImageContext]], plan: dict[str, Any],
                        text: torch.Tensor) -> torch.Tensor:
        """Decode every window and blend the logits with Gaussian weights onto one 1/4-resolution canvas."""
        k = text.shape[0]
        low = [p // 4 for p in plan["padded"]]
        win_low = [w // 4 for w in plan["window"]]
        canvas = torch.zeros((k, *low), dtype=torch.float32, device=text.device)
        weight = torch.zeros(low, dtype=torch.float32, device=text.device)
        importance = gaussian_weights(win_low).to(text.device)
        with torch.inference_mode():
            for (a, b, c), ctx in contexts:
                with self._autocast():
                    logits = self._decode(ctx, text)
                sl = (slice(a // 4, a // 4 + win_low[0]), slice(b // 4, b // 4 + win_low[1]),
                      slice(c // 4, c // 4 + win_low[2]))
                canvas[(slice(None), *sl)] += logits * importance
                weight[sl] += importance
            canvas /= weight
        g = [x // 4 for x in plan["grid"]]
        return canvas[:, : g[0], : g[1], : g[2]]

    def _encode(self, image: np.ndarray, spacing: Sequence[float] | None, keep: bool) -> EncodedImage:
        t0 = time.perf_counter()
        if image.ndim != 3:
            raise UsageError(f"expected a 3-D (z, y, x) image, got shape {image.shape}")
        tensor = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32).to(self.device)
        shape = tuple(int(s) for s in image.shape)
        if self.mode == "sliding":
            plan = self._sliding_plan(shape, spacing)
            windows = self._window_contexts(tensor, plan)
            contexts: Iterable[tuple[tuple[int, int, int], ImageContext]] = list(windows) if keep else windows
            encoded = EncodedImage(shape, "sliding", contexts, plan, reusable=keep)  # type: ignore[arg-type]
        else:
            with torch.inference_mode(), self._autocast():
                x = F.interpolate(tensor[None, None], size=tuple(self.model.config.image_size), mode="trilinear",
                                  align_corners=False)
                ctx = self.model.encode_image(x)
            encoded = EncodedImage(shape, "whole", [((0, 0, 0), ctx)], {}, reusable=True)
        encoded.device = str(self.device)
        encoded.seconds = time.perf_counter() - t0
        return encoded

    # -- public ----------------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray, spacing: Sequence[float] | None = None) -> EncodedImage:
        """Run the image encoder once on a (z, y, x) image normalised to 0..255 (whole volume, or every
        sliding window); the result is decoded with any prompts by :meth:`segment_encoded`, as often as wanted.

        ``spacing`` (x, y, z mm) is the image's, used by the sliding strategy. Sliding mode keeps every window's
        decoder context in memory.
        """
        return self._encode(image, spacing, keep=True)

    def segment_encoded(self, encoded: EncodedImage, prompts: Sequence[str],
                        label_values: Sequence[int] | None = None,
                        keep_probabilities: bool = False,
                        on_decoded: Callable[[], None] | None = None) -> SegmentationResult:
        """Decode an encoded image with ``prompts`` into a label map of the image's shape (values 1..K unless
        given). Each prompt's low-resolution logits are kept on ``encoded``, so a prompt seen before costs
        only the upsampling and argmax. ``on_decoded`` is called between decoding and upsampling."""
        prompts, values = self._check_prompts(prompts, label_values)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        todo = [p for p in dict.fromkeys(prompts) if p not in encoded.logits]
        text = self.embed_prompts(todo) if todo else None
        timings["text"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if text is not None:
            if not encoded.reusable and encoded.used:
                raise RuntimeError("this EncodedImage was made for one decoding; use Segmenter.encode")
            encoded.used = True
            if encoded.mode == "sliding":
                logits = self._sliding_logits(encoded.contexts, encoded.plan, text)
            else:
                with torch.inference_mode(), self._autocast():
                    logits = self._decode(encoded.contexts[0][1], text)  # type: ignore[index]
            encoded.logits.update(zip(todo, logits))
        timings["decode"] = time.perf_counter() - t1
        if on_decoded is not None:
            on_decoded()
        t2 = time.perf_counter()
        with torch.inference_mode():
            stacked = torch.stack([encoded.logits[p] for p in prompts])
            labels, probs = upsample_argmax(stacked, encoded.shape, values, keep_probabilities)
        timings["upsample"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        record = sliding_record(encoded.plan) if encoded.mode == "sliding" else None
        return SegmentationResult(labels, values, prompts, probs, encoded.mode, encoded.device, timings, record)

    def segment(self, image: np.ndarray | list[np.ndarray], prompts: Sequence[str],
                label_values: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
                keep_probabilities: bool = False) -> SegmentationResult:
        """Segment a (z, y, x) image already normalised to 0..255; label values default to 1..K.

        :meth:`encode` then :meth:`segment_encoded`, except that sliding windows are encoded and decoded one
        batch at a time (their contexts are not all kept). An image handed over as a one-element list (the
        caller keeping no other reference) is let go on the CPU once the model has run, before the upsampling
        (a whole-body CT's float32 copy is then freed before its label map is made); on a GPU it is kept for
        the out-of-memory retry on the CPU.
        """
        prompts, values = self._check_prompts(prompts, label_values)
        held = image if isinstance(image, list) else [image]
        del image
        try:
            return self._segment(held, prompts, values, spacing, keep_probabilities)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            log.warning("CUDA out of memory; retrying this image on the CPU (the next image goes to the GPU)")
            return self._segment_on_cpu(held, list(prompts), values, spacing, keep_probabilities)

    def _segment_on_cpu(self, held: list[np.ndarray], prompts: list[str], values: list[int],
                        spacing: Sequence[float] | None,
                        keep_probabilities: bool) -> SegmentationResult:
        """One image on the CPU in float32, then the model goes back to the GPU for the next image."""
        gpu, amp, batch = self.device, self.amp_dtype, self.prompt_batch_size
        torch.cuda.empty_cache()
        self.device, self.amp_dtype, self.prompt_batch_size = torch.device("cpu"), None, 4
        self.model = self.model.to(self.device)
        self._prompt_cache.clear()
        try:
            return self._segment(held, prompts, values, spacing, keep_probabilities)
        finally:
            self._prompt_cache.clear()
            self.device, self.amp_dtype, self.prompt_batch_size = gpu, amp, batch
            self.model = self.model.to(gpu)

    @staticmethod
    def _check_prompts(prompts: Sequence[str], label_values: Sequence[int] | None) -> tuple[list[str], list[int]]:
        if not prompts:
            raise UsageError("no prompts given")
        check_prompts(prompts)  # the one prompt rule: not empty, not invisible, valid text
        values = list(label_values) if label_values is not None else list(range(1, len(prompts) + 1))
        if len(values) != len(prompts):
            raise ValueError("one label value per prompt is needed")
        return list(prompts), values

    def _segment(self, held: list[np.ndarray], prompts: list[str], values: list[int],
                 spacing: Sequence[float] | None, keep_probabilities: bool) -> SegmentationResult:
        t0 = time.perf_counter()
        self.embed_prompts(prompts)  # the text encoder first, so "encode" below is the image encoder's time
        t_text = time.perf_counter() - t0
        encoded = self._encode(held[0], spacing, keep=False)
        # the CPU has no out-of-memory retry: let the image go before the upsampling (see segment)
        release = held.clear if self.device.type == "cpu" else None
        result = self.segment_encoded(encoded, prompts, values, keep_probabilities=keep_probabilities,
                                      on_decoded=release)
        decode = result.timings.pop("decode")
        encode = encoded.seconds
        if encoded.mode == "sliding":  # windows were encoded while being decoded
            encode, decode = 0.0, encoded.seconds + decode
        result.timings = {"text": t_text + result.timings["text"], "encode": encode, "decode": decode,
                          "model": encode + decode, "upsample": result.timings["upsample"],
                          "total": time.perf_counter() - t0}
        return result
