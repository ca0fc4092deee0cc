"""Device and precision policy: ``auto`` picks cuda > mps > cpu; autocast dtypes for GPUs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from text3dsam_cli.errors import UsageError
from text3dsam_cli.parallel import set_thread_budget

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str | None = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` -> an available ``torch.device``.

    ``auto`` picks ``cuda:$LOCAL_RANK`` when a launcher (torchrun, accelerate) sets ``LOCAL_RANK``.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            # one GPU per worker under torchrun / accelerate (LOCAL_RANK), else the current device
            local_rank = os.environ.get("LOCAL_RANK", "")
            if local_rank.isdigit():
                return torch.device("cuda", int(local_rank) % max(1, torch.cuda.device_count()))
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {spec!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} requested but CUDA is not available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("device 'mps' requested but MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {spec!r} (use auto, cpu, cuda, cuda:N or mps)")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: run in float32).

    ``auto`` is float32 on every device: on an H200 bf16 autocast did not make the model faster (29 vs 28 ms
    on the CT example) and changed 4-42 % of the voxels of the test checkpoint's label maps
    (docs/performance.md, GPU). ``bf16``/``fp16`` are there on request, on CUDA only.
    """
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision in ("fp32", "auto"):
        return None
    if device.type != "cuda":
        raise UsageError(f"--precision {precision} needs a CUDA device (got {device.type})")
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """CUDA float32 as IEEE float32: TF32 off for convolutions and matrix products for the duration.

    torch lets cuDNN convolutions use TF32 (10-bit mantissa) by default; float32 here means the precision the
    authors' CPU reference used.
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def set_threads(threads: int | None) -> None:
    """Limit the CPU threads of torch and of every parallel step of the pipeline (``--threads``); None or 0 leaves
    the defaults (torch's own, and the usable cores for the rest: ``parallel.thread_budget``)."""
    set_thread_budget(threads)  # refuses a negative count
    if threads:
        torch.set_num_threads(threads)
