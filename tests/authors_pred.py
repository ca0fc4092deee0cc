"""The authors' ``pred.py`` inference procedure, replayed through our model: the oracle for parity tests and the
baseline of ``benchmarks/bench_segment.py`` (test-only code, kept out of the library).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from text3dsam_cli.labels import label_dtype
from text3dsam_cli.model import Text3DSAM


def whole_volume_reference(model: Text3DSAM, image: np.ndarray, prompts: Sequence[str],
                           label_values: Sequence[int] | None = None) -> np.ndarray:
    """The authors' ``pred.py`` procedure, step for step, driven through our model (for tests/benchmarks).

    Re-encodes the image for every prompt, pads every prompt to 512 tokens, upsamples every prompt's logits
    to full resolution and keeps them all before the argmax: slow and memory-hungry on purpose.
    """
    values = list(label_values) if label_values is not None else list(range(1, len(prompts) + 1))
    x = F.interpolate(torch.as_tensor(image, dtype=torch.float32)[None, None],
                      size=tuple(model.config.image_size), mode="trilinear")
    probs = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = model.tokenizer(prompt, padding="max_length", truncation=True, max_length=512,
                                     return_tensors="pt")
            logits = model.generate(x, tokens["input_ids"], tokens["attention_mask"])
            logits = F.interpolate(logits, size=tuple(image.shape), mode="trilinear")
            probs.append(torch.sigmoid(logits)[0, 0])
        stacked = torch.stack(probs)
        background = (1.0 - stacked.max(0).values).clamp(0, 1)
        index = torch.argmax(torch.cat([background[None], stacked]), dim=0)
    labels = torch.zeros_like(index)
    for i, value in enumerate(values):
        labels[index == i + 1] = value
    return labels.numpy().astype(label_dtype(values))
