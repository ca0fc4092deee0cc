"""Device and precision policy: ``auto`` picks cuda > mps > cpu; autocast dtypes for GPUs."""

from __future__ import annotations

import os

import torch

from text3dsam_cli.errors import UsageError

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

    ``auto`` means bf16 on CUDA devices that support it (else fp16) and fp32 on CPU/MPS.
    """
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "auto":
            return None
        raise UsageError(f"--precision {precision} needs a CUDA device (got {device.type})")
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def set_threads(threads: int | None) -> None:
    """Limit CPU threads used by torch (``--threads``); None or 0 leaves the default."""
    if threads:
        if threads < 0:
            raise UsageError("--threads must be positive")
        torch.set_num_threads(threads)
