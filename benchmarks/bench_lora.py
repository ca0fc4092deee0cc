#!/usr/bin/env python3
"""LoRA and decoder-only fine-tuning against full fine-tuning, on the shared ultrasound case, in one run.

    python benchmarks/bench_lora.py [--steps 8] [--rank 8] [--threads 2] [--checkpoint DIR]

Each mode (full, lora, decoder-only) runs ``text3dsam_cli.training.finetune`` in its own worker process on
the same data (``US_Cardiac_patient0027_2CH_half_sequence``, gts beside, the small test checkpoint 64x128x128
unless ``--checkpoint``), same seed, same steps, ``--augment none``. Per mode: trainable parameters, median
seconds per step (train_log.jsonl, first step left out), median CPU seconds per step (the process's CPU time,
all threads, between progress events: the work done, less sensitive than wall time to other load on a
shared machine), the worker's peak RSS (``resource.getrusage
(RUSAGE_SELF).ru_maxrss`` after training, i.e. model + data + optimizer + autograd peak), and the mean Dice of
the saved model over the case's three classes on its full grid (``evaluate_dice``, as ``segment`` does), and
that of the starting model. Ratios are against full fine-tuning measured in the same run.

The shared test checkpoints are deterministic noise: a Dice change after a few steps says little about what
LoRA does to a trained model; the time and memory ratios are what this measures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
CASE = "US_Cardiac_patient0027_2CH_half_sequence"
MODES = ("full", "lora", "decoder-only")


def _worker(mode: str, data: str, checkpoint: str, out: str, steps: int, rank: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from text3dsam_cli.model import load_model
    from text3dsam_cli.training import (
        AugmentConfig,
        TrainingArguments,
        discover_cases,
        evaluate_dice,
        finetune,
        load_validation,
    )
    from text3dsam_cli.training.lora import count_parameters

    model = load_model(checkpoint)
    val = load_validation(discover_cases(data))
    if mode == "base":  # the starting model's Dice, in a process of its own (its peak is not training's)
        print(json.dumps({"mode": mode, "dice": evaluate_dice(model, val)["mean_dice"]}))
        return
    args = TrainingArguments(data=data, output=out, max_steps=steps, save_every=0, device="cpu", seed=0,
                             warmup_ratio=0.0, augment=AugmentConfig.none(),
                             freeze=("decoder-only",) if mode == "decoder-only" else (),
                             lora_rank=rank if mode == "lora" else 0)
    counts: dict[str, int] = {}
    cpu: list[float] = []  # process CPU time (all threads) at the start and after each step

    def callback(event) -> None:  # type: ignore[no-untyped-def]
        if event.kind == "start":
            counts["trainable"], counts["total"] = count_parameters(model)
        if event.kind in ("start", "step"):
            cpu.append(time.process_time())

    t0 = time.perf_counter()
    finetune(args, model, callback=callback)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    records = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records if r["type"] == "train"][1:]
    cpu_steps = [b - a for a, b in itertools.pairwise(cpu)][1:]
    after = evaluate_dice(load_model(out), val)["mean_dice"]
    print(json.dumps({"mode": mode, "trainable": counts.get("trainable"), "total": counts.get("total"),
                      "s_per_step": statistics.median(seconds),
                      "cpu_s_per_step": statistics.median(cpu_steps), "peak_rss_mb": peak_mb, "wall_s": wall,
                      "dice_after": after}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", help="checkpoint folder (default: build the shared small test checkpoint)")
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "DATA", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        _worker(*opts.worker, opts.steps, opts.rank, opts.threads)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = opts.checkpoint
        if checkpoint is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import build_reference_checkpoint

            checkpoint = str(build_reference_checkpoint(work / "ckpt", "small"))
        data = work / "data"
        data.mkdir()
        for name in (f"{CASE}.npz", f"{CASE}_gt.npz"):
            (data / name).symlink_to(SHARED / "data" / "challenge" / name)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        results = {}
        for mode in ("base", *MODES):
            cmd = [sys.executable, __file__, "--steps", str(opts.steps), "--rank", str(opts.rank), "--threads",
                   str(opts.threads), "--worker", mode, str(data), checkpoint, str(work / f"run-{mode}")]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{mode} worker failed:\n{done.stderr[-3000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(results[mode]), file=sys.stderr)
    base = results.pop("base")["dice"]
    full = results["full"]
    print(f"{opts.steps} steps, rank {opts.rank}, {opts.threads} threads; starting model mean Dice {base:.4f}")
    print(f"{'mode':<13} {'trainable':>12} {'s/step':>8} {'x full':>7} {'CPU s/step':>11} {'x full':>7} "
          f"{'peak RSS MB':>12} {'x full':>7} {'Dice after':>11} {'change':>8}")
    for mode, r in results.items():
        print(f"{mode:<13} {r['trainable']:>12,} {r['s_per_step']:>8.2f} {r['s_per_step'] / full['s_per_step']:>7.2f} "
              f"{r['cpu_s_per_step']:>11.2f} {r['cpu_s_per_step'] / full['cpu_s_per_step']:>7.2f} "
              f"{r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / full['peak_rss_mb']:>7.2f} {r['dice_after']:>11.4f} "
              f"{r['dice_after'] - base:>+8.4f}")


if __name__ == "__main__":
    main()
