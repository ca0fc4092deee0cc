"""Low-resolution logits -> label map on the input grid: trilinear upsampling, sigmoid and the authors' argmax.

The label rule is the authors' (``pred.py``): background probability = 1 - max prompt probability, label =
argmax over [background, prompt 1, ..., prompt K] with ties going to the earlier entry, compared as float32.
Three strategies compute the same labels; :func:`upsample_argmax` picks the cheapest:

* :func:`upsample_argmax_dense`: every voxel and prompt, in cache-sized blocks (the reference strategy);
* the cell path: decided per cell of the low-resolution grid, exact work only in boundary cells;
* :func:`upsample_argmax_columns`: decided per full-resolution column between two low-resolution planes of
  the most upsampled axis, exact work only in undecided columns and there only for the prompts still live.

Trilinear interpolation is a convex combination of a cell's corners, and along one axis it is linear in the
weight, so a comparison that holds by a margin at both ends of a column holds everywhere in between.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from text3dsam_cli.labels import label_dtype
from text3dsam_cli.model.interpolation import source_index as _source_index  # the one interpolation rule

log = logging.getLogger(__name__)


#: Work per voxel and live prompt of the cell path relative to the dense path's per voxel and prompt, and the
#: cell path's fixed share (filling every voxel from its cell) as a fraction of the dense path's whole cost.
#: ``benchmarks/bench_upsample.py`` (2 threads, 63x512x512 output, 15 prompts): cell/dense time 0.35, 0.41,
#: 0.48, 0.63, 1.54, 4.07 at work shares 0.0013, 0.004, 0.008, 0.017, 0.035, 0.39 (organ-like blobs to noise);
#: these constants choose the faster path in all six (the cost per share is higher where many cells each keep
#: few prompts, so a plain fit would pick the cell path where it is 1.5x slower). At 756x512x512 the cell path's
#: fixed share is smaller (0.07-0.19): there they misjudge one case of six (estimate 1.00, measured 0.77-0.89).
CELL_PATH_COST = 25.0
CELL_PATH_FIXED = 0.25
#: Cell-path estimate above which the column path runs instead, where it applies (:func:`_columns_pay`).
#: ``benchmarks/bench_upsample.py`` (2 threads, 14-15 prompts), column / dense time at 756x512x512 (columns
#: along z): 0.19, 0.17, 0.22, 0.16, 0.28, 0.52 (cells: 0.14, 0.19, 0.47, 0.27, 0.83, 3.9); at 63x512x512
#: (columns along y): 0.59, 0.59, 0.66, 0.62, 0.66, 1.02 (cells: 0.24, 0.37, 0.70, 0.49, 1.62, 4.2), for the
#: six cases from organ-like blobs to noise. With 0.4 the choice is the fastest path or within 5 % of it in
#: 10 of the 12, 27 % slower in one (63 slices, organs + noise 1: estimate 0.45) and 2 % in one (noise).
COLUMNS_FROM_CELL_SHARE = 0.4
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


def _columns_pay(logits: torch.Tensor, out_shape: Sequence[int]) -> bool:
    """Whether :func:`upsample_argmax_columns` beats the dense path: on the CPU (its many small operations would
    each be a kernel launch on a GPU), for at most COLUMN_PROMPTS prompts, along an axis upsampled at least
    COLUMN_MIN_FACTOR times (each low-resolution plane's statistics then serve that many output slices)."""
    return (logits.device.type == "cpu" and logits.shape[0] <= COLUMN_PROMPTS
            and max(_factors(logits, out_shape)) >= COLUMN_MIN_FACTOR)


def _factors(logits: torch.Tensor, out_shape: Sequence[int]) -> list[float]:
    """Output / input size along each axis of (K, d, h, w) logits."""
    return [o / max(1, i) for o, i in zip(out_shape, logits.shape[1:])]


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
    the deterministic test checkpoints), :func:`upsample_argmax_dense` runs instead; and where an axis is
    upsampled enough (:func:`_columns_pay`) :func:`upsample_argmax_columns` runs already from an estimate of
    COLUMNS_FROM_CELL_SHARE (``force_cells`` overrides both, for tests). ``keep_probabilities`` needs every
    voxel and uses the dense path.
    """
    dense_chunk = min(chunk_voxels, dense_block(logits.device))
    if keep_probabilities or (logits.device.type != "cpu" and not force_cells):
        # On a GPU every voxel is cheap: the dense path, whose label map stays on the device until it is done.
        return upsample_argmax_dense(logits, out_shape, label_values, keep_probabilities, dense_chunk)
    logits = logits.float()
    k, d, h, w = logits.shape
    out = [int(s) for s in out_shape]
    device = logits.device
    dtype = label_dtype(label_values)
    lut = np.asarray([0, *label_values], dtype=dtype)
    live, lo = live_prompts(logits)
    count = live.sum(0)
    first = torch.zeros(live.shape[1:], dtype=torch.int64, device=live.device)  # the first live prompt (0: none)
    for i in range(k - 1, -1, -1):  # a few elementwise passes (an argmax along prompts took 25 ms on the CT case)
        first = torch.where(live[i], i, first)
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
    if not force_cells and share > COLUMNS_FROM_CELL_SHARE and _columns_pay(logits, out):
        return upsample_argmax_columns(logits, out, label_values, dense_chunk), None
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
                          on_device: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Every voxel, every prompt: the exact running argmax (and, if asked, float16 probabilities).

    Trilinear interpolation is separable: z by ``torch.lerp`` at low resolution, x by ATen's linear rule on the
    low-resolution rows of each output slice, then y by one ``torch.addcmul`` per run of output rows, for all
    prompts at once, in blocks of about ``chunk_voxels`` values so that the few passes over each block run in
    the CPU cache. Probabilities are compared as float32, like the authors' code: clamped at 0.5 (background
    wins at or below it), their bit patterns are ordered integers, so one int32 key per voxel and prompt,
    bits << 7 | (127 - prompt), ranks by probability and then by earlier prompt (ties, e.g. two saturated
    1.0), and a single max over the prompts gives the label.

    ``on_device`` (default: the logits are not on the CPU) keeps the label map on the logits' device in slabs
    (:func:`device_slab_slices`), each brought back in one transfer.
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

    def slices(zs: Sequence[int], target: torch.Tensor | None = None, base: int = 0) -> None:
        """Labels of output slices ``zs`` into ``labels``, or into ``target`` (slice z at z - ``base``) on the
        device."""
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
                value = best_label if identity else lut[best_label]
                if target is None:
                    labels[z, y0:y1] = value.cpu().numpy()
                else:
                    target[z - base, y0:y1] = value

    if device.type != "cpu" if on_device is None else on_device:
        # On a GPU the label map stays on the device in slabs as large as its free memory allows, each brought back
        # in one transfer (one for the whole map where it fits), not one per block.
        step = device_slab_slices(device, out_h * out_w * _device_label_dtype(dtype).itemsize, out_d)
        slab = torch.empty((step, out_h, out_w), dtype=_device_label_dtype(dtype), device=device)
        for z0 in range(0, out_d, step):
            z1 = min(out_d, z0 + step)
            slices(range(z0, z1), slab, z0)
            labels[z0:z1] = slab[: z1 - z0].cpu().numpy()  # uint8, or int32 values cast to the map's dtype
        return labels, probs
    threads = torch.get_num_threads()
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


#: Share of a GPU's free memory that one slab of an on-device label map may take (:func:`device_slab_slices`);
#: the rest is left to the blocks of interpolated probabilities and to other processes.
DEVICE_SLAB_SHARE = 0.25


def _device_label_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype that holds a label map of numpy ``dtype`` on a device (torch's uint16/uint32 support few
    operations: those maps are held as int32 and cast on the CPU)."""
    return torch.uint8 if dtype == np.uint8 else torch.int32


