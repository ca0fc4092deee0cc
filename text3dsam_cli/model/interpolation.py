"""PyTorch's linear-interpolation source-index rule (``align_corners=False``), written once.

The decoder's line-set upsampling (:func:`interpolation_matrix`) and the upsampling to the input grid
(:mod:`text3dsam_cli.inference`) must reproduce ``F.interpolate(mode="trilinear")`` exactly, voxel for voxel;
both take their indices and weights from :func:`source_index`. ``tests/test_interpolation.py`` checks them
against ``torch.nn.functional.interpolate``.
"""

from __future__ import annotations

import torch


def source_index(in_size: int, out_size: int, device: torch.device | str | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis: the lower and upper source index of each output index and the upper one's weight.

    ATen's rule: ``scale = float32(in / out)``, ``src = max(0, scale * (dst + 0.5) - 0.5)`` rounded once to
    float32 (its CPU kernels are compiled with fused multiply-add, as are its CUDA kernels; computing in
    float64 and rounding once gives the same number), ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``,
    weight of ``i1`` = ``src - i0`` (that of ``i0`` is one minus it). Computed on the CPU (float64 is not
    available on every device), then moved to ``device``.
    """
    # device="cpu" explicitly: models are built under ``torch.device("meta")`` (see interpolation_matrix)
    scale = (torch.tensor(float(in_size), dtype=torch.float32, device="cpu") / out_size).double()
    src = ((torch.arange(out_size, dtype=torch.float64, device="cpu") + 0.5) * scale - 0.5).float().clamp_(min=0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    weight = src - i0
    return i0.to(device), i1.to(device), weight.to(device)


def interpolation_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) float32 matrix of 1-D linear interpolation (:func:`source_index`'s indices and weights).

    Built on the CPU explicitly: models are constructed on the meta device and then loaded with assign=True,
    which fills checkpoint tensors only; this derived (non-persistent) buffer must hold real numbers.
    """
    i0, i1, w1 = source_index(in_size, out_size, "cpu")
    w1 = w1.double()
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64, device="cpu")
    rows = torch.arange(out_size, device="cpu")
    matrix.index_put_((rows, i0), 1 - w1, accumulate=True)
    matrix.index_put_((rows, i1), w1, accumulate=True)
    return matrix.float()
