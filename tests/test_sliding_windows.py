"""Sliding windows against an outside oracle: MONAI's ``sliding_window_inference`` and ``compute_importance_map``,
plans derived by hand (anisotropic spacing, a permuted voxel order), a blend computed here, full coverage.

MONAI builds its Gaussian at the window's full size and nearest-resizes it for a predictor whose output is
smaller (ours returns the decoder's 1/4-resolution logits), so the oracle is given the same 1/4-resolution
importance map through ``process_fn``; that map is checked against ``compute_importance_map`` on its own
(sigma = 0.125 x the window size on each axis, MONAI's default ``sigma_scale``, nnU-Net's 1/8).
"""

from __future__ import annotations

import itertools
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.inference import Segmenter, gaussian_weights, window_starts
from text3dsam_cli.upsampling import upsample_argmax

SIGMA_SCALE = 0.125
PROMPTS = ["liver", "spleen", "left kidney"]


@pytest.mark.parametrize("size", [(16, 32, 32), (8, 8, 8), (5, 12, 7), (32, 64, 64)])
def test_importance_map_is_monais_gaussian(size):
    """Ours is MONAI's ``compute_importance_map(size, "gaussian", sigma_scale=0.125)`` scaled to a maximum of 1
    (a constant factor, which the blend divides out), floored at 1e-3."""
    ours = gaussian_weights(size).double()
    theirs = compute_importance_map(size, mode="gaussian", sigma_scale=SIGMA_SCALE, dtype=torch.float64)
    scaled = theirs / theirs.max()
    # MONAI floors its un-scaled map at 1e-3 (a float32 1e-3): compare where neither floor applies
    free = (theirs > 1.001e-3) & (scaled > 1.001e-3)
    assert free.sum() > 0.25 * theirs.numel()
    torch.testing.assert_close(ours[free], scaled[free], rtol=1e-6, atol=0)
    assert float(ours.max()) == pytest.approx(1.0) and float(ours.min()) == pytest.approx(1e-3)
    assert bool((ours[~free] <= 1e-3 / float(theirs.max()) + 1e-9).all())


def _coverage(size: int, window: int, step: int) -> np.ndarray:
    count = np.zeros(size, dtype=int)
    for start in window_starts(size, window, step):
        count[start : start + window] += 1
    return count


@pytest.mark.parametrize("window", [16, 64, 128])
def test_window_placement_covers_every_voxel_and_ends_flush(window):
    for step in range(4, window + 1, 4):
        for size in range(window, 3 * window + 9):
            starts = window_starts(size, window, step)
            assert starts[0] == 0 and starts[-1] == size - window, (size, window, step, starts)
            assert all(0 < b - a <= step for a, b in itertools.pairwise(starts)), (size, window, step, starts)
            assert (_coverage(size, window, step) > 0).all(), (size, window, step, starts)
    assert window_starts(window - 5, window, 8) == [0]  # smaller than one window: padded, one window


def _plan_by_hand(shape_zyx, spacing_xyz, target_xyz, window, overlap):
    """The sliding plan written out from its definition (docs/segment.md), independently of inference.py."""
    extent = [shape_zyx[0] * spacing_xyz[2], shape_zyx[1] * spacing_xyz[1], shape_zyx[2] * spacing_xyz[0]]
    target = [target_xyz[2], target_xyz[1], target_xyz[0]]
    grid = []
    for mm, t in zip(extent, target):
        quarters = mm / t / 4
        assert abs(quarters % 1 - 0.5) > 0.01  # no half-way case (Python rounds those to even)
        grid.append(4 * max(1, round(quarters)))
    padded = [max(g, w) for g, w in zip(grid, window)]
    starts = []
    for p, w in zip(padded, window):
        step = int(w * (1 - overlap)) // 4 * 4
        axis = list(range(0, p - w + 1, step))
        if axis[-1] != p - w:
            axis.append(p - w)
        starts.append(axis)
    return grid, padded, starts


