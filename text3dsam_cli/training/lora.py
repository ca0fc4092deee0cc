"""Parameter-efficient fine-tuning: LoRA adapters (``--lora-rank``) through the ``peft`` library.

:func:`add_lora` puts rank-``r`` adapters (``W x + (alpha / r) B A x``, ``B`` zero at the start, so training
begins at the base model exactly) beside the linear layers named by :func:`default_lora_targets`: every
attention and MLP linear layer of the image encoder (``attn.qkv``, ``attn.proj``, ``mlp.mlp.0`` /
``mlp.mlp.3`` of the conv blocks, ``mlp1.mlp.0`` / ``mlp1.mlp.3`` of the attention blocks) and of the mask
decoder's two-way transformer (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``mlp.lin1``, ``mlp.lin2``).
Only the adapters train; everything else is frozen, and the whole model stays in eval mode (BatchNorm
statistics are the base model's, no dropout), so the merged model differs from the base only in the adapted
weights.

The model is changed in place (peft's ``LoraModel`` replaces the target layers), so the trainer, ``accelerate``
and its checkpoints see one ``Text3DSAM`` whose state dict holds the adapters. :func:`merge_lora` folds them
into the weights (``W + (alpha / r) B A``) and restores plain ``nn.Linear`` layers: the saved model is an
ordinary checkpoint, loadable by ``load_model`` / ``segment --model`` without peft.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from text3dsam_cli.errors import UsageError

MISSING_PEFT = "--lora-rank needs the peft library: pip install 'text3dsam-cli[lora]'"
#: Parts of the model whose linear layers get adapters by default.
LORA_PARTS = ("image_encoder", "seg_decoder.mask_decoder.transformer")
#: Parts kept in eval mode while adapters train: all of them (the base model's BatchNorm statistics, in the
#: image encoder and the decoder's prompt encoder, stay as they are; no dropout).
LORA_EVAL_PARTS = ("image_encoder", "text_encoder", "text_projector", "seg_decoder")


def default_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the linear layers of :data:`LORA_PARTS` (attention and MLP layers)."""
    names = []
    for part in LORA_PARTS:
        module = model.get_submodule(part)
        names.extend(f"{part}.{name}" for name, sub in module.named_modules() if isinstance(sub, nn.Linear))
    return names


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None,
             dropout: float = 0.0) -> Any:
    """Insert LoRA adapters into ``model`` in place; returns peft's ``LoraModel`` (for :func:`merge_lora`).

    ``alpha`` defaults to ``rank`` (scale 1). ``targets`` are module names or name suffixes (peft's
    ``target_modules``); default :func:`default_lora_targets`. Only adapter parameters stay trainable.
    """
    if rank < 1:
        raise UsageError("--lora-rank must be at least 1")
    try:
        from peft import LoraConfig, LoraModel
    except ImportError:
        raise UsageError(MISSING_PEFT) from None
    names = list(targets) if targets else default_lora_targets(model)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=dropout,
                        target_modules=names, bias="none")
    try:
        return LoraModel(model, config, "default")
    except ValueError as exc:  # e.g. a target that names no module
        raise UsageError(f"LoRA: {exc}") from None


def merge_lora(tuner: Any) -> nn.Module:
    """Fold the adapters into the base weights and remove them (in place); returns the plain model."""
    return tuner.merge_and_unload()


def merged_copy(tuner: Any) -> nn.Module:
    """A plain model with the adapters folded in, leaving ``tuner``'s model (still training) as it is: what the
    best model so far is saved as while training goes on."""
    return copy.deepcopy(tuner).merge_and_unload()


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA adapters."""
    return any("lora_" in name for name, _ in model.named_parameters())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
