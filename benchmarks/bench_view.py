#!/usr/bin/env python3
"""Per-prompt latency of ``text3dsam view``'s API on CPU, through the ASGI test client (JSON, legend included).

    python benchmarks/bench_view.py [--variant small|full] [--image CT.nii.gz] [--threads N]

Builds the shared deterministic checkpoint (../shared/reference), opens the CT example, then times, in one run:
the first request (image encoding + one prompt), each further request that adds one new prompt to the list
(the page sends every active prompt: one decode + the argmax over all), a request of prompts seen before
(no decoding at all), and the label-map download. Prints medians; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_segment import build_checkpoint  # noqa: E402

CT = ROOT.parent / "shared" / "data" / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
PROMPTS = ["liver", "spleen", "left kidney", "right kidney", "aorta", "pancreas", "stomach", "gallbladder",
           "portal vein", "urinary bladder", "esophagus"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="small", choices=["small", "full"])
    parser.add_argument("--image", default=str(CT))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from starlette.testclient import TestClient

    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.model import load_model
    from text3dsam_cli.view import ViewSession
    from text3dsam_cli.view.app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(build_checkpoint(Path(folder), args.variant))
    session = ViewSession.open(args.image, Segmenter(model, device="cpu", mode="whole"))
    client = TestClient(create_app(session), base_url="http://127.0.0.1")

    def post(prompts: list[str]) -> tuple[float, dict]:
        t0 = time.perf_counter()
        response = client.post("/api/segment", json={"prompts": prompts})
        response.raise_for_status()
        return time.perf_counter() - t0, response.json()["timings"]

    first, timings = post(PROMPTS[:1])
    print(f"{args.variant} checkpoint, {Path(args.image).name} {session.volume.shape} (z,y,x), "
          f"{torch.get_num_threads()} CPU threads")
    print(f"first request (encode + 1 prompt): {first:.3f} s  (encode {timings['encode']:.3f} s)")
    added, decode = [], []
    for k in range(2, len(PROMPTS) + 1):
        seconds, timings = post(PROMPTS[:k])
        added.append(seconds)
        decode.append(timings["decode"])
    print(f"request adding one new prompt ({len(added)} requests, 2..{len(PROMPTS)} prompts): median "
          f"{statistics.median(added):.3f} s (min {min(added):.3f}, max {max(added):.3f}); decoding alone "
          f"median {statistics.median(decode):.3f} s; {statistics.median(added) / first:.0%} of the first")
    seen = [post(PROMPTS[:3])[0] for _ in range(5)]
    print(f"request of 3 prompts seen before (no decoding): median {statistics.median(seen):.3f} s")
    t0 = time.perf_counter()
    size = len(client.get("/api/labels.nii.gz").content)
    print(f"label map download: {time.perf_counter() - t0:.3f} s ({size} bytes)")


if __name__ == "__main__":
    main()
