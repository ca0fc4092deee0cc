"""`--augment none|light|default|heavy`: shapes and label values kept, deterministic, never mirrored left-right
for a prompt naming a side; on the real ultrasound case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import US_CASE, _cli, us_small  # noqa: F401

from text3dsam_cli.errors import UsageError
from text3dsam_cli.training import AugmentConfig, augment
from text3dsam_cli.training.augment import AUGMENT_LEVELS, names_side
from text3dsam_cli.training.data import resize_pair


@pytest.fixture(scope="module")
def us_pair(us_small):  # noqa: F811
    """The real US case resized to 16x48x48: image (1,D,H,W) and its label map (values 0..3) as float."""
    image, labels = resize_pair(us_small["imgs"].astype(np.float32), us_small["gts"], (16, 48, 48))
    return image[None], labels[None].float()


@pytest.mark.parametrize("level", AUGMENT_LEVELS)
def test_each_level_keeps_shape_and_values_and_is_deterministic(us_pair, level):
    image, labels = us_pair
    config = AugmentConfig.from_level(level)
    assert config.level == level
    values = set(torch.unique(labels).tolist())
    changed = 0
    for seed in range(12):
        a = augment(image, labels, np.random.default_rng([7, seed]), config, prompt="left ventricle")
        b = augment(image, labels, np.random.default_rng([7, seed]), config, prompt="left ventricle")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same generator, same sample
        assert a[0].shape == image.shape and a[1].shape == labels.shape
        assert a[0].dtype == torch.float32 and torch.isfinite(a[0]).all()
        assert set(torch.unique(a[1]).tolist()) <= values  # nearest for the target: no new label values
        changed += not torch.equal(a[0], image)
    assert torch.equal(image, us_pair[0])  # inputs untouched
    if level == "none":
        assert changed == 0
    else:
        assert changed >= 6, changed


def test_default_is_the_paper_recipe():
    """`default` is what training did before the levels existed (exact resume and old runs rely on it)."""
    assert AugmentConfig.from_level("default") == AugmentConfig()
    old = AugmentConfig(rotate_prob=0.5, scale_prob=0.5, scale=0.1, shift_prob=0.5, shift=0.1)
    assert AugmentConfig() == old and not old.uses_monai()
    image = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(1, 2, 6, 6)
    for seed in range(8):  # the same six draws as before: rotation, scale, shift
        rng = np.random.default_rng(seed)
        draws = np.random.default_rng(seed).random(6)
        out, _ = augment(image, image.clone(), rng, AugmentConfig())
        expected = image
        if draws[0] < 0.5:
            expected = torch.rot90(expected, 1 + int(draws[1] * 3), dims=(-2, -1))
        if draws[2] < 0.5:
            expected = expected * float(1.0 + (2.0 * draws[3] - 1.0) * 0.1)
        if draws[4] < 0.5:
            expected = expected + float((2.0 * draws[5] - 1.0) * 0.1) * float(expected.float().std())
        assert torch.equal(out, expected.contiguous())


def test_levels_grow_stronger():
    light, default, heavy = (AugmentConfig.from_level(n) for n in ("light", "default", "heavy"))
    assert heavy.elastic_prob > 0 and light.elastic_prob == default.elastic_prob == 0
    assert heavy.flip_prob > 0 and light.flip_prob == default.flip_prob == 0
    assert heavy.rotate_degrees > light.rotate_degrees > 0 and heavy.zoom > light.zoom > 0
    assert all(getattr(heavy, f) > 0 for f in ("gamma_prob", "noise_prob", "blur_prob", "contrast_prob"))
    with pytest.raises(UsageError, match="choose none, light, default, heavy"):
        AugmentConfig.from_level("strong")


def test_names_side():
    for prompt in ("Left kidney", "right lung upper lobe", "kidney_left", "Rt. adrenal gland", "lt femur",
                   "Cardiac Ultrasound depicting left ventricular chamber", "RIGHT ATRIUM"):
        assert names_side(prompt), prompt
    for prompt in ("liver", "lateral ventricle", "bright lesion", "heart", "spleen", "aorta", "", None):
        assert not names_side(prompt), prompt


def test_never_mirrors_left_right_when_the_prompt_names_a_side():
    """Mirroring alone (flip_prob 1): W (left-right) flips for "liver" but never for "left kidney"."""
    d, h, w = 4, 6, 8
    image = torch.arange(d * h * w, dtype=torch.float32).reshape(1, d, h, w)
    target = torch.zeros(1, d, h, w)
    target[..., : w // 2] = 1.0  # an organ on one side
    mirror_only = AugmentConfig(0.0, 0.0, 0.0, 0.0, 0.0, flip_prob=1.0, level="custom")
    side, plain = [], []
    for seed in range(20):
        img, tgt = augment(image, target, np.random.default_rng(seed), mirror_only, prompt="left kidney")
        side.append(torch.equal(tgt, target))
        assert torch.equal(img, torch.flip(image, (-3, -2)))  # the other axes still mirror
        _, tgt = augment(image, target, np.random.default_rng(seed), mirror_only, prompt="liver")
        plain.append(torch.equal(tgt, torch.flip(target, (-1,))))
    assert all(side) and all(plain)
    heavy = AugmentConfig.from_level("heavy")  # with rotations: 0 or 180 degrees keep the side in W...
    heavy.rotate_prob, heavy.affine_prob, heavy.elastic_prob = 0.0, 0.0, 0.0
    for seed in range(30):
        _, tgt = augment(image, target, np.random.default_rng(seed), heavy, prompt="right kidney")
        assert torch.equal(tgt, target)  # only D and H may flip, and this target is constant along them


def test_cli_augment_levels_are_checked(tmp_path, us_small):  # noqa: F811
    result = _cli("finetune", tmp_path, "-o", tmp_path / "out", "--augment", "strong")
    assert result.exit_code == 2 and "--augment 'strong'" in result.output