def device_slab_slices(device: torch.device, bytes_per_slice: int, slices: int) -> int:
    """Output slices per on-device slab of a label map: all of them where DEVICE_SLAB_SHARE of the device's free
    memory holds them, else as many as fit (at least one)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:  # no free-memory query (e.g. MPS): a 256 MB slab
        free = (1 << 28) / DEVICE_SLAB_SHARE
    return max(1, min(slices, int(free * DEVICE_SLAB_SHARE) // max(1, bytes_per_slice)))


#: Upsampling factor (output / input size) of an axis from which the column path pays for its per-plane work.
COLUMN_MIN_FACTOR = 4.0
#: Values (columns x prompts) per operation of the column path's voxel-by-voxel work.
COLUMN_CHUNK = 1 << 18
#: Runs of consecutive intervals per worker thread of the column path (load balance).
COLUMN_RUNS_PER_WORKER = 4
#: Prompts the column path ranks in one int32 key, after its background row (rank 127; prompt j: 126 - j).
COLUMN_PROMPTS = PACKED_PROMPTS - 1


@dataclass
class _ColumnEnd:
    """Per full-resolution column, at one low-resolution plane: the top prompt (its rank, approximate to 2**-16
    of the logit: ``gap`` is 0 where it is not the exact maximum), the top logit, the gap to the best other
    prompt, the ranks of the first prompts above UNSATURATED and above SATURATION_LOW (0: none), and whether
    the latter is at or above SATURATION_HIGH (probability exactly 1.0)."""

    rank: torch.Tensor
    top: torch.Tensor
    gap: torch.Tensor
    first_unsaturated: torch.Tensor
    first_low: torch.Tensor
    low_saturates: torch.Tensor


def _first_above(values: torch.Tensor, threshold: float, ranks: torch.Tensor) -> torch.Tensor:
    """(K, n) -> (n,) int32: rank of the first prompt whose value exceeds ``threshold``, 0 where none does
    (sign bit of threshold - value as an all-ones mask; comparisons to bool are many times slower on CPU)."""
    above = torch.rsub(values, threshold).view(torch.int32).bitwise_right_shift_(31)
    return above.bitwise_and_(ranks).amax(0)


def _column_end(values: torch.Tensor, ranks: torch.Tensor) -> _ColumnEnd:
    """:class:`_ColumnEnd` of (K, n) logits; ``ranks`` (K, 1) int32 as :func:`_ranks`."""
    top = values.amax(0)
    # Logits clamped at -1 and shifted to >= 0 have ordered bit patterns: the 7 low bits take the rank.
    key = values.clamp(min=-1.0).add_(1.0).view(torch.int32).bitwise_and_(~PACKED_PROMPTS).bitwise_or_(ranks)
    rank = key.amax(0).bitwise_and_(PACKED_PROMPTS)
    others = values.clone().scatter_(0, (PACKED_PROMPTS - rank).long()[None], float("-inf")).amax(0)
    first_low = _first_above(values, SATURATION_LOW, ranks)
    index = (PACKED_PROMPTS - first_low).clamp_(max=values.shape[0] - 1).long()  # none: any row, masked below
    saturates = (values.gather(0, index[None])[0] >= SATURATION_HIGH) & (first_low > 0)
    return _ColumnEnd(rank, top, top - others, _first_above(values, UNSATURATED, ranks), first_low, saturates)


def _decide_columns(a: _ColumnEnd, b: _ColumnEnd, margin: float = CELL_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns whose label is the same at every voxel between planes a and b: (rank of the label (0:
    background), decided). Every logit is linear along the column, so a comparison holding by ``margin`` at both
    ends holds in between. Decided as background: every logit <= -margin at both ends. As prompt p: p is the top
    at both ends by ``margin`` over every other prompt and over background, and no earlier prompt (which would
    win a float32 tie) is above UNSATURATED at either end; or p is the first prompt at or above SATURATION_HIGH
    (probability exactly 1.0) at both ends and every earlier prompt is at or below SATURATION_LOW (below 1.0)."""
    top = (a.rank == b.rank) & (torch.minimum(a.top, b.top) >= margin) & (torch.minimum(a.gap, b.gap) >= margin)
    top &= ((a.top <= UNSATURATED) | (a.first_unsaturated == a.rank))
    top &= ((b.top <= UNSATURATED) | (b.first_unsaturated == b.rank))
    saturated = (a.first_low == b.first_low) & a.low_saturates & b.low_saturates
    background = torch.maximum(a.top, b.top) <= -margin
    rank = torch.where(top, a.rank, torch.where(saturated, a.first_low, 0))
    return rank, top | saturated | background


