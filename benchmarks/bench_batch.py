#!/usr/bin/env python3
"""Folder throughput: reading the next input while the current one is segmented, against reading in turn.

    python benchmarks/bench_batch.py [--checkpoint DIR] [--copies 2]

Runs the same list of real inputs (DICOM series with JPEG 2000 / JPEG-LS pixel data, NIfTI, NRRD, challenge
npz from ../shared/data) through one Segmenter twice in the same process: read-ahead off (baseline) and on.
Prints images per minute for both and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_segment import SHARED, build_checkpoint

DATA = SHARED / "data"
INPUTS = [
    DATA / "dicom" / "totalsegmentator_ct" / "dicom",
    DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz",
    DATA / "dicom" / "dicom2nifti" / "generic_compressed_jpegls_001" / "dicom",
    DATA / "extra" / "pyradiomics" / "brain1_image.nrrd",
    DATA / "challenge" / "MR_BraTS-T1c_bratsgli_0017.npz",
    DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="checkpoint folder (default: build the shared `full` one)")
    ap.add_argument("--copies", type=int, default=2, help="times the input list is repeated")
    args = ap.parse_args()

    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.io import expand_inputs
    from text3dsam_cli.model import load_model
    from text3dsam_cli.pipeline import SegmentOptions, SegmentRun

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(tmp / "ckpt")
        segmenter = Segmenter(load_model(checkpoint), device="cpu")
        items = expand_inputs([str(p) for p in INPUTS]) * args.copies
        rates = {}
        for read_ahead in (0, 1, 0, 1):
            out = tmp / f"out{read_ahead}"
            options = SegmentOptions(output=str(out), fmt="nii.gz")
            run = SegmentRun(segmenter, ["liver", "kidney"], options, read_ahead=read_ahead)
            # Unique stems per copy so every output is written.
            batch = [type(it)(it.path, it.kind, f"{it.stem}_{i}") for i, it in enumerate(items)]
            t = time.perf_counter()
            summary = run.run(batch)
            seconds = time.perf_counter() - t
            assert not summary.failed, [o.error for o in summary.failed]
            rate = 60 * len(batch) / seconds
            rates[read_ahead] = max(rates.get(read_ahead, 0.0), rate)
    print(f"inputs per run                  {len(items)}")
    print(f"images/min, reading in turn     {rates[0]:.1f}")
    print(f"images/min, read-ahead          {rates[1]:.1f}")
    print(f"throughput ratio                {rates[1] / rates[0]:.2f}x")


if __name__ == "__main__":
    main()