def test_hand_derived_plan_for_anisotropic_spacing(small_model):
    """1.5 x 2 x 3 mm (x, y, z) resampled to 1 x 1 x 1.5 mm: every number below is worked out by hand."""
    seg = Segmenter(small_model, device="cpu", mode="sliding", spacing=(1.0, 1.0, 1.5), overlap=0.5)
    plan = seg._sliding_plan((28, 70, 96), (1.5, 2.0, 3.0))
    # z: 28 x 3 mm = 84 mm / 1.5 = 56; y: 70 x 2 = 140 mm / 1 = 140; x: 96 x 1.5 = 144 mm / 1 = 144
    assert plan["grid"] == [56, 140, 144]
    assert plan["padded"] == [64, 140, 144]  # z padded up to the 64-voxel window (small checkpoint 64x128x128)
    # steps 32 / 64 / 64; y: 0, then 140 - 128 = 12 flush; x: 0, 144 - 128 = 16 flush
    assert plan["positions"] == [(0, 0, 0), (0, 0, 16), (0, 12, 0), (0, 12, 16)]
    grid, padded, starts = _plan_by_hand((28, 70, 96), (1.5, 2.0, 3.0), (1.0, 1.0, 1.5), (64, 128, 128), 0.5)
    assert (grid, padded) == (plan["grid"], plan["padded"])
    assert plan["positions"] == [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]


