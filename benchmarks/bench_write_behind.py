#!/usr/bin/env python3
"""Folder runs with each input's outputs written behind (while the next input is segmented) against in turn.

    python benchmarks/bench_write_behind.py [--checkpoint DIR] [--device cpu] [--count 4] [--pairs 2]

Builds the first ``--count`` CTs of ``bench_gpu.py``'s folder (the AMOS case tiled to 63-630 slices, float32 HU,
.nii.gz) and runs `text3dsam segment FOLDER <14 prompts> --modality CT` as whole processes, alternating
``TEXT3DSAM_WRITE_BEHIND=0`` (in turn, the baseline) and ``=1`` (behind), after one warm-up run (prompt-embedding
store, page cache). Prints every pair and the median ratio behind/in turn (below 1: write-behind is faster).
The default (on for accelerators, off on the CPU) rests on this measurement: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_bigct import prompts  # noqa: E402
from bench_gpu import FOLDER_SHAPES, build_folder  # noqa: E402
from bench_segment import build_checkpoint, whole_process  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="checkpoint folder (default: build the shared `full` one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--count", type=int, default=4, help=f"CTs in the folder (1-{len(FOLDER_SHAPES)})")
    ap.add_argument("--pairs", type=int, default=2, help="in-turn / behind pairs after the warm-up")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(tmp / "ckpt")
        paths = build_folder(tmp / "folder")
        for extra in paths[max(1, args.count):]:
            extra.unlink()
        env = {**os.environ, "TEXT3DSAM_CACHE": str(tmp / "cache")}
        seg = ["module", "text3dsam_cli", "segment", str(tmp / "folder"), *prompts(), "-m", str(checkpoint),
               "--modality", "CT", "--device", args.device, "-q", "-o", str(tmp / "out")]
        whole_process(seg, tmp, env)  # warm-up
        ratios = []
        for pair in range(args.pairs):
            turn = whole_process(seg, tmp, {**env, "TEXT3DSAM_WRITE_BEHIND": "0"})
            behind = whole_process(seg, tmp, {**env, "TEXT3DSAM_WRITE_BEHIND": "1"})
            ratios.append(behind["seconds"] / turn["seconds"])
            print(f"pair {pair + 1}: in turn {turn['seconds']:.2f} s ({turn['rss_mb']:.0f} MB), behind "
                  f"{behind['seconds']:.2f} s ({behind['rss_mb']:.0f} MB), ratio {ratios[-1]:.3f}")
        print(f"{min(args.count, len(paths))} CTs on {args.device}: behind / in turn, median of {len(ratios)} "
              f"pairs: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
