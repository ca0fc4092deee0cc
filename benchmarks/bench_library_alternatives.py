#!/usr/bin/env python3
"""Three hand-written pieces against the maintained library call that could replace them (issue 10), one run.

    python benchmarks/bench_library_alternatives.py [--checkpoint DIR] [--repeat 3] [--only sliding,bn,check]

Uses the `small` test checkpoint from ../shared/reference (built in a temp dir unless --checkpoint is given):

* sliding: our window loop + Gaussian blending (`Segmenter._window_contexts` / `_sliding_logits`) against
  `monai.inferers.sliding_window_inference` with a predictor returning 1/4-resolution logits, once with MONAI's
  own importance map (its full-resolution Gaussian, nearest-resized to the output) and once with our low-resolution
  Gaussian passed through `process_fn`. Same model, image, prompts and windows; needs `pip install monai`.
* bn: BatchNorm folded into each decomposed convolution on every forward (ours) against
  `torch.nn.utils.fusion.fuse_conv_bn_eval` once, on a copy of the model: logits of the reference vectors
  (``vectors_small.npz``; tolerance 1e-3 absolute) and encode/decode time.
* check: `check_state_dict` then `load_state_dict(strict=True, assign=True)` (the former `load_model`) against
  the strict load alone with `check_state_dict` called only to word a refusal (`load_model` now), on a meta-device
  skeleton: time, and the message each gives for a checkpoint with a missing and a mis-shaped tensor.

Times are the median of ``--repeat`` interleaved runs (baseline, alternative, baseline, ...), so both see the
same machine load; printed with the ratio alternative / ours.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segment import CHALLENGE, SHARED, build_checkpoint  # noqa: E402  (one checkpoint recipe)

CASE = "CT_AMOS_amos_0018"
PROMPTS = ["liver", "spleen", "left kidney"]


def interleaved(functions: dict[str, callable], repeat: int) -> dict[str, float]:
    """Median seconds of each function, run in turns (after one untimed warm-up run of each)."""
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            t = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - t)
    for name, values in times.items():
        print(f"    {name}: " + ", ".join(f"{v:.3f}" for v in values))
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, times: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    for name, seconds in times.items():
        print(f"  {name:<44} {seconds:8.3f} s   x{seconds / times[baseline]:.3f} vs {baseline}")


def bench_sliding(model, repeat: int, shape: tuple[int, int, int]) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from text3dsam_cli.inference import Segmenter, gaussian_weights
    from text3dsam_cli.io import read_challenge_npz
    from text3dsam_cli.pipeline import prepare_scan

    scan = prepare_scan(read_challenge_npz(CHALLENGE / f"{CASE}.npz"))
    image = F.interpolate(torch.from_numpy(np.ascontiguousarray(scan.image))[None, None], size=shape,
                          mode="trilinear", align_corners=False)[0, 0].numpy()
    seg = Segmenter(model, device="cpu", mode="sliding", overlap=0.5, sw_batch_size=1, embedding_cache=False)
    text = seg.embed_prompts(PROMPTS)
    plan = seg._sliding_plan(shape, None)
    window = plan["window"]
    print(f"\nsliding: image {shape}, window {window}, {len(plan['positions'])} windows, {len(PROMPTS)} prompts")

    def ours() -> torch.Tensor:
        tensor = torch.from_numpy(image)
        return seg._sliding_logits(seg._window_contexts(tensor, plan), plan, text)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            features = model.image_encoder(windows)
            out = []
            for i in range(windows.shape[0]):
                ctx = model.seg_decoder.prepare([f[i : i + 1] for f in features])
                out.append(seg._decode(ctx, text)[None])
        return torch.cat(out)

    low_gauss = gaussian_weights([w // 4 for w in window])[None, None]

    def with_our_gaussian(seg_tuple, win_data, importance):
        return seg_tuple, low_gauss

    def monai_run(process_fn=None) -> torch.Tensor:
        with torch.inference_mode():
            x = torch.from_numpy(image)[None, None]
            out = sliding_window_inference(x, window, 1, predictor, overlap=0.5, mode="gaussian",
                                           sigma_scale=0.125, process_fn=process_fn)
        return out[0]

    a, b, c = ours(), monai_run(), monai_run(with_our_gaussian)

    def agreement(x: torch.Tensor, y: torch.Tensor) -> str:
        px, py = torch.sigmoid(x), torch.sigmoid(y)
        lx = torch.where(px.max(0).values > 0.5, px.argmax(0) + 1, 0)
        ly = torch.where(py.max(0).values > 0.5, py.argmax(0) + 1, 0)
        return (f"max |logit diff| {float((x - y).abs().max()):.3g}, max |prob diff| {float((px - py).abs().max()):.3g}"
                f", low-res label agreement {float((lx == ly).float().mean()) * 100:.3f} %")

    print(f"  MONAI (its Gaussian) vs ours:  shape {tuple(b.shape)} vs {tuple(a.shape)}; {agreement(a, b)}")
    print(f"  MONAI (our Gaussian) vs ours:  {agreement(a, c)}")
    times = interleaved({"ours (Segmenter sliding)": ours, "MONAI sliding_window_inference": monai_run,
                         "MONAI + our Gaussian (process_fn)": lambda: monai_run(with_our_gaussian)}, repeat)
    report("sliding: encode + decode + blend, all windows", times, "ours (Segmenter sliding)")


def fused_copy(model):
    """A copy whose decomposed convolutions carry BatchNorm folded in by fuse_conv_bn_eval (BatchNorm -> Identity)."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from text3dsam_cli.model.image_encoder import DecomposedConv3d

    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, DecomposedConv3d):
            for name in ("c1", "c2", "c3"):
                branch = getattr(module, name)
                if isinstance(branch[1], nn.BatchNorm3d):
                    setattr(module, name, nn.Sequential(fuse_conv_bn_eval(branch[0], branch[1]), nn.Identity()))
    return fused


