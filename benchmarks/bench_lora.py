#!/usr/bin/env python3
"""LoRA and decoder-only fine-tuning against full fine-tuning, on the shared ultrasound case, in one run.

    python benchmarks/bench_lora.py [--steps 8] [--rank 8] [--threads 2] [--checkpoint DIR] [--interleaved N]

Each mode (full, lora, decoder-only) runs ``text3dsam_cli.training.finetune`` in its own worker process on
the same data (``US_Cardiac_patient0027_2CH_half_sequence``, gts beside, the small test checkpoint 64x128x128
unless ``--checkpoint``), same seed, same steps, ``--augment none``. Per mode: trainable parameters, median
seconds per step (train_log.jsonl, first step left out), median CPU seconds per step (the process's CPU time,
all threads, between progress events: the work done, less sensitive than wall time to other load on a
shared machine), the worker's peak RSS (``resource.getrusage
(RUSAGE_SELF).ru_maxrss`` after training, i.e. model + data + optimizer + autograd peak), and the mean Dice of
the saved model over the case's three classes on its full grid (``evaluate_dice``, as ``segment`` does), and
that of the starting model. Ratios are against full fine-tuning measured in the same run.

``--interleaved N`` instead times single optimizer steps (forward, loss, backward, AdamW) of the three modes
in one process, in turns, N rounds on one fixed input, and prints each round and the best (least disturbed)
of each mode with its ratio to full fine-tuning: on a shared machine the spread between runs of the same work
is larger than the differences between modes, and the best of interleaved turns is the steadier figure.

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


def _interleaved(checkpoint: str, rounds: int, rank: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from text3dsam_cli.model import load_model
    from text3dsam_cli.training.lora import LORA_EVAL_PARTS, add_lora
    from text3dsam_cli.training.loss import build_loss, segmentation_loss
    from text3dsam_cli.training.trainer import apply_freeze, set_train_mode

    models = {mode: load_model(checkpoint) for mode in MODES}
    add_lora(models["lora"], rank)
    apply_freeze(models["decoder-only"], ("decoder-only",))
    set_train_mode(models["full"], ())
    set_train_mode(models["lora"], (), LORA_EVAL_PARTS)
    set_train_mode(models["decoder-only"], ("decoder-only",))
    size = tuple(models["full"].config.image_size)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *size, generator=gen) * 255
    target = (torch.rand(1, 1, *size, generator=gen) > 0.9).float()
    tokens = models["full"].tokenizer(["left ventricle"], return_tensors="pt")
    loss_fn = build_loss(1.0, 1.0)
    optimizers = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-4)
                  for m in MODES}
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for index in range(rounds + 1):  # round 0 warms up (allocations, first-use costs) and is not counted
        for mode in MODES:
            r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            logits = models[mode](image, tokens["input_ids"], tokens["attention_mask"])
            segmentation_loss(loss_fn, logits, target, size).backward()
            optimizers[mode].step()
            optimizers[mode].zero_grad(set_to_none=True)
            r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - w0
            cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
            if index:
                times[mode].append((wall, cpu))
            print(f"round {index}{' (warm-up)' if not index else ''} {mode}: {wall:.2f} s wall, {cpu:.2f} s CPU",
                  file=sys.stderr, flush=True)
    best = {m: (min(w for w, _ in t), min(c for _, c in t)) for m, t in times.items()}
    print(f"best of {rounds} interleaved steps, rank {rank}, {threads} threads")
    print(f"{'mode':<13} {'s/step':>8} {'x full':>7} {'CPU s/step':>11} {'x full':>7}")
    for mode, (wall, cpu) in best.items():
        print(f"{mode:<13} {wall:>8.2f} {wall / best['full'][0]:>7.2f} {cpu:>11.2f} {cpu / best['full'][1]:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", help="checkpoint folder (default: build the shared small test checkpoint)")
    parser.add_argument("--interleaved", type=int, metavar="N", help="time N rounds of single steps, in turns")
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
        if opts.interleaved:
            _interleaved(checkpoint, opts.interleaved, opts.rank, opts.threads)
            return
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
