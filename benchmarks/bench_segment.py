#!/usr/bin/env python3
"""`segment` against the authors' inference procedure, on the real 15-class CT case, in one run.

    python benchmarks/bench_segment.py [--case CT_AMOS_amos_0018] [--checkpoint DIR] [--repeat 2]

Each procedure runs in its own worker process (so peak RSS is its own), with the `full` test checkpoint from
../shared/reference (same architecture and size as the published weights):

* baseline: the authors' `pred.py` procedure driven through our model (`whole_volume_reference`): re-encode
  the image per prompt, pad prompts to 512 tokens, upsample every prompt to full resolution, argmax at the end;
* ours: `Segmenter.segment`, what `text3dsam segment` runs (plus `text3dsam segment` end to end, CLI included);
* per-prompt cost: ours with 1 prompt vs all prompts.

Whole processes, as users run them (issue 8), each timed from the outside with its own peak RSS:

* the authors' procedure as a process: import transformers' BERT stack (as the authors' code does), load the
  model, read the case, run the procedure above, write the label map;
* `text3dsam segment CASE.npz` with a warm prompt-embedding store (the prompts stored by an earlier run) and
  with a cold one (an empty store: first use of the prompts);
* a plain script doing only the model's work, for reference: import torch, load the model, read the case,
  `Segmenter.segment` with the warm store (encode, decode, upsample), one step after the other; no argument
  parsing, quality report or output (and no reading while torch is imported, as `segment` does);
* `text3dsam --help`.

Prints wall times, ratios against the baseline measured in the same run, voxel agreement and peak RSS.
Targets (issue 8, CPU, 2 threads): warm >= 6x and cold >= 4x the authors' process, peak RSS <= 1.5 GB,
agreement >= 99.9 %, `--help` < 0.3 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHALLENGE = SHARED / "data" / "challenge"
sys.path.insert(0, str(ROOT / "tests"))  # authors_pred.py: the authors' procedure, shared with the parity tests


def build_checkpoint(out: Path, variant: str = "full") -> Path:
    """The shared deterministic checkpoint, written with ../shared/reference/make_test_checkpoint.py."""
    ref = SHARED / "reference"
    sys.path.insert(0, str(ref))
    spec = importlib.util.spec_from_file_location("make_test_checkpoint", ref / "make_test_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(str(out), variant)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, checkpoint: str, case: str, repeat: int, out: str) -> None:
    """Run one procedure `repeat` times; write timings, peak RSS and the label map."""
    import numpy as np
    from authors_pred import whole_volume_reference

    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.io import read_challenge_npz
    from text3dsam_cli.model import load_model
    from text3dsam_cli.prompts import prompts_for

    model = load_model(checkpoint)
    volume = read_challenge_npz(CHALLENGE / f"{case}.npz")
    prompts, values, _ = prompts_for(volume, [])
    image = volume.array.astype(np.float32)
    times: dict[str, list[float]] = {}
    labels = None
    for _ in range(repeat):
        if kind == "baseline":
            t = time.perf_counter()
            labels = whole_volume_reference(model, image, prompts, values)
            times.setdefault("all_prompts", []).append(time.perf_counter() - t)
        else:
            segmenter = Segmenter(model, device="cpu")
            t = time.perf_counter()
            labels = segmenter.segment(image, prompts, values).labels
            times.setdefault("all_prompts", []).append(time.perf_counter() - t)
            segmenter = Segmenter(model, device="cpu")
            t = time.perf_counter()
            segmenter.segment(image, prompts[:1], values[:1])
            times.setdefault("one_prompt", []).append(time.perf_counter() - t)
    np.save(out + ".npy", labels)
    with open(out, "w") as f:
        json.dump({"times": times, "rss_mb": peak_rss_mb(), "prompts": len(prompts)}, f)


def whole_process(args: list[str], tmp: Path, env: dict[str, str] | None = None) -> dict:
    """Wall time (from the outside) and peak RSS (the kernel's, from ``wait4``) of one whole Python process.

    ``args``: ``["module", name, *argv]`` runs ``python -m name``, ``["path", script, *argv]`` a script.
    """
    kind, target, *rest = args
    command = [sys.executable, "-m", target, *rest] if kind == "module" else [sys.executable, target, *rest]
    with tempfile.TemporaryFile(dir=tmp) as err:
        t = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"failed: {' '.join(args)}\n{err.read().decode(errors='replace')[-3000:]}")
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024}


def authors_process(checkpoint: str, case: str, out: str, threads: int) -> None:
    """The authors' procedure as one process: their imports (transformers' BERT), load, read, predict, write."""
    import torch
    from transformers import BertModel, BertTokenizer  # noqa: F401  (what the authors' pred.py imports)

    torch.set_num_threads(threads)
    import numpy as np
    from authors_pred import whole_volume_reference

    from text3dsam_cli.io import read_challenge_npz
    from text3dsam_cli.model import load_model
    from text3dsam_cli.pipeline import prompts_for

    model = load_model(checkpoint)
    volume = read_challenge_npz(CHALLENGE / f"{case}.npz")
    prompts, values, _ = prompts_for(volume, [])
    labels = whole_volume_reference(model, volume.array.astype(np.float32), prompts, values)
    np.savez_compressed(out, segs=labels)


def model_only_process(checkpoint: str, case: str, threads: int) -> None:
    """A plain script doing only the model's work, one step after the other (a reference for ours)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.io import read_challenge_npz
    from text3dsam_cli.model import load_model
    from text3dsam_cli.prompts import prompts_for

    segmenter = Segmenter(load_model(checkpoint), device="cpu")
    volume = read_challenge_npz(CHALLENGE / f"{case}.npz")
    prompts, values, _ = prompts_for(volume, [])
    segmenter.segment([volume.array.astype(np.float32)], prompts, values)
    sys.stdout.flush()
    os._exit(0)  # as `text3dsam` ends (no interpreter teardown)


