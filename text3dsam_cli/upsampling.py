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