def upsample_argmax_columns(logits: torch.Tensor, out_shape: Sequence[int], label_values: Sequence[int],
                            chunk_voxels: int | None = None, axis: int | None = None) -> np.ndarray:
    """The dense path's labels, decided per full-resolution column of the most upsampled axis (CPU).

    Along ``axis`` (default: the largest output/input ratio) every output voxel lies between two
    low-resolution planes, and each prompt's logit is linear between them. Each plane is interpolated once to
    full resolution in the other two axes; a column whose winner holds by a margin at both ends
    (:func:`_decide_columns`) takes one label for all its voxels. The other columns are computed voxel by voxel
    with the authors' float32 rule (sigmoid, ties to the earlier prompt). Logits are taken plane-first here
    (the dense path interpolates the axis first), so the two paths can differ at exact float32 ties: about 1
    voxel in 10 million (``benchmarks/bench_upsample.py``: 0-3 voxels of 198 M).
    """
    k = logits.shape[0]
    if k > COLUMN_PROMPTS:
        raise ValueError(f"the column path ranks at most {COLUMN_PROMPTS} prompts, got {k}")
    if axis is None:
        axis = int(np.argmax(_factors(logits, out_shape)))
    order = [axis, *(a for a in range(3) if a != axis)]
    moved = logits.float().permute(0, *(a + 1 for a in order))
    labels = _columns_along_first(moved, [int(out_shape[a]) for a in order], label_values,
                                  chunk_voxels or DENSE_BLOCK)
    if axis == 0:
        return labels
    return np.ascontiguousarray(labels.transpose(np.argsort(order)))


