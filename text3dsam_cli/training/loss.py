"""The paper's loss: MONAI ``DiceFocalLoss`` (sigmoid) on the logits upsampled to the model input size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss


def build_loss(dice_weight: float = 1.0, focal_weight: float = 1.0) -> DiceFocalLoss:
    """Dice + focal loss on sigmoid probabilities, one binary target per sample (the authors' settings)."""
    return DiceFocalLoss(include_background=True, to_onehot_y=False, sigmoid=True,
                         lambda_dice=dice_weight, lambda_focal=focal_weight)


def segmentation_loss(loss_fn: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor,
                      size: Sequence[int] | None = None) -> torch.Tensor:
    """(B,1,d,h,w) low-resolution logits -> float32, trilinear (align_corners=False) to the target size -> loss."""
    size = tuple(int(s) for s in (size or target.shape[2:]))
    logits = F.interpolate(logits.float(), size=size, mode="trilinear", align_corners=False)
    return loss_fn(logits, target.float())
