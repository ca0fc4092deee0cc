"""Inference strategies: whole-volume (the paper's) and sliding-window, with a running argmax on the input grid.

Both strategies produce one low-resolution logit field per prompt covering the whole image; a single
upsampling step then brings it to the input grid chunk by chunk along z, taking sigmoid and a running max,
so K full-resolution probability volumes never exist at once.

The label rule is the authors' (``pred.py``): background probability = 1 - max prompt probability, label =
argmax over [background, prompt 1, ..., prompt K] with ties going to the earlier entry.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from text3dsam_cli.devices import autocast_dtype, resolve_device, strict_float32
from text3dsam_cli.embedding_store import EmbeddingStore
from text3dsam_cli.errors import UsageError
from text3dsam_cli.labels import label_dtype
from text3dsam_cli.model import Text3DSAM
from text3dsam_cli.model.decoder import ImageContext
from text3dsam_cli.model.interpolation import source_index as _source_index  # the one interpolation rule

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


#: Work per voxel and live prompt of the cell path relative to the dense path's per voxel and prompt, and the
#: cell path's fixed share (filling every voxel from its cell) as a fraction of the dense path's whole cost.
#: ``benchmarks/bench_upsample.py`` (2 threads, 63x512x512 output, 15 prompts): cell/dense time 0.35, 0.41,
#: 0.48, 0.63, 1.54, 4.07 at work shares 0.0013, 0.004, 0.008, 0.017, 0.035, 0.39 (organ-like blobs to noise);
#: these constants choose the faster path in all six (the cost per share is higher where many cells each keep
#: few prompts, so a plain fit would pick the cell path where it is 1.5x slower). At 756x512x512 the cell path's
#: fixed share is smaller (0.07-0.19): there they misjudge one case of six (estimate 1.00, measured 0.77-0.89).
CELL_PATH_COST = 25.0
CELL_PATH_FIXED = 0.25
#: Margin (in logits) by which a decision must hold at a cell's corners to be trusted inside the cell.
CELL_MARGIN = 0.05
#: Below this logit float32 probabilities are far from saturation: a CELL_MARGIN logit gap is many ulps apart.
UNSATURATED = 10.0
#: At or above this logit the float32 sigmoid is exactly 1.0; at or below SATURATION_LOW it is below 1.0.
SATURATION_HIGH = 17.5
SATURATION_LOW = 15.5


def _corner_bounds(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each cell's 8 corners: cell (a, b, c) spans low-res voxels a..a+1, b..b+1, c..c+1 (clamped).

    Trilinear interpolation is a convex combination of the corners, so these bound every output voxel of the cell.
    """
    lo, hi = logits, logits
    for axis in (1, 2, 3):
        lo = torch.minimum(lo, _next_along(lo, axis))
        hi = torch.maximum(hi, _next_along(hi, axis))
    return lo, hi