def bench_bn(model, repeat: int) -> None:
    import numpy as np
    import torch

    vectors = np.load(SHARED / "reference" / "vectors_small.npz")
    image = torch.from_numpy(vectors["image"].astype(np.float32))[None, None]
    fused = fused_copy(model)
    t = time.perf_counter()
    fused_copy(model)
    fuse_seconds = time.perf_counter() - t
    print(f"\nbn: fusing a copy of the small model takes {fuse_seconds:.3f} s (deep copy included)")
    for name, m in (("ours (fold every forward)", model), ("fuse_conv_bn_eval once", fused)):
        worst = 0.0
        with torch.inference_mode():
            for i in (0, 1):
                ids = torch.from_numpy(vectors[f"input_ids_{i}"]).long()
                mask = torch.from_numpy(vectors[f"attention_mask_{i}"]).long()
                logits = m.generate(image, ids, mask)
                worst = max(worst, float((logits - torch.from_numpy(vectors[f"logits_{i}"])).abs().max()))
        print(f"  {name:<28} max |logits - reference| = {worst:.3g} (tolerance 1e-3)")
    with torch.inference_mode():
        diff = max(float((a - b).abs().max()) for a, b in zip(model.image_encoder(image), fused.image_encoder(image)))
    print(f"  image-encoder features, fused vs ours: max |diff| {diff:.3g}")
    text = model.encode_prompts(PROMPTS).detach()
    folds = [m for m in model.modules() if type(m).__name__ == "DecomposedConv3d"]

    def fold_all() -> None:
        with torch.inference_mode():
            for module in folds:
                for branch in (module.c1, module.c2, module.c3):
                    conv, norm = branch[0], branch[1]
                    if isinstance(norm, torch.nn.BatchNorm3d):
                        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
                        conv.weight * scale.view(-1, 1, 1, 1, 1)
                        (conv.bias - norm.running_mean) * scale + norm.bias

    fold = interleaved({"fold": fold_all}, max(5, repeat))["fold"]
    print(f"  folding every BatchNorm of the model once ({len(folds)} decomposed convolutions): {fold * 1e3:.2f} ms")
    ctx_a = model.encode_image(image)
    ctx_b = fused.encode_image(image)

    def encode(m):
        def go():
            with torch.inference_mode():
                m.image_encoder(image)
        return go

    def decode(m, ctx):
        def go():
            with torch.inference_mode():
                m.decode(ctx, text)
        return go

    times = interleaved({"ours (fold every forward)": encode(model), "fuse_conv_bn_eval once": encode(fused)},
                        repeat * 3)
    report("bn: image encoder (small model, 64x128x128)", times, "ours (fold every forward)")
    times = interleaved({"ours (fold every forward)": decode(model, ctx_a),
                         "fuse_conv_bn_eval once": decode(fused, ctx_b)}, repeat * 3)
    report(f"bn: decode of {len(PROMPTS)} prompts (2 refinement passes)", times, "ours (fold every forward)")


def bench_check(checkpoint: Path, repeat: int) -> None:
    import torch

    from text3dsam_cli.errors import CheckpointError
    from text3dsam_cli.model.loading import (
        check_state_dict,
        read_config,
        read_state_dict,
        resolve_text_config,
        skeleton_construction,
    )
    from text3dsam_cli.model.text3dsam import Text3DSAM

    config = read_config(checkpoint)
    tensors = read_state_dict(checkpoint)
    config.text_config = resolve_text_config(config, tensors)

    def skeleton():
        with skeleton_construction():
            return Text3DSAM(config)

    def ours() -> None:
        model = skeleton()
        check_state_dict(model, tensors, checkpoint)
        model.load_state_dict(tensors, strict=True, assign=True)

    def torch_only() -> None:
        model = skeleton()
        try:
            model.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            check_state_dict(model, tensors, checkpoint)
            raise CheckpointError(str(exc), checkpoint) from exc

    def check_alone() -> None:
        check_state_dict(skeleton(), tensors, checkpoint)

    times = interleaved({"ours: check_state_dict + strict load": ours, "strict load, check on failure": torch_only,
                         "skeleton + check_state_dict only": check_alone, "skeleton only": skeleton}, repeat * 5)
    report("check: build a meta skeleton and load the small checkpoint's tensors", times,
           "ours: check_state_dict + strict load")
    broken = dict(tensors)
    broken.pop("seg_decoder.mask_decoder.feat_conv0.bias")
    broken["seg_decoder.mask_decoder.feat_conv1.weight"] = torch.zeros(3)
    for name, function in (("ours", lambda: check_state_dict(skeleton(), broken, checkpoint)),
                           ("torch", lambda: skeleton().load_state_dict(broken, strict=True, assign=True))):
        try:
            function()
        except (CheckpointError, RuntimeError) as exc:
            text = str(exc)
            print(f"  {name} message ({len(text.splitlines())} lines, {len(text)} chars): {text[:300]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="sliding,bn,check")
    parser.add_argument("--sliding-shape", default="64,192,160",
                        help="image size (z,y,x), >= the small model's 64x128x128 window, multiples of 4")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from text3dsam_cli.model import load_model

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or build_checkpoint(Path(tmp) / "small", "small")
        model = load_model(checkpoint)
        only = args.only.split(",")
        print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeat} interleaved runs")
        if "check" in only:
            bench_check(checkpoint, args.repeat)
        if "bn" in only:
            bench_bn(model, args.repeat)
        if "sliding" in only:
            bench_sliding(model, args.repeat, tuple(int(v) for v in args.sliding_shape.split(",")))


if __name__ == "__main__":
    main()