def _columns_along_first(logits: torch.Tensor, out_shape: Sequence[int], label_values: Sequence[int],
                         chunk: int) -> np.ndarray:
    """:func:`upsample_argmax_columns` along axis 0 of (K, d, h, w) logits."""
    k, d, h, _ = logits.shape
    out_d, out_h, out_w = out_shape
    device = logits.device
    _, _, wz = _source_index(d, out_d, device)
    # (first plane, second plane, output slices between them): the dense path's runs along this axis
    intervals = [(i0, i1, list(range(z0, z1))) for z0, z1, i0, i1, _ in _runs(d, out_d, device)]
    weights = wz.tolist()
    dtype = label_dtype(label_values)
    labels = np.zeros((out_d, out_h, out_w), dtype=dtype)
    # torch has no scatter for uint16 / uint32: those are written through the signed type of their size
    as_torch = np.dtype(f"i{dtype.itemsize}") if dtype.kind == "u" and dtype.itemsize > 1 else dtype
    flat = torch.from_numpy(labels.view(as_torch)).view(out_d, -1)
    lut = torch.from_numpy(np.asarray([0, *label_values], dtype=dtype).view(as_torch))
    identity = [int(v) for v in label_values] == list(range(1, k + 1))  # label = prompt index: no lookup
    ranks = _ranks(k, device).view(-1, 1)
    key_ranks = _ranks(k + 1, device).view(-1, 1)  # background, then the prompts
    blocks = _blocks(_runs(h, out_h, device), max(1, chunk // max(1, k * out_w)))
    spans = [(block[0][0] * out_w, block[-1][1] * out_w) for block in blocks]

    def plane(a: int) -> list[tuple[torch.Tensor, _ColumnEnd]]:
        """Plane ``a`` at full resolution in y and x, per block: logits (K, n) and their column statistics."""
        rows = F.interpolate(logits[:, a][None], size=(h, out_w), mode="bilinear", align_corners=False)[0]
        steps = _row_steps(rows)
        out = []
        for block, (s0, s1) in zip(blocks, spans):
            values = _resize_rows(rows, steps, block, torch.empty((k, (s1 - s0) // out_w, out_w), device=device))
            values = values.view(k, -1)
            out.append((values, _column_end(values, ranks)))
        return out

    def interval(first: list[tuple[torch.Tensor, _ColumnEnd]], second: list[tuple[torch.Tensor, _ColumnEnd]],
                 zs: list[int]) -> None:
        base = torch.empty(out_h * out_w, dtype=torch.int64, device=device)
        work: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # undecided columns, in chunks
        per = max(1, COLUMN_CHUNK // (k + 1))
        for (va, ea), (vb, eb), (s0, s1) in zip(first, second, spans):
            rank, decided = _decide_columns(ea, eb)
            base[s0:s1] = torch.where(rank > 0, PACKED_PROMPTS + 1 - rank, 0)
            undecided = torch.nonzero(~decided).flatten()
            for c in range(0, undecided.numel(), per):
                columns = undecided[c : c + per]
                # a background row first: logit 0 is probability 0.5, ranked above every prompt (ties to it)
                start = torch.empty((k + 1, columns.numel()), device=device)
                step = torch.empty_like(start)
                start[0] = 0
                step[0] = 0
                torch.index_select(va, 1, columns, out=start[1:])
                torch.index_select(vb, 1, columns, out=step[1:])
                step[1:] -= start[1:]
                work.append((columns + s0, start, step))
        base_labels = base.to(lut.dtype) if identity else torch.index_select(lut, 0, base)
        buffer = torch.empty(max((start.numel() for _, start, _ in work), default=0), device=device)
        for i, z in enumerate(zs):
            row = flat[z]
            if i and (weights[z] == weights[zs[0]] or first is second):
                row.copy_(flat[zs[0]])  # same weight (or one plane): same labels
                continue
            row.copy_(base_labels)
            for columns, start, step in work:
                values = torch.add(start, step, alpha=weights[z], out=buffer[:start.numel()].view(start.shape))
                values.sigmoid_()
                top = _packed_first_max(values, key_ranks)  # label index = 127 - rank
                index = torch.rsub(top.bitwise_and_(PACKED_PROMPTS), PACKED_PROMPTS)
                row.scatter_(0, columns, index.to(lut.dtype) if identity else torch.index_select(lut, 0, index))

    def run(share: Sequence[tuple[int, int, list[int]]]) -> None:
        planes: dict[int, list[tuple[torch.Tensor, _ColumnEnd]]] = {}
        # inference mode is per thread: the caller's (if any) does not reach the workers, and the label map's
        # tensor view, made under it, may only be written under it
        with torch.inference_mode():
            for a, b, zs in share:
                planes = {p: planes[p] for p in (a, b) if p in planes}  # the earlier plane is let go first
                for p in (a, b):
                    if p not in planes:
                        planes[p] = plane(p)
                interval(planes[a], planes[b], zs)

    threads = torch.get_num_threads()
    workers = min(DENSE_WORKERS, threads, len(intervals))
    if workers > 1:
        # Runs of consecutive intervals, a few per worker, taken in turn as workers come free: the work per
        # interval varies along the axis (one half each left a core idle for 0.4-0.6 s of 3.1 s); each run
        # interpolates its first plane again, a small price.
        shares = np.array_split(np.arange(len(intervals)), min(len(intervals), workers * COLUMN_RUNS_PER_WORKER))
        with intra_op_threads(max(1, threads // workers)), ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, [[intervals[i] for i in share] for share in shares]))
    else:
        run(intervals)
    return labels