def _next_along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` shifted by one along ``axis`` (index a -> a + 1, the last index kept): two slices, no gather."""
    n = t.shape[axis]
    return torch.cat([t.narrow(axis, 1, n - 1), t.narrow(axis, n - 1, 1)], axis) if n > 1 else t


def _running_max_before(t: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """(K, ...) -> (K, ...): the maximum of t[0..j-1] at j (``floor`` at j = 0); a loop over the few prompts
    (``torch.cummax`` computes indices too and was 30x slower on CPU)."""
    out = torch.empty_like(t)
    running = floor[0].expand_as(t[0])
    for j in range(t.shape[0]):
        out[j] = running
        running = torch.maximum(running, t[j])
    return out


def live_prompts(logits: torch.Tensor, margin: float = CELL_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d, h, w) bool: prompts that can win somewhere in each cell (authors' float32 rule); and corner minima.

    Prompt j is ruled out in a cell when it cannot beat background (its logit stays below -margin: p < 0.5), or
    when another prompt i beats it at every voxel of the cell: by a margin where j is far from saturation, or
    as an earlier prompt (ties go to the earlier one) by a margin or by saturating (float32 p == 1.0).
    """
    lo, hi = _corner_bounds(logits)
    floor = torch.full_like(lo[:1], float("-inf"))
    earlier = _running_max_before(lo, floor)  # max lo over i < j
    later = _running_max_before(lo.flip(0), floor).flip(0)  # max lo over i > j
    dead = hi <= -margin
    dead |= earlier >= hi + margin
    dead |= earlier >= SATURATION_HIGH
    dead |= (later >= hi + margin) & (hi <= UNSATURATED)
    dead |= (later >= SATURATION_HIGH) & (hi <= SATURATION_LOW)  # p_i == 1.0 > p_j
    return ~dead, lo


def _cells(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per low-res index a: first output index whose interpolation starts at a, and how many do."""
    i0, _, _ = _source_index(in_size, out_size, device)
    counts = torch.bincount(i0, minlength=in_size)
    starts = torch.cumsum(counts, 0) - counts
    return starts, counts, int(counts.max().item())


def _labels_in_cells(flat: torch.Tensor, flat_shape: tuple[int, int, int, int], cells: torch.Tensor,
                     prompts: torch.Tensor, axes: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Exact labels (index into [background, prompts...]) of every voxel of the given cells.

    ``flat`` (K+1, d*h*w) logits with a last row of "no prompt" (-1e4); ``cells`` (U, 3) low-res cell
    coordinates; ``prompts`` (R, U) prompt indices to evaluate per cell in ascending order (K = none).
    Returns (U, Mz, My, Mx) int64; voxel boxes are padded by repeating the cell's last voxel. The arithmetic
    follows :func:`upsample_argmax_dense`: z by ``torch.lerp`` at low resolution, x by ATen's linear weights
    and rounding, y as row0 + w * (row1 - row0), sigmoid, first maximum.
    """
    _, d, h, w = flat_shape
    sizes = (d, h, w)
    corner_pos = []
    for axis in range(3):
        a = cells[:, axis]
        corner_pos.append(torch.stack([a, torch.clamp(a + 1, max=sizes[axis] - 1)], 1))  # (U, 2)
    pos = ((corner_pos[0][:, :, None, None] * h + corner_pos[1][:, None, :, None]) * w
           + corner_pos[2][:, None, None, :])  # (U, 2, 2, 2)
    v = flat[prompts[:, :, None, None, None], pos[None]]  # (R, U, 2, 2, 2)
    boxes = []
    for axis in range(3):
        starts, counts, most, _ = axes[axis]
        a = cells[:, axis]
        offset = torch.minimum(torch.arange(most, device=a.device)[None], counts[a][:, None] - 1)
        boxes.append(starts[a][:, None] + offset)  # (U, M) output indices
    wz = axes[0][3][boxes[0]]  # (U, Mz)
    vz = torch.lerp(v[:, :, 0][:, :, None], v[:, :, 1][:, :, None], wz[None, :, :, None, None])  # (R,U,Mz,2,2)
    ly1 = axes[1][3][boxes[1]]  # (U, My)
    lx1 = axes[2][3][boxes[2]]  # (U, Mx)
    lx0 = 1 - lx1
    lx0b, lx1b = lx0[None, :, None, :], lx1[None, :, None, :]
    # x as ATen's bilinear kernel rounds it: v0 * w0 fused onto v1 * w1 (bit-equal to F.interpolate in tests)
    row0 = torch.addcmul(vz[..., 0, 1, None] * lx1b, vz[..., 0, 0, None], lx0b)  # (R, U, Mz, Mx)
    row1 = torch.addcmul(vz[..., 1, 1, None] * lx1b, vz[..., 1, 0, None], lx0b)
    values = torch.addcmul(row0[:, :, :, None, :], (row1 - row0)[:, :, :, None, :],
                           ly1[None, :, None, :, None])  # (R, U, Mz, My, Mx): y as the dense path computes it
    values.sigmoid_()
    # First maximum over the (ascending) prompts = the running strict maximum of the authors' rule.
    r, u = prompts.shape
    if r > PACKED_PROMPTS:
        best, position = values.max(0)
        background = torch.rsub(best, 1.0).clamp_(0, 1) >= best
    else:  # one max of packed keys, as the dense path does; no index output
        top = _packed_first_max(values, _ranks(r, values.device).view(-1, 1, 1, 1, 1))
        position = PACKED_PROMPTS - (top & PACKED_PROMPTS)
        background = (top >> 7) <= BACKGROUND_BITS
    index = torch.gather((prompts + 1).T, 1, position.reshape(u, -1).long()).reshape(position.shape)
    return index.masked_fill_(background, 0)


def upsample_argmax(logits: torch.Tensor, out_shape: Sequence[int], label_values: Sequence[int],
                    keep_probabilities: bool = False, chunk_voxels: int = 1 << 22, force_cells: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Low-res logits (K, d, h, w) -> label map on ``out_shape`` (trilinear, align_corners=False).

    Decided at low resolution where possible: inside a cell of the low-resolution grid the interpolated logits
    are convex combinations of the cell's 8 corners, so a prompt that loses at all corners by a margin (or to
    saturation, see :func:`live_prompts`) loses everywhere in the cell. Cells where no prompt or one prompt
    survives and wins over background take one label; only the other cells (organ boundaries) are computed at
    full resolution, and there only for their surviving prompts, with the authors' float32 tie rule.
    When that would cost more than the dense path (logits that change winner inside most cells, like those of
    the deterministic test checkpoints), :func:`upsample_argmax_dense` runs instead (``force_cells`` overrides,
    for tests). ``keep_probabilities`` needs every voxel and uses the dense path too.
    """
    dense_chunk = min(chunk_voxels, dense_block(logits.device))
    if keep_probabilities:
        return upsample_argmax_dense(logits, out_shape, label_values, True, dense_chunk)
    logits = logits.float()
    k, d, h, w = logits.shape
    out = [int(s) for s in out_shape]
    device = logits.device
    dtype = label_dtype(label_values)
    lut = np.asarray([0, *label_values], dtype=dtype)
    live, lo = live_prompts(logits)
    count = live.sum(0)
    first = torch.argmax(live.to(torch.uint8), 0)  # the first live prompt (0 when none)
    first_lo = torch.gather(lo, 0, first[None])[0]
    decided_fg = (count == 1) & (first_lo >= CELL_MARGIN)
    cell_label = torch.where(decided_fg, first + 1, torch.zeros_like(first))
    axes = []
    for n_in, n_out in zip((d, h, w), out):
        starts, counts, most = _cells(n_in, n_out, device)
        _, _, weight = _source_index(n_in, n_out, device)
        axes.append((starts, counts, most, weight))
    has_voxels = (axes[0][1][:, None, None] > 0) & (axes[1][1][None, :, None] > 0) & (axes[2][1][None, None, :] > 0)
    undecided = (count > 0) & ~decided_fg & has_voxels
    # Voxels x live prompts to evaluate here, weighed against the dense path (CELL_PATH_COST, CELL_PATH_FIXED).
    voxels = (axes[0][1][:, None, None] * axes[1][1][None, :, None] * axes[2][1][None, None, :])
    work = float((voxels * count * undecided).sum().item()) * CELL_PATH_COST
    share = CELL_PATH_FIXED + work / (float(np.prod(out)) * k)
    log.debug("cell path estimated at %.3f of the dense path", share)
    if not force_cells and share > 1.0:
        return upsample_argmax_dense(logits, out_shape, label_values, False, dense_chunk)
    # Every voxel takes its cell's label; boundary cells are overwritten below.
    labels = lut[cell_label.cpu().numpy()]
    for axis in range(3):
        labels = np.repeat(labels, axes[axis][1].cpu().numpy(), axis=axis)
    # The same memory as a torch tensor, for one flat index_put per chunk (torch has no index_put for uint16 /
    # uint32: those are viewed as the signed type of their size, which copies the same bits).
    as_torch = np.dtype(f"i{labels.dtype.itemsize}") if labels.dtype.kind == "u" and labels.dtype.itemsize > 1 \
        else labels.dtype
    flat_labels = torch.from_numpy(labels.view(as_torch)).view(-1)
    lut_t = torch.from_numpy(lut.view(as_torch))
    cells = torch.nonzero(undecided)  # (U, 3)
    if cells.shape[0]:
        live_counts = count[undecided]
        order = torch.argsort(live_counts, stable=True)
        cells, live_counts = cells[order], live_counts[order]
        box = axes[0][2] * axes[1][2] * axes[2][2]
        flat = torch.cat([logits.reshape(k, -1), torch.full_like(logits.reshape(k, -1)[:1], -1e4)])
        index_pad = torch.where(live, torch.arange(k, device=device).view(-1, 1, 1, 1), torch.full_like(first, k))
        sorted_idx = torch.sort(index_pad, 0).values  # live prompts first, ascending; k = none
        position = 0
        total = cells.shape[0]
        while position < total:
            r = int(live_counts[position].item())
            # as many cells of this live count as fit in the chunk budget
            same = int((live_counts[position:] == r).sum().item())
            step = max(1, min(same, chunk_voxels // max(1, box * r)))
            chunk = cells[position : position + step]
            prompts = sorted_idx[:r, chunk[:, 0], chunk[:, 1], chunk[:, 2]]  # (R, U)
            index = _labels_in_cells(flat, (k, d, h, w), chunk, prompts, axes)
            zz, yy, xx = (axes[a][0][chunk[:, a]][:, None] + torch.minimum(
                torch.arange(axes[a][2], device=device)[None], axes[a][1][chunk[:, a]][:, None] - 1)
                for a in range(3))
            # flat output positions (U, Mz, My, Mx); padded boxes repeat a voxel with the same value
            where = ((zz[:, :, None, None] * out[1] + yy[:, None, :, None]) * out[2] + xx[:, None, None, :])
            flat_labels[where.reshape(-1).cpu()] = lut_t[index.reshape(-1).cpu()]
            position += step
    return labels, None


#: Values per block of the dense path: on CPU small enough that its passes stay in a core's cache (2 MB of
#: float32); on a GPU large, so that each kernel launch has work enough (64 MB).
DENSE_BLOCK = 1 << 19
DENSE_BLOCK_GPU = 1 << 24
#: Worker threads of the dense CPU path: two share the cores between them (more contend for the GIL: 16 workers
#: took 3.6x longer than torch's own 16 threads on a 16-core machine).
DENSE_WORKERS = 2

_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the duration (process-wide; serialised), then restored."""
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def dense_block(device: torch.device) -> int:
    """Block size (values) of :func:`upsample_argmax_dense` on ``device``."""
    return DENSE_BLOCK if device.type == "cpu" else DENSE_BLOCK_GPU


#: Prompts per voxel that the packed-key argmax of :func:`upsample_argmax_dense` can rank in int32.
PACKED_PROMPTS = 127
#: float32 bit pattern of 0.5: probabilities in [0.5, 1] are these bits plus 0 .. 2**23.
HALF_BITS = 0x3F000000
#: HALF_BITS shifted left by 7 in int32 (wrapping to INT32_MIN), then arithmetically right by 7: background.
BACKGROUND_BITS = -(1 << 24)


def _ranks(n: int, device: torch.device) -> torch.Tensor:
    """int32 ranks of ``n`` prompts for :func:`_packed_first_max`: 127, 126, ... (an earlier prompt ranks higher)."""
    return torch.arange(PACKED_PROMPTS, PACKED_PROMPTS - n, -1, dtype=torch.int32, device=device)


def _packed_first_max(p: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The first maximum over dim 0 of float32 probabilities ``p`` (at most PACKED_PROMPTS; changed in place) as
    one int32 key per position, the authors' rule in a single max.

    p clamped at 0.5 (background wins at or below it) has bits HALF_BITS + 0 .. 2**23; shifted left by 7 they wrap
    to INT32_MIN + 0 .. 2**30, still ordered like p, and the 7 free low bits take ``ranks`` (:func:`_ranks`,
    shaped to broadcast over dim 0), so ties go to the earlier prompt. Of the result, ``>> 7`` is ordered like the
    probability (BACKGROUND_BITS: nothing above 0.5) and ``PACKED_PROMPTS - (key & PACKED_PROMPTS)`` is the index.
    """
    key = p.clamp_(min=0.5).view(torch.int32).bitwise_left_shift_(7)
    return key.bitwise_or_(ranks).amax(0)


def _runs(in_size: int, out_size: int, device: torch.device) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """Output index runs that interpolate between the same two source indices: (start, stop, i0, i1, weights
    shaped (1, rows, 1))."""
    i0, i1, weight = _source_index(in_size, out_size, device)
    starts = [0, *(torch.nonzero(i0[1:] != i0[:-1]).flatten() + 1).tolist(), out_size]
    first = i0.tolist()
    second = i1.tolist()
    return [(a, b, first[a], second[a], weight[a:b].view(1, -1, 1)) for a, b in itertools.pairwise(starts)]


def _row_steps(planes: torch.Tensor) -> torch.Tensor:
    """(C, h, W) -> (C, h, W): row i+1 minus row i, and zeros in the last row (where a run's two source rows
    are the same, clamped, one)."""
    steps = torch.empty_like(planes)
    torch.sub(planes[:, 1:], planes[:, :-1], out=steps[:, :-1])
    steps[:, -1].zero_()
    return steps


def _resize_rows(planes: torch.Tensor, steps: torch.Tensor, runs: Sequence[tuple[int, int, int, int, torch.Tensor]],
                 out: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of (C, h, W) along h into ``out`` (C, rows of ``runs``, W): row0 + w * (row1 - row0),
    one ``torch.addcmul`` per run (``torch.lerp`` with a broadcast weight is many times slower on CPU);
    ``steps`` is :func:`_row_steps` of ``planes`` (row1 - row0, computed once per plane, not once per run).

    Each output row is written once, straight from its two source rows (no gathered full-size copies).
    """
    first = runs[0][0]
    for a, b, i0, i1, weight in runs:
        step = steps[:, i0 : i0 + 1] if i1 == i0 + 1 else steps[:, -1:]  # i1 == i0 only at the clamped end
        torch.addcmul(planes[:, i0 : i0 + 1], step, weight, out=out[:, a - first : b - first])
    return out


def _blocks(runs: list[tuple[int, int, int, int, torch.Tensor]], rows: int) -> list[list[tuple[int, ...]]]:
    """Consecutive runs grouped into blocks of about ``rows`` output rows."""
    blocks: list[list[tuple[int, ...]]] = [[]]
    for run in runs:
        if blocks[-1] and run[1] - blocks[-1][0][0] > rows:
            blocks.append([])
        blocks[-1].append(run)
    return blocks


def upsample_argmax_dense(logits: torch.Tensor, out_shape: Sequence[int], label_values: Sequence[int],
                          keep_probabilities: bool = False, chunk_voxels: int | None = None,
                          ) -> tuple[np.ndarray, np.ndarray | None]:
    """Every voxel, every prompt: the exact running argmax (and, if asked, float16 probabilities).

    Trilinear interpolation is separable: z by ``torch.lerp`` at low resolution, x by ATen's linear rule on the
    low-resolution rows of each output slice, then y by one ``torch.addcmul`` per run of output rows, for all
    prompts at once, in blocks of about ``chunk_voxels`` values so that the few passes over each block run in
    the CPU cache. Probabilities are compared as float32, like the authors' code: clamped at 0.5 (background
    wins at or below it), their bit patterns are ordered integers, so one int32 key per voxel and prompt,
    bits << 7 | (127 - prompt), ranks by probability and then by earlier prompt (ties, e.g. two saturated
    1.0), and a single max over the prompts gives the label.
    """
    k, d, h, _ = logits.shape
    out_d, out_h, out_w = (int(s) for s in out_shape)
    device = logits.device
    i0, i1, wz = _source_index(d, out_d, device)
    logits = logits.float()
    z_index = list(zip(i0.tolist(), i1.tolist()))
    dtype = label_dtype(label_values)
    labels = np.zeros((out_d, out_h, out_w), dtype=dtype)
    probs = np.zeros((k, out_d, out_h, out_w), dtype=np.float16) if keep_probabilities else None
    lut = torch.tensor([0, *label_values], dtype=torch.int64, device=device)
    identity = [int(v) for v in label_values] == list(range(1, k + 1))  # label = prompt index: no lookup
    # Prompts are taken in groups whose keys fit int32; a later group wins only by a higher probability.
    group = min(k, PACKED_PROMPTS)
    rows_per_block = max(1, (chunk_voxels or dense_block(device)) // max(1, group * out_w))
    blocks = _blocks(_runs(h, out_h, device), rows_per_block)
    rank = _ranks(group, device).view(-1, 1, 1)

    def slices(zs: Sequence[int]) -> None:
        for z in zs:
            a, b = z_index[z]
            plane = torch.lerp(logits[:, a], logits[:, b], wz[z])  # (K, h, w): z at low resolution
            planes = F.interpolate(plane[None], size=(h, out_w), mode="bilinear",
                                   align_corners=False)[0]  # (K, h, out_w): x done on the low-resolution rows
            steps = _row_steps(planes)
            for block in blocks:
                y0, y1 = block[0][0], block[-1][1]
                best_bits = best_label = None
                for g0 in range(0, k, group):
                    g1 = min(k, g0 + group)
                    p = _resize_rows(planes[g0:g1], steps[g0:g1], block,
                                     torch.empty((g1 - g0, y1 - y0, out_w), device=device))
                    p.sigmoid_()
                    if probs is not None:
                        probs[g0:g1, z, y0:y1] = p.to(torch.float16).cpu().numpy()
                    top = _packed_first_max(p, rank[: g1 - g0])
                    bits = top >> 7  # arithmetic shift: ordered like p; BACKGROUND_BITS where p <= 0.5
                    label = torch.where(bits > BACKGROUND_BITS, g0 + PACKED_PROMPTS + 1 - (top & PACKED_PROMPTS), 0)
                    if best_bits is None:
                        best_bits, best_label = bits, label
                    else:
                        better = bits > best_bits
                        best_bits = torch.where(better, bits, best_bits)
                        best_label = torch.where(better, label, best_label)
                labels[z, y0:y1] = (best_label if identity else lut[best_label]).cpu().numpy()

    threads = torch.get_num_threads() if device.type == "cpu" else 1
    workers = min(DENSE_WORKERS, threads)
    if workers > 1 and out_d > 1:
        # Cache-sized operations are too small for torch's own threads alone: their fork/join per operation costs
        # little on an idle machine but 100x when other processes load the cores. So worker threads take shares
        # of the slices (torch releases the GIL inside each operation), each with the remaining intra-op threads.
        with intra_op_threads(max(1, threads // workers)), ThreadPoolExecutor(workers) as pool:
            list(pool.map(slices, np.array_split(np.arange(out_d), workers)))
    else:
        slices(range(out_d))
    return labels, probs


def gaussian_weights(size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian importance map (sigma = size/8, as nnU-Net and MONAI), normalised to max 1."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0].view(-1, 1, 1) * axes[1].view(1, -1, 1) * axes[2].view(1, 1, -1)
    return (w / w.max()).clamp_(min=1e-3)


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
        # Resampled grid in multiples of 4 so window offsets map exactly onto the 1/4-resolution canvas.
        grid = [max(4, round(t / 4) * 4) for t in target]
        padded = [max(g, w) for g, w in zip(grid, window)]
        steps = [max(4, int(w * (1 - self.overlap)) // 4 * 4) for w in window]
        starts = [window_starts(p, w, s) for p, w, s in zip(padded, window, steps)]
        positions = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
        return {"window": window, "grid": grid, "padded": padded, "positions": positions}

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
                        keep_probabilities: bool = False) -> SegmentationResult:
        """Decode an encoded image with ``prompts`` into a label map of the image's shape (values 1..K unless
        given). Each prompt's low-resolution logits are kept on ``encoded``, so a prompt seen before costs
        only the upsampling and argmax."""
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
        t2 = time.perf_counter()
        with torch.inference_mode():
            stacked = torch.stack([encoded.logits[p] for p in prompts])
            labels, probs = upsample_argmax(stacked, encoded.shape, values, keep_probabilities)
        timings["upsample"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return SegmentationResult(labels, values, prompts, probs, encoded.mode, encoded.device, timings)

    def segment(self, image: np.ndarray, prompts: Sequence[str], label_values: Sequence[int] | None = None,
                spacing: Sequence[float] | None = None,
                keep_probabilities: bool = False) -> SegmentationResult:
        """Segment a (z, y, x) image already normalised to 0..255; label values default to 1..K.

        :meth:`encode` then :meth:`segment_encoded`, except that sliding windows are encoded and decoded one
        batch at a time (their contexts are not all kept).
        """
        prompts, values = self._check_prompts(prompts, label_values)
        try:
            return self._segment(image, prompts, values, spacing, keep_probabilities)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            log.warning("CUDA out of memory; retrying this image on the CPU (the next image goes to the GPU)")
            return self._segment_on_cpu(image, list(prompts), values, spacing, keep_probabilities)

    def _segment_on_cpu(self, image: np.ndarray, prompts: list[str], values: list[int],
                        spacing: Sequence[float] | None,
                        keep_probabilities: bool) -> SegmentationResult:
        """One image on the CPU in float32, then the model goes back to the GPU for the next image."""
        gpu, amp, batch = self.device, self.amp_dtype, self.prompt_batch_size
        torch.cuda.empty_cache()
        self.device, self.amp_dtype, self.prompt_batch_size = torch.device("cpu"), None, 4
        self.model = self.model.to(self.device)
        self._prompt_cache.clear()
        try:
            return self._segment(image, prompts, values, spacing, keep_probabilities)
        finally:
            self._prompt_cache.clear()
            self.device, self.amp_dtype, self.prompt_batch_size = gpu, amp, batch
            self.model = self.model.to(gpu)

    @staticmethod
    def _check_prompts(prompts: Sequence[str], label_values: Sequence[int] | None) -> tuple[list[str], list[int]]:
        if not prompts:
            raise UsageError("no prompts given")
        if any(not str(p).strip() for p in prompts):
            raise UsageError("empty prompt")
        values = list(label_values) if label_values is not None else list(range(1, len(prompts) + 1))
        if len(values) != len(prompts):
            raise ValueError("one label value per prompt is needed")
        return list(prompts), values

    def _segment(self, image: np.ndarray, prompts: list[str], values: list[int],
                 spacing: Sequence[float] | None, keep_probabilities: bool) -> SegmentationResult:
        t0 = time.perf_counter()
        self.embed_prompts(prompts)  # the text encoder first, so "encode" below is the image encoder's time
        t_text = time.perf_counter() - t0
        encoded = self._encode(image, spacing, keep=False)
        result = self.segment_encoded(encoded, prompts, values, keep_probabilities=keep_probabilities)
        decode = result.timings.pop("decode")
        encode = encoded.seconds
        if encoded.mode == "sliding":  # windows were encoded while being decoded
            encode, decode = 0.0, encoded.seconds + decode
        result.timings = {"text": t_text + result.timings["text"], "encode": encode, "decode": decode,
                          "model": encode + decode, "upsample": result.timings["upsample"],
                          "total": time.perf_counter() - t0}
        return result
