#!/usr/bin/env python3
"""The GPU check in one script: bf16 vs fp32 agreement, model and whole-process times, the big CT.

    python benchmarks/bench_gpu.py [--checkpoint DIR] [--skip-bigct] [--skip-folder]

Needs a CUDA device and ../shared beside the checkout. Prints, with the `full` test checkpoint:

* per shared challenge case (CT, MR, US): voxel agreement of fp32 on CUDA (TF32 off) with the CPU and of
  `--precision bf16` with fp32 (goal >= 99.9 %); the model time (image encoder + decoder, synchronised) and
  `Segmenter.segment` time per precision (goal: model < 100 ms on the CT case);
* `text3dsam segment CT_AMOS_amos_0018.npz --device cuda` as a whole process with a warm prompt-embedding
  store (goal < 1.5 s end to end), and the same on the CPU in the same run for the ratio;
* the CT case on CUDA against the process floor, `python -c "import torch; torch.zeros(1, device='cuda')"`
  (goal: at most the floor + 1.0 s);
* `benchmarks/bench_bigct.py` on CUDA and on all the machine's CPU cores, each against the I/O floor measured
  there (goals: <= 2x on CUDA, <= 2.5x on the CPU cores), and the two label maps against each other (>= 99.99 %
  of voxels equal);
* a folder of 8 CTs of different shapes segmented by one process on CUDA, in scans per minute, against the rate
  their I/O floors allow (the sum of the 8 floor processes; goal: at least half that rate); and the same folder
  with outputs written in turn (``TEXT3DSAM_WRITE_BEHIND=0``) against the default, written behind.
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


def bigct(checkpoint: Path, tmp: Path, device: str, threads: int, target: float) -> None:
    """`bench_bigct.py` on ``device`` with ``threads`` CPU threads, its CT and outputs kept in ``tmp``/bigct."""
    sys.stdout.flush()
    subprocess.run([sys.executable, str(HERE / "bench_bigct.py"), "--checkpoint", str(checkpoint), "--device", device,
                    "--threads", str(threads), "--repeat", "2", "--keep", str(tmp / "bigct"),
                    "--target", str(target)], check=True)


def map_agreement(first: Path, second: Path) -> float:
    """Share of voxels equal in two label-map files."""
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(first)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(second)))
    return float((a == b).mean()) if a.shape == b.shape else 0.0


#: The folder benchmark's CTs: (times the AMOS case is tiled along z, rows kept, columns kept).
FOLDER_SHAPES = ((1, 512, 512), (2, 512, 512), (3, 448, 512), (4, 512, 384), (5, 384, 384), (6, 512, 448),
                 (8, 320, 512), (10, 512, 512))


def build_folder(folder: Path) -> list[Path]:
    """8 CTs of different shapes (63 to 630 slices) made from the AMOS case, float32 HU, LAS, .nii.gz."""
    import numpy as np
    import SimpleITK as sitk

    from text3dsam_cli.io import read_challenge_npz

    folder.mkdir(parents=True, exist_ok=True)
    hu = (read_challenge_npz(CHALLENGE / f"{CASES[0]}.npz").array.astype(np.float32) / 255.0 * 400.0 - 160.0)
    paths = []
    for i, (tiles, rows, cols) in enumerate(FOLDER_SHAPES):
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.tile(hu, (tiles, 1, 1))[:, :rows, :cols]))
        image.SetSpacing((0.8, 0.8, 1.5 - 0.1 * i))
        image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        paths.append(folder / f"ct{i}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]), True)
    return paths


def folder_rate(checkpoint: Path, tmp: Path) -> None:
    """One `segment` process over the folder on CUDA against the I/O-bound rate (sum of the 8 floor processes)."""
    sys.path.insert(0, str(HERE))
    from bench_bigct import IO_FLOOR, prompts
    from bench_segment import whole_process

    paths = build_folder(tmp / "folder")
    floor_script = tmp / "io_floor.py"
    floor_script.write_text(IO_FLOOR)
    env = {**os.environ, "TEXT3DSAM_CACHE": str(tmp / "cache")}
    seg = ["module", "text3dsam_cli", "segment", str(tmp / "folder"), *prompts(), "-m", str(checkpoint),
           "--modality", "CT", "--device", "cuda", "-q", "-o", str(tmp / "folder_out")]
    whole_process(seg, tmp, env)  # warm-up: store, page cache, kernels (a rerun overwrites its own outputs)
    floors = sum(whole_process(["path", str(floor_script), str(p), str(tmp / "floor.nii.gz")], tmp, env)["seconds"]
                 for p in paths)
    ours = whole_process(seg, tmp, env)["seconds"]  # on CUDA outputs are written behind by default
    in_turn = whole_process(seg, tmp, {**env, "TEXT3DSAM_WRITE_BEHIND": "0"})["seconds"]
    io_rate, our_rate = 60 * len(paths) / floors, 60 * len(paths) / ours
    print(f"folder of {len(paths)} CTs (63-630 slices), one process on cuda: {ours:.2f} s, {our_rate:.1f} scans/min; "
          f"I/O floors summed {floors:.2f} s, {io_rate:.1f} scans/min; ratio {our_rate / io_rate:.2f} (goal >= 0.5)")
    print(f"  the same with outputs written in turn (TEXT3DSAM_WRITE_BEHIND=0): {in_turn:.2f} s, "
          f"write-behind {in_turn / ours:.2f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="checkpoint folder (default: build the shared `full` one)")
    ap.add_argument("--skip-bigct", action="store_true")
    ap.add_argument("--skip-folder", action="store_true")
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
        floors = {}
        for label, code in (("python -c 'import torch'", "import torch"),
                            ("... + CUDA context", "import torch; torch.zeros(1, device='cuda')")):
            starts = []
            for _ in range(3):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True)
                starts.append(time.perf_counter() - t)
            floors[label] = min(starts)
            print(f"  start-up floor, {label}: {min(starts):.2f} s")
        process_floor = floors["... + CUDA context"]
        print(f"  CT case on cuda minus the process floor: {gpu - process_floor:.2f} s (goal <= 1.0 s)")
        for device in ("cuda", "cpu"):
            steps = json.loads((tmp / f"{device}.json").read_text())["timings_s"]
            print(f"  steps inside, {device}: " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items()))
        if not args.skip_folder:
            folder_rate(checkpoint, tmp)
        if not args.skip_bigct:
            from text3dsam_cli.parallel import usable_cores

            cores = usable_cores()
            print(f"big CT on cuda ({cores} CPU threads beside it):")
            bigct(checkpoint, tmp, "cuda", cores, 2.0)
            print(f"big CT on the CPU, {cores} threads:")
            bigct(checkpoint, tmp, "cpu", cores, 2.5)
            agreement = map_agreement(tmp / "bigct" / "ours_cuda.nii.gz", tmp / "bigct" / "ours_cpu.nii.gz")
            print(f"big CT label maps, cuda vs cpu: {agreement:.5%} of voxels equal (goal >= 99.99 %)")


if __name__ == "__main__":
    main()