def run_whole_processes(checkpoint: Path, case: str, repeat: int, threads: int, tmp: Path) -> dict:
    """Authors' process, ours warm and cold, interleaved so that all see the same machine load; --help."""
    import numpy as np

    base_env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    warm_env = {**base_env, "TEXT3DSAM_CACHE": str(tmp / "warm-cache")}
    ours = ["module", "text3dsam_cli", "segment", str(CHALLENGE / f"{case}.npz"), "-m", str(checkpoint),
            "--device", "cpu", "--threads", str(threads), "-q"]
    whole_process([*ours, "-o", str(tmp / "warmup.npz")], tmp, warm_env)  # stores the case's prompts
    results: dict[str, list[dict]] = {"authors": [], "warm": [], "cold": [], "model_only": [], "help": []}
    for i in range(repeat):
        results["authors"].append(whole_process(
            ["path", __file__, "--authors-process", str(checkpoint), case, str(tmp / "authors.npz"),
             "--threads", str(threads)], tmp, base_env))
        results["warm"].append(whole_process([*ours, "-o", str(tmp / "warm.npz")], tmp, warm_env))
        cold_env = {**base_env, "TEXT3DSAM_CACHE": str(tmp / f"cold-cache-{i}")}  # empty: first use
        results["cold"].append(whole_process([*ours, "-o", str(tmp / "cold.npz")], tmp, cold_env))
        results["model_only"].append(whole_process(
            ["path", __file__, "--model-only-process", str(checkpoint), case, "--threads", str(threads)], tmp,
            warm_env))
    for _ in range(max(3, repeat)):
        results["help"].append(whole_process(["module", "text3dsam_cli", "--help"], tmp, base_env))
    authors = np.load(tmp / "authors.npz")["segs"]
    results["agreement_warm"] = float((np.load(tmp / "warm.npz")["segs"] == authors).mean())
    results["agreement_cold"] = float((np.load(tmp / "cold.npz")["segs"] == authors).mean())
    return results


def run_worker(kind: str, checkpoint: Path, case: str, repeat: int, tmp: Path) -> dict:
    out = tmp / f"{kind}.json"
    subprocess.run([sys.executable, __file__, "--worker", kind, "--checkpoint", str(checkpoint), "--case", case,
                    "--repeat", str(repeat), "--out", str(out)], check=True)
    result = json.loads(out.read_text())
    result["labels_path"] = str(out) + ".npy"
    return result


