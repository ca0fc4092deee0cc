#!/usr/bin/env python3
"""The GPU check in one script: bf16 vs fp32 agreement, model and whole-process times, the big CT.

    python benchmarks/bench_gpu.py [--checkpoint DIR] [--skip-bigct]

Needs a CUDA device and ../shared beside the checkout. Prints, with the `full` test checkpoint:

* per shared challenge case (CT, MR, US): voxel agreement of fp32 on CUDA (TF32 off) with the CPU and of
  `--precision bf16` with fp32 (goal >= 99.9 %); the model time (image encoder + decoder, synchronised) and
  `Segmenter.segment` time per precision (goal: model < 100 ms on the CT case);
* `text3dsam segment CT_AMOS_amos_0018.npz --device cuda` as a whole process with a warm prompt-embedding
  store (goal < 1.5 s end to end), and the same on the CPU in the same run for the ratio;
* `benchmarks/bench_bigct.py --device cuda` (the whole-body CT against the I/O floor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHALLENGE = HERE.parents[0].parent / "shared" / "data" / "challenge"
CASES = ("CT_AMOS_amos_0018", "MR_BraTS-T1c_bratsgli_0017", "US_Cardiac_patient0027_2CH_half_sequence")


def parity(checkpoint: Path) -> list[tuple[str, ...]]:
    """Per case: fp32 on CUDA (TF32 off) vs fp32 on the CPU, bf16 vs fp32 on CUDA, model and segment times."""
    import torch

    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.io import read_challenge_npz
    from text3dsam_cli.model import load_model
    from text3dsam_cli.pipeline import prepare_scan, prompts_for
    from text3dsam_cli.prompts import prompts_to_segment

    model = load_model(checkpoint)
    rows = []
    for case in CASES:
        volume = read_challenge_npz(CHALLENGE / f"{case}.npz")
        prompts, values, instance = prompts_for(volume, [])
        prompts, values = prompts_to_segment(prompts, values, instance)
        scan = prepare_scan(volume)
        cpu = Segmenter(model, device="cpu").segment(scan.image, prompts, values).labels
        labels, times = {}, {}
        for precision in ("fp32", "bf16"):
            segmenter = Segmenter(model, device="cuda", precision=precision)
            segmenter.segment(scan.image, prompts, values)  # warm-up (kernels, prompts)
            best = None
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                result = segmenter.segment(scan.image, prompts, values)
                torch.cuda.synchronize()
                total = time.perf_counter() - t
                if best is None or total < best[0]:
                    best = (total, result.timings["model"])
            labels[precision], times[precision] = result.labels, best
        model.to("cpu")
        rows.append((case, f"{float((labels['fp32'] == cpu).mean()):.5%}",
                     f"{float((labels['fp32'] == labels['bf16']).mean()):.5%}",
                     f"{times['fp32'][1] * 1000:.0f} / {times['bf16'][1] * 1000:.0f}",
                     f"{times['fp32'][0]:.3f} / {times['bf16'][0]:.3f}"))
    return rows


def whole_process(checkpoint: Path, device: str, tmp: Path) -> float:
    case = CHALLENGE / f"{CASES[0]}.npz"
    env = {**os.environ, "TEXT3DSAM_CACHE": str(tmp / "cache")}
    args = [sys.executable, "-m", "text3dsam_cli", "segment", str(case), "-m", str(checkpoint), "--device", device,
            "-q", "-o", str(tmp / f"{device}.npz")]
    subprocess.run(args, check=True, env=env, capture_output=True)  # warm store and page cache
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(args, check=True, env=env, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="checkpoint folder (default: build the shared `full` one)")
    ap.add_argument("--skip-bigct", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    sys.path.insert(0, str(HERE))
    from bench_segment import build_checkpoint

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(tmp / "ckpt")
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        print(f"{'case':<42} {'fp32 cuda vs cpu':>16} {'bf16 vs fp32':>13} {'model ms fp32/bf16':>19} "
              f"{'segment s fp32/bf16':>20}")
        for row in parity(checkpoint):
            print(f"{row[0]:<42} {row[1]:>16} {row[2]:>13} {row[3]:>19} {row[4]:>20}")
        gpu = whole_process(checkpoint, "cuda", tmp)
        cpu = whole_process(checkpoint, "cpu", tmp)
        print(f"text3dsam segment {CASES[0]}, whole process, warm store: cuda {gpu:.2f} s (goal < 1.5 s), "
              f"cpu {cpu:.2f} s, ratio {cpu / gpu:.1f}x")
        for label, code in (("python -c 'import torch'", "import torch"),
                            ("... + CUDA context", "import torch; torch.zeros(1, device='cuda')")):
            starts = []
            for _ in range(3):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True)
                starts.append(time.perf_counter() - t)
            print(f"  start-up floor, {label}: {min(starts):.2f} s")
        for device in ("cuda", "cpu"):
            steps = json.loads((tmp / f"{device}.json").read_text())["timings_s"]
            print(f"  steps inside, {device}: " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items()))
        if not args.skip_bigct:
            sys.stdout.flush()
            subprocess.run([sys.executable, str(HERE / "bench_bigct.py"), "--checkpoint", str(checkpoint),
                            "--device", "cuda", "--repeat", "1"], check=True)


if __name__ == "__main__":
    main()
