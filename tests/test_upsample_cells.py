"""Cell-decided upsampling equals the exact running argmax; CUDA out-of-memory falls back for one image only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text3dsam_cli.inference import Segmenter
from text3dsam_cli.upsampling import (
    SATURATION_HIGH,
    SATURATION_LOW,
    live_prompts,
    upsample_argmax,
    upsample_argmax_dense,
)


def _smooth_logits(k: int, seed: int, scale: float = 12.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, k, 3, 4, 4, generator=gen) * scale
    return torch.nn.functional.interpolate(coarse, size=(8, 12, 10), mode="trilinear", align_corners=False)[0]


def test_float32_saturation_constants_hold_on_this_device():
    assert torch.sigmoid(torch.tensor([SATURATION_HIGH, 40.0, 100.0])).eq(1.0).all()
    assert torch.sigmoid(torch.linspace(-5, SATURATION_LOW, 10001)).lt(1.0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(20, 37, 33), (8, 12, 10), (5, 7, 9)])
def test_cells_equal_dense_running_argmax(seed, shape):
    base = _smooth_logits(5, seed)
    # saturated copies (float32 ties resolved to the earlier prompt), near-duplicates and a background prompt
    logits = torch.cat([base, base[:2] + 30.0, base[2:4] + 1e-3, base[:1] - 40.0])
    values = list(range(1, logits.shape[0] + 1))
    dense, _ = upsample_argmax_dense(logits, shape, values)
    cells, _ = upsample_argmax(logits, shape, values, force_cells=True, chunk_voxels=500)
    assert cells.dtype == dense.dtype
    assert (cells != dense).sum() <= max(1, dense.size // 100000)  # float rounding may flip an exact tie
    assert len(np.unique(dense)) > 4  # a non-trivial case


def test_dead_prompts_cannot_win():
    logits = _smooth_logits(6, 7)
    logits[3] += 50.0  # saturated everywhere: later prompts lose every tie, earlier ones may still win
    live, _ = live_prompts(logits)
    assert not live[4:].any()
    dense, _ = upsample_argmax_dense(logits, (16, 24, 20), list(range(1, 7)))
    assert set(np.unique(dense)) <= {0, 1, 2, 3, 4}


def test_cell_path_keeps_tie_and_background_rules():
    labels, _ = upsample_argmax(torch.full((2, 2, 2, 2), 30.0), (4, 4, 4), [1, 2], force_cells=True)
    assert (labels == 1).all()
    labels, _ = upsample_argmax(torch.zeros(1, 2, 2, 2), (4, 4, 4), [1], force_cells=True)
    assert (labels == 0).all()
    labels, _ = upsample_argmax(torch.ones(1, 2, 2, 2), (3, 3, 3), [300], force_cells=True)
    assert labels.dtype == np.uint16 and (labels == 300).all()


def test_cuda_oom_retries_one_image_on_cpu_then_returns(small_model, monkeypatch):
    segmenter = Segmenter(small_model, device="cpu")
    segmenter.device = torch.device("cuda")  # pretend: the model stays where it is (.to is patched below)
    moves = []
    monkeypatch.setattr(type(small_model), "to", lambda self, device: moves.append(str(device)) or self)
    calls = {"n": 0}
    original = segmenter._segment

    def flaky(image, prompts, *args):
        calls["n"] += 1
        if segmenter.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(image, prompts, *args)

    monkeypatch.setattr(segmenter, "_segment", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    image = np.random.default_rng(0).uniform(0, 255, (20, 40, 40)).astype(np.float32)
    result = segmenter.segment(image, ["liver"])
    assert result.labels.shape == image.shape
    assert moves == ["cpu", "cuda"]  # retried on the CPU, then back to the GPU
    assert segmenter.device.type == "cuda" and segmenter.prompt_batch_size == 4 and not segmenter._prompt_cache


def _authors_rule(logits: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """pred.py's rule in plain torch: trilinear logits, float32 sigmoid, strict running maximum, background last."""
    probs = torch.sigmoid(torch.nn.functional.interpolate(logits[None], size=shape, mode="trilinear",
                                                          align_corners=False)[0])
    best = torch.zeros(shape)
    index = torch.zeros(shape, dtype=torch.int64)
    for j in range(probs.shape[0]):
        better = probs[j] > best
        best = torch.where(better, probs[j], best)
        index[better] = j + 1
    index[(1 - best) >= best] = 0
    return index.numpy()