def _monai_logits(model, image, plan, text, overlap, sw_batch_size):
    """MONAI's window loop and blend over the same per-window predictor (image encoder + decoder)."""
    window, grid, padded = plan["window"], plan["grid"], plan["padded"]
    x = F.interpolate(torch.as_tensor(image)[None, None], size=grid, mode="trilinear", align_corners=False)
    x = F.pad(x, [0, padded[2] - grid[2], 0, padded[1] - grid[1], 0, padded[0] - grid[0]])
    low_map = gaussian_weights([w // 4 for w in window])

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        features = model.image_encoder(windows)
        out = []
        for i in range(windows.shape[0]):
            ctx = model.seg_decoder.prepare([f[i : i + 1] for f in features])
            out.append(model.decode(ctx, text).float()[:, 0])
        return torch.stack(out)

    with torch.inference_mode():
        out = sliding_window_inference(x, window, sw_batch_size, predictor, overlap=overlap, mode="gaussian",
                                       sigma_scale=SIGMA_SCALE, process_fn=lambda seg, win, imp: (seg, low_map))
    low = [g // 4 for g in grid]
    return out[0, :, : low[0], : low[1], : low[2]]


@pytest.mark.parametrize("overlap", [0.5, 0.25])
def test_sliding_logits_equal_monai_sliding_window_inference(small_model, overlap):
    rng = np.random.default_rng(7)
    image = rng.uniform(0, 255, (28, 70, 96)).astype(np.float32)
    spacing = (1.5, 2.0, 3.0)
    seg = Segmenter(small_model, device="cpu", mode="sliding", spacing=(1.0, 1.0, 1.5), overlap=overlap,
                    sw_batch_size=2, embedding_cache=False)
    encoded = seg.encode(image, spacing)
    grid, padded, starts = _plan_by_hand(image.shape, spacing, (1.0, 1.0, 1.5), (64, 128, 128), overlap)
    assert encoded.plan["grid"] == grid and encoded.plan["padded"] == padded
    assert len(encoded.plan["positions"]) == math.prod(len(s) for s in starts) >= 4
    result = seg.segment_encoded(encoded, PROMPTS)
    ours = torch.stack([encoded.logits[p] for p in PROMPTS])
    theirs = _monai_logits(small_model, image, encoded.plan, seg.embed_prompts(PROMPTS), overlap, 2)
    assert ours.shape == theirs.shape == (3, *[g // 4 for g in grid])
    assert torch.equal(ours, theirs), float((ours - theirs).abs().max())
    labels, _ = upsample_argmax(theirs, image.shape, [1, 2, 3])
    assert np.array_equal(result.labels, labels)
    assert result.sliding == {"target_spacing": [1.0, 1.0, 1.5], "grid": grid, "window": [64, 128, 128],
                              "windows": len(encoded.plan["positions"]), "overlap": overlap}


def _gauss_1d(n: int) -> np.ndarray:
    x = np.arange(n) - (n - 1) / 2
    return np.exp(-0.5 * (x / (n / 8)) ** 2)


def test_two_windows_blend_to_the_weighted_mean(small_model):
    """Two windows along x (starts 0 and 32 at full resolution, 0 and 8 on the 1/4 canvas): where they overlap
    the result is the Gaussian-weighted mean of the two windows' own logits, elsewhere each window's."""
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (64, 128, 160)).astype(np.float32)
    seg = Segmenter(small_model, device="cpu", mode="sliding", spacing=(1.0, 1.0, 1.0), sw_batch_size=1,
                    embedding_cache=False)
    encoded = seg.encode(image, (1.0, 1.0, 1.0))
    assert encoded.plan["positions"] == [(0, 0, 0), (0, 0, 32)]
    seg.segment_encoded(encoded, PROMPTS[:2])
    ours = torch.stack([encoded.logits[p] for p in PROMPTS[:2]]).numpy().astype(np.float64)
    assert ours.shape == (2, 16, 32, 40)

    text = seg.embed_prompts(PROMPTS[:2])
    own = []
    with torch.inference_mode():
        for x0 in (0, 32):
            window = torch.as_tensor(image[:, :, x0 : x0 + 128])[None, None]
            own.append(small_model.decode(small_model.encode_image(window), text)[:, 0].double().numpy())
    first, second = own
    w = _gauss_1d(16)[:, None, None] * _gauss_1d(32)[None, :, None] * _gauss_1d(32)[None, None, :]
    w = np.maximum(w / w.max(), 1e-3)
    expected = np.empty_like(ours)
    expected[..., :8] = first[..., :8]
    expected[..., 32:] = second[..., 24:]
    a, b = w[..., 8:32], w[..., 0:24]
    expected[..., 8:32] = (first[..., 8:32] * a + second[..., 0:24] * b) / (a + b)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
    plain = (first[..., 8:32] + second[..., 0:24]) / 2  # a plain mean would be a different answer
    assert np.abs(plain - expected[..., 8:32]).max() > 1e-2


def test_sidecar_records_plan_of_permuted_anisotropic_scan(small_checkpoint, tmp_path):
    """A CT stored sagittal-first (voxel axes S, L, A at 4, 1, 2 mm) reaches the model as LAS, i.e. (z, y, x)
    along S, A, L at 4, 2, 1 mm; the plan for 1 x 1 x 1.25 mm and the sidecar's record are derived by hand."""
    rng = np.random.default_rng(5)
    data = rng.uniform(-200, 300, (20, 148, 70)).astype(np.float32)  # nibabel order: axes i, j, k
    affine = np.zeros((4, 4))
    affine[2, 0] = 4.0   # i -> +S (RAS world z), 4 mm
    affine[0, 1] = -1.0  # j -> +L (RAS world -x), 1 mm
    affine[1, 2] = 2.0   # k -> +A (RAS world y), 2 mm
    affine[3, 3] = 1.0
    source = tmp_path / "sagittal_ct.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), source)
    assert nib.aff2axcodes(affine) == ("S", "L", "A")
    out = tmp_path / "seg.nii.gz"
    result = CliRunner().invoke(app, ["segment", str(source), "liver", "-m", str(small_checkpoint), "-o", str(out),
                                      "--modality", "CT", "--mode", "sliding", "--spacing", "1,1,1.25"])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["orientation"]["input"] == "SLA" and sidecar["orientation"]["model"] == "LAS"
    # model (z, y, x) = (S, A, L): 20 x 4 = 80 mm / 1.25 = 64; 70 x 2 = 140 mm / 1 = 140; 148 x 1 = 148 mm / 1 = 148
    # windows: z 64 fits one; y: 0, 140 - 128 = 12; x: 0, 148 - 128 = 20  ->  1 x 2 x 2
    assert sidecar["mode"] == "sliding"
    assert sidecar["sliding"] == {"target_spacing": [1.0, 1.0, 1.25], "grid": [64, 140, 148],
                                  "window": [64, 128, 128], "windows": 4, "overlap": 0.5}
    assert _plan_by_hand((20, 70, 148), (1.0, 2.0, 4.0), (1.0, 1.0, 1.25), (64, 128, 128), 0.5) == (
        [64, 140, 148], [64, 140, 148], [[0], [0, 12], [0, 20]])
    assert nib.load(out).shape == data.shape
