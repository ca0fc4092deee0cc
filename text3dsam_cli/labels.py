"""The one label-map dtype rule, shared by inference (the label map it returns) and the writers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def label_dtype(labels: np.ndarray | Sequence[int]) -> np.dtype:
    """Smallest unsigned dtype holding every value of a label map or a list of label values: uint8 up to 255,
    uint16 up to 65535, else uint32."""
    array = np.asarray(labels)
    top = int(array.max()) if array.size else 0
    if top <= 255:
        return np.dtype(np.uint8)
    if top <= 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)