def test_dense_path_beyond_one_int32_key_group_keeps_first_prompt_ties():
    """More prompts than one packed key holds (127): groups carry the running best, saturated ties stay first."""
    gen = torch.Generator().manual_seed(3)
    k = 140
    logits = torch.randn(k, 3, 4, 4, generator=gen) * 6
    logits[:5] = logits[:5].clamp(max=10.0)  # earlier prompts stay below saturation
    logits[5] = 40.0  # saturated everywhere ...
    logits[130] = 40.0  # ... and again in the second group: prompt 6 must keep every voxel
    shape = (5, 9, 7)
    labels, probs = upsample_argmax_dense(logits, shape, list(range(1, k + 1)), keep_probabilities=True,
                                          chunk_voxels=300)
    assert labels.dtype == np.uint8 and (labels == 6).all()
    logits[5] = logits[130] = -40.0
    labels, probs = upsample_argmax_dense(logits, shape, list(range(1, k + 1)), keep_probabilities=True,
                                          chunk_voxels=300)
    expected = _authors_rule(logits, shape)
    assert (labels.astype(np.int64) == expected).mean() >= 0.99 and (expected > 127).any()
    assert (labels > 127).any()
    assert probs.shape == (k, *shape)


@pytest.mark.parametrize("shape", [(9, 40, 33), (4, 3, 70)])
def test_dense_path_matches_the_authors_rule_in_blocks(shape):
    logits = torch.cat([_smooth_logits(6, 4, scale=8.0), torch.full((1, 8, 12, 10), 30.0)])
    values = list(range(1, 8))
    for block in (50, 1000, 1 << 19):
        labels, _ = upsample_argmax_dense(logits[:, :4, :5, :6], shape, values, chunk_voxels=block)
        expected = _authors_rule(logits[:, :4, :5, :6], shape)
        assert (labels == expected).mean() >= 0.999, block


def test_dense_path_maps_prompts_to_their_label_values():
    """Label values other than 1..K go through the lookup; 1..K are written as they come (no lookup)."""
    logits = _smooth_logits(5, 4, scale=8.0)[:, :4, :5, :6]
    shape = (7, 11, 9)
    plain, _ = upsample_argmax_dense(logits, shape, [1, 2, 3, 4, 5])
    values = [10, 20, 3, 250, 7]
    mapped, _ = upsample_argmax_dense(logits, shape, values)
    assert len(np.unique(plain)) > 2
    assert np.array_equal(mapped, np.asarray([0, *values], dtype=np.uint8)[plain])


def test_cell_path_with_more_live_prompts_than_one_packed_key_holds():
    """Cells where more than 127 prompts stay live fall back to max/argmax; labels still equal the dense path."""
    base = _smooth_logits(1, 4)
    gen = torch.Generator().manual_seed(5)
    logits = base + 0.01 * torch.randn(130, *base.shape[1:], generator=gen)  # 130 near-duplicates: all live
    shape = (11, 17, 13)
    values = list(range(1, 131))
    cells, _ = upsample_argmax(logits, shape, values, force_cells=True)
    dense, _ = upsample_argmax_dense(logits, shape, values)
    assert np.array_equal(cells, dense) and (cells > 127).any()


@pytest.mark.parametrize("values", [[5, 300, 7], [1, 2, 70000]])
def test_cell_path_writes_uint16_and_uint32_label_maps(values):
    """Label values above 255 make uint16/uint32 maps, which torch cannot index_put: written through a signed
    view of the same bits, equal to the dense path."""
    logits = _smooth_logits(3, 1)
    cells, _ = upsample_argmax(logits, (11, 17, 13), values, force_cells=True)
    dense, _ = upsample_argmax_dense(logits, (11, 17, 13), values)
    assert cells.dtype == dense.dtype and cells.dtype.itemsize > 1
    assert np.array_equal(cells, dense) and set(np.unique(cells)) >= {0, values[1]}


def test_cell_path_rounds_like_the_dense_path_at_near_ties():
    """Two prompts a few ulps apart everywhere: the winner is decided by float32 rounding, so the cell path must
    round x as ATen's bilinear kernel does (v0 * w0 fused onto v1 * w1) to give the dense path's labels."""
    gen = torch.Generator().manual_seed(11)
    base = _smooth_logits(1, 7, scale=4.0)
    logits = torch.cat([base, base + 2e-6 * torch.randn(base.shape, generator=gen)])
    shape = (16, 61, 47)
    cells, _ = upsample_argmax(logits, shape, [1, 2], force_cells=True)
    dense, _ = upsample_argmax_dense(logits, shape, [1, 2])
    assert (cells == 1).any() and (cells == 2).any()
    assert np.array_equal(cells, dense)
