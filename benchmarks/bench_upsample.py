#!/usr/bin/env python3
"""Cell and column paths against the dense path of the upsampling + argmax, on synthetic logits, in one run.

    python benchmarks/bench_upsample.py [--shape 63,512,512] [--prompts 15] [--threads 2] [--repeat 3]

`upsample_argmax` decides most low-resolution cells at low resolution and computes full resolution only in
cells where the winner can change ("live" voxel-prompts); `upsample_argmax_dense` computes every voxel and
prompt. Which one runs is chosen by a cost model (CELL_PATH_FIXED + CELL_PATH_COST x live share, in units of
the dense path). This script measures both paths on logits from organ-like smooth blobs (few boundary cells)
to noise (boundaries everywhere, like the deterministic test checkpoints), prints per case the live share, the
model's estimate and the measured cell/dense time ratio, and a least-squares fit of the two constants. Both
paths round alike, so they must give the same labels: the voxels that differ are counted (0 expected), and
more than one in a million stops the script.

`upsample_argmax_columns` (used where the cell path loses and one axis is upsampled COLUMN_MIN_FACTOR times or
more) is timed too; it interpolates in another order, so it may differ at exact float32 ties (counted; more
than one in a million stops the script).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from text3dsam_cli import upsampling


def blobs(k: int, grid: tuple[int, int, int], radius: float, noise: float, seed: int) -> torch.Tensor:
    """(k, *grid) logits: +8 at the centre of each prompt's ball, falling linearly to -16 outside, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*(torch.arange(float(n)) for n in grid), indexing="ij")
    out = []
    for _ in range(k):
        centre = torch.rand(3, generator=gen) * torch.tensor([float(n) for n in grid])
        r = radius * (0.5 + torch.rand(1, generator=gen))
        dist = sum((a - c) ** 2 for a, c in zip(axes, centre)).sqrt()
        out.append(8.0 * (1 - dist / r).clamp(min=-2.0) + noise * torch.randn(grid, generator=gen))
    return torch.stack(out)


def live_share(logits: torch.Tensor, shape: tuple[int, int, int]) -> float:
    """The cost model's work share: voxels x live prompts of undecided cells over voxels x prompts."""
    k, d, h, w = logits.shape
    live, lo = upsampling.live_prompts(logits)
    count = live.sum(0)
    first = torch.argmax(live.to(torch.uint8), 0)
    decided = (count == 1) & (torch.gather(lo, 0, first[None])[0] >= upsampling.CELL_MARGIN)
    undecided = (count > 0) & ~decided
    sizes = [upsampling._cells(n, m, torch.device("cpu"))[1] for n, m in zip((d, h, w), shape)]
    voxels = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
    return float((voxels * count * undecided).sum()) / (float(np.prod(shape)) * k)


def best_time(fn, repeat: int) -> tuple[float, np.ndarray]:
    times, labels = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        labels, _ = fn()
        times.append(time.perf_counter() - t0)
    return min(times), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="63,512,512", help="output shape z,y,x")
    ap.add_argument("--grid", default="32,64,64", help="low-resolution logit grid z,y,x")
    ap.add_argument("--prompts", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    grid = tuple(int(v) for v in args.grid.split(","))
    values = list(range(1, args.prompts + 1))
    cases = [("small organs", 3.0, 0.0), ("organs", 6.0, 0.0), ("large organs", 12.0, 0.0),
             ("organs + noise 1", 6.0, 1.0), ("organs + noise 4", 6.0, 4.0), ("noise 10", 6.0, 10.0)]
    rows, shares, ratios = [], [], []
    for i, (name, radius, noise) in enumerate(cases):
        logits = blobs(args.prompts, grid, radius, noise, seed=i)
        share = live_share(logits, shape)
        with torch.inference_mode():
            t_cells, cells = best_time(lambda x=logits: upsampling.upsample_argmax(x, shape, values, force_cells=True),
                                       args.repeat)
            t_dense, dense = best_time(lambda x=logits: upsampling.upsample_argmax_dense(x, shape, values), args.repeat)
            t_cols, cols = best_time(lambda x=logits: (upsampling.upsample_argmax_columns(x, shape, values), None),
                                     args.repeat)
        differ = int((cells != dense).sum())
        differ_cols = int((cols != dense).sum())
        if max(differ, differ_cols) > 1e-6 * cells.size:
            raise SystemExit(f"{name}: a path disagrees with the dense path on {max(differ, differ_cols)} voxels")
        estimate = upsampling.CELL_PATH_FIXED + upsampling.CELL_PATH_COST * share
        rows.append((name, f"{share:.4f}", f"{t_cells:.3f}", f"{t_dense:.3f}", f"{t_cells / t_dense:.3f}",
                     f"{estimate:.3f}", str(differ), f"{t_cols:.3f}", f"{t_cols / t_dense:.3f}", str(differ_cols)))
        shares.append(share)
        ratios.append(t_cells / t_dense)
    header = ("logits", "live share", "cells (s)", "dense (s)", "cells / dense", "model's estimate",
              "voxels differing", "columns (s)", "columns / dense", "voxels differing (columns)")
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(n) for v, n in zip(row, widths)))
    slope, intercept = np.polyfit(np.asarray(shares), np.asarray(ratios), 1)
    print(f"least-squares fit: cells / dense = {intercept:.3f} + {slope:.1f} x live share "
          f"(in use: CELL_PATH_FIXED {upsampling.CELL_PATH_FIXED}, CELL_PATH_COST {upsampling.CELL_PATH_COST})")


if __name__ == "__main__":
    main()