def run_cli(checkpoint: Path, case: str, tmp: Path) -> dict:
    """`text3dsam segment` end to end (process start, model load, read, segment, write)."""
    out = tmp / "cli"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "text3dsam_cli", "segment", str(CHALLENGE / f"{case}.npz"),
                           "-m", str(checkpoint), "-o", str(out), "--quiet", "--device", "cpu"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return {"seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="CT_AMOS_amos_0018")
    ap.add_argument("--checkpoint", help="checkpoint folder (default: build the shared `full` one)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per procedure; the best is reported")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the whole-process runs")
    ap.add_argument("--only-processes", action="store_true", help="only the whole-process comparison")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--authors-process", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--model-only-process", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint, args.case, args.repeat, args.out)
        return
    if args.authors_process:
        authors_process(*args.authors_process, args.threads)
        return
    if args.model_only_process:
        model_only_process(*args.model_only_process, args.threads)
        return
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(tmp / "ckpt")
        processes = run_whole_processes(checkpoint, args.case, args.repeat, args.threads, tmp)
        print_processes(processes, args)
        if args.only_processes:
            return
        base = run_worker("baseline", checkpoint, args.case, args.repeat, tmp)
        ours = run_worker("ours", checkpoint, args.case, args.repeat, tmp)
        cli = run_cli(checkpoint, args.case, tmp)
        agreement = float((np.load(base["labels_path"]) == np.load(ours["labels_path"])).mean())
    t_base = min(base["times"]["all_prompts"])
    t_ours = min(ours["times"]["all_prompts"])
    t_one = min(ours["times"]["one_prompt"])
    k = ours["prompts"]
    per_prompt = (t_ours - t_one) / max(1, k - 1)
    rows = [
        ("case", args.case),
        ("machine", f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"),
        ("prompts", k),
        ("authors' procedure (s)", f"{t_base:.2f}"),
        ("ours, Segmenter.segment (s)", f"{t_ours:.2f}"),
        ("speed-up", f"{t_base / t_ours:.1f}x"),
        ("ours, one prompt (s)", f"{t_one:.2f}"),
        ("each extra prompt / one full forward", f"{per_prompt / t_one:.1%}"),
        ("text3dsam segment end to end (s)", f"{cli['seconds']:.2f}"),
        ("voxel agreement ours vs authors' procedure", f"{agreement:.6%}"),
        ("peak RSS authors' procedure (MB)", f"{base['rss_mb']:.0f}"),
        ("peak RSS ours (MB)", f"{ours['rss_mb']:.0f}"),
        ("peak RSS ours / authors'", f"{ours['rss_mb'] / base['rss_mb']:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")




def print_processes(results: dict, args: argparse.Namespace) -> None:
    """The whole-process table: seconds, ratio against the authors' process, peak RSS, agreement."""
    best = {k: min(results[k], key=lambda r: r["seconds"]) for k in ("authors", "warm", "cold", "model_only", "help")}
    authors = best["authors"]["seconds"]
    rows = [
        ("case / threads", f"{args.case} / {args.threads}"),
        ("authors' procedure, whole process (s)", f"{authors:.2f}"),
        ("ours warm store, whole process (s)", f"{best['warm']['seconds']:.2f}"),
        ("  speed-up (target >= 6x)", f"{authors / best['warm']['seconds']:.2f}x"),
        ("ours cold store, whole process (s)", f"{best['cold']['seconds']:.2f}"),
        ("  speed-up (target >= 4x)", f"{authors / best['cold']['seconds']:.2f}x"),
        ("plain script, the model's work only, whole process (s)", f"{best['model_only']['seconds']:.2f}"),
        ("  speed-up", f"{authors / best['model_only']['seconds']:.2f}x"),
        ("  ours warm minus the plain script (s)",
         f"{best['warm']['seconds'] - best['model_only']['seconds']:.2f}"),
        ("peak RSS authors' process (MB)", f"{max(r['rss_mb'] for r in results['authors']):.0f}"),
        ("peak RSS ours warm / cold (MB) (target <= 1536)",
         f"{max(r['rss_mb'] for r in results['warm']):.0f} / {max(r['rss_mb'] for r in results['cold']):.0f}"),
        ("agreement with the authors' process, warm / cold (target >= 99.9 %)",
         f"{results['agreement_warm']:.5%} / {results['agreement_cold']:.5%}"),
        ("text3dsam --help, whole process (s) (target < 0.3)", f"{best['help']['seconds']:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()


if __name__ == "__main__":
    main()
