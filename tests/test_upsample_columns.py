"""The column path of the upsampling gives the dense path's labels, whatever axis it runs along."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text3dsam_cli import upsampling
from text3dsam_cli.upsampling import (
    COLUMN_PROMPTS,
    SATURATION_HIGH,
    upsample_argmax,
    upsample_argmax_columns,
    upsample_argmax_dense,
)


def _logits(k: int, grid: tuple[int, int, int], seed: int, scale: float, smooth: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if not smooth:  # noise: the winner changes inside most cells, like the deterministic test checkpoints
        return torch.randn(k, *grid, generator=gen) * scale + scale / 2
    coarse = torch.randn(1, k, 3, 3, 3, generator=gen) * scale
    return torch.nn.functional.interpolate(coarse, size=grid, mode="trilinear", align_corners=False)[0]


def _hard_cases(seed: int, smooth: bool) -> torch.Tensor:
    base = _logits(5, (5, 6, 4), seed, 12.0, smooth)
    # saturated copies (float32 ties go to the earlier prompt), near-duplicates, exact duplicates, background
    return torch.cat([base, base[:2] + 30.0, base[2:4] + 1e-3, base[1:2], base[:1] - 40.0])


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(41, 13, 9), (9, 40, 11), (7, 10, 33)])  # each axis the most upsampled
def test_columns_equal_dense(seed, smooth, shape):
    logits = _hard_cases(seed, smooth)
    values = list(range(1, logits.shape[0] + 1))
    dense, _ = upsample_argmax_dense(logits, shape, values)
    columns = upsample_argmax_columns(logits, shape, values, chunk_voxels=700)
    assert columns.dtype == dense.dtype and columns.shape == dense.shape
    # the column path interpolates in another order: an exact float32 tie may round the other way
    assert (columns != dense).sum() <= max(1, dense.size // 100000)
    assert len(np.unique(dense)) > 3  # a non-trivial case


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_columns_along_any_axis_agree(axis):
    logits = _logits(6, (4, 5, 6), 3, 8.0, smooth=False)
    values = list(range(1, 7))
    dense, _ = upsample_argmax_dense(logits, (30, 31, 32), values)
    columns = upsample_argmax_columns(logits, (30, 31, 32), values, axis=axis)
    assert (columns != dense).sum() <= 1


def test_columns_keep_tie_background_and_label_values():
    labels = upsample_argmax_columns(torch.full((2, 2, 2, 2), 30.0), (12, 4, 4), [1, 2])
    assert (labels == 1).all()  # both saturate to probability 1.0: the earlier prompt
    labels = upsample_argmax_columns(torch.zeros(1, 2, 2, 2), (12, 4, 4), [1])
    assert (labels == 0).all()  # probability exactly 0.5: background
    logits = _logits(3, (3, 4, 4), 5, 10.0, smooth=False)
    for values in ([300, 7, 70000], [5, 3, 9]):
        dense, _ = upsample_argmax_dense(logits, (20, 9, 8), values)
        columns = upsample_argmax_columns(logits, (20, 9, 8), values)
        assert columns.dtype == dense.dtype and (columns == dense).all()


def test_columns_decide_saturated_winners_exactly():
    # prompt 1 saturates everywhere, prompt 0 (earlier) never reaches probability 1.0; later prompts tie at 1.0
    grid = (4, 3, 3)
    logits = torch.stack([torch.full(grid, 15.0), torch.full(grid, SATURATION_HIGH + 1), torch.full(grid, 40.0)])
    labels = upsample_argmax_columns(logits, (20, 5, 5), [1, 2, 3])
    assert (labels == 2).all()


def test_columns_refuse_more_prompts_than_one_key_ranks():
    with pytest.raises(ValueError, match="at most"):
        upsample_argmax_columns(torch.zeros(COLUMN_PROMPTS + 1, 2, 2, 2), (8, 2, 2), list(range(1, COLUMN_PROMPTS + 2)))


def test_upsample_argmax_picks_columns_for_noisy_logits_on_a_long_axis(monkeypatch):
    calls = []
    real = upsampling.upsample_argmax_columns

    def spy(*args, **kwargs):
        calls.append(tuple(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(upsampling, "upsample_argmax_columns", spy)
    logits = _logits(8, (4, 6, 6), 0, 10.0, smooth=False)
    values = list(range(1, 9))
    labels, _ = upsample_argmax(logits, (40, 24, 24), values)  # noise: the cell path would lose
    assert calls == [(40, 24, 24)]
    dense, _ = upsample_argmax_dense(logits, (40, 24, 24), values)
    assert (labels != dense).sum() <= 1
    upsample_argmax(logits, (6, 9, 9), values)  # no axis upsampled COLUMN_MIN_FACTOR times: dense
    assert len(calls) == 1
