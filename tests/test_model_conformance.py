"""The model reproduces the published checkpoint's interface and the authors' numbers (../shared/reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import NO_SHARED, REFERENCE

if not REFERENCE.is_dir():
    pytest.skip(NO_SHARED, allow_module_level=True)
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())


def _vectors(variant: str):
    return np.load(REFERENCE / f"vectors_{variant}.npz")


@pytest.fixture(params=["small", "full"])
def variant_model(request):
    return request.param, request.getfixturevalue(f"{request.param}_model")


def test_state_dict_matches_manifest_exactly(small_model):
    state = small_model.state_dict()
    expected = [(k, list(s)) for k, s, _ in MANIFEST["state_dict"]]
    assert [(k, list(v.shape)) for k, v in state.items()] == expected
    dtypes = {k: d for k, _, d in MANIFEST["state_dict"]}
    assert all(str(v.dtype).removeprefix("torch.") == dtypes[k] for k, v in state.items())


def test_text_config_inferred_offline_matches_reference(small_model):
    ref = MANIFEST["text_config"]
    got = small_model.config.text_config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size"):
        assert got[key] == ref[key], key


def test_config_fields_as_published(small_model):
    written = small_model.config.to_dict()
    for key, value in MANIFEST["config"].items():
        if key != "image_size":
            assert written[key] == value, key


def test_stage_feature_means(variant_model):
    variant, model = variant_model
    ref = _vectors(variant)
    image = torch.from_numpy(ref["image"].astype(np.float32))[None, None]
    with torch.inference_mode():
        features = model.image_encoder(image)
    for j, feature in enumerate(features):
        assert list(feature.shape) == list(ref[f"feature_{j}_shape"])
        mean = feature.mean(dim=(0, 2, 3, 4)).numpy()
        np.testing.assert_allclose(mean, ref[f"feature_{j}_mean"], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("prompt", [0, 1])
def test_generate_matches_authors_logits(variant_model, prompt):
    variant, model = variant_model
    ref = _vectors(variant)
    image = torch.from_numpy(ref["image"].astype(np.float32))[None, None]
    ids = torch.from_numpy(ref[f"input_ids_{prompt}"])
    mask = torch.from_numpy(ref[f"attention_mask_{prompt}"])
    text = model.encode_text(ids, mask).detach().numpy()
    np.testing.assert_allclose(text, ref[f"text_embedding_{prompt}"], atol=1e-4)
    logits = model.generate(image, ids, mask)
    assert logits.shape == ref[f"logits_{prompt}"].shape
    diff = np.abs(logits.numpy() - ref[f"logits_{prompt}"]).max()
    assert diff < 1e-3, f"{variant} prompt {prompt}: max |logit diff| {diff}"


def test_encode_once_decode_batched_equals_generate(small_model):
    """Encoding the image once and decoding both prompts in one batch gives the per-prompt logits."""
    ref = _vectors("small")
    image = torch.from_numpy(ref["image"].astype(np.float32))[None, None]
    with torch.inference_mode():
        ctx = small_model.encode_image(image)
        texts = [small_model.tokenizer.decode(ref[f"input_ids_{i}"][0], skip_special_tokens=True)
                 for i in range(2)]
        logits = small_model.decode(ctx, small_model.encode_prompts(texts))
    for i in range(2):
        diff = np.abs(logits[i : i + 1].numpy() - ref[f"logits_{i}"]).max()
        assert diff < 1e-3


def test_tokenizer_from_checkpoint_matches_reference_ids(small_model):
    ref = _vectors("small")
    for i in range(2):
        ids = ref[f"input_ids_{i}"][0]
        n = int(ref[f"attention_mask_{i}"].sum())
        text = small_model.tokenizer.decode(ids[:n], skip_special_tokens=True)
        again = small_model.tokenize([text])["input_ids"][0].numpy()
        np.testing.assert_array_equal(again, ids[:n])


def test_line_sampled_pass_equals_full_pass_on_its_lines(small_model):
    """Intermediate passes compute logits only where the stride-4 downscaling reads them: same values there."""
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, *small_model.config.image_size, generator=gen) * 255
    seg = small_model.seg_decoder
    with torch.inference_mode():
        ctx = small_model.encode_image(image)
        text = small_model.encode_prompts(["liver", "left kidney"])
        sparse, dense = seg.prompt_encoder(text, None, None)
        full, token = seg.mask_decoder(ctx, text, sparse, dense)
        lines, token_lines = seg.mask_decoder(ctx, text, sparse, dense, lines_only=True)
        assert torch.equal(token, token_lines)
        expected = [full[:, :, :, ::4, ::4], full[:, :, ::4, :, ::4], full[:, :, ::4, ::4, :]]
        for got, want in zip(lines, expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # and the downscaled dense embedding built from the lines equals the one from the full probabilities
        dense_full = seg.prompt_encoder(text, torch.sigmoid(full), token)[1]
        dense_lines = seg.prompt_encoder(text, tuple(torch.sigmoid(t) for t in lines), token)[1]
        torch.testing.assert_close(dense_lines, dense_full, atol=1e-4, rtol=1e-4)


def test_batchnorm_folding_matches_module_path(small_model):
    """Eval-mode decomposed convolutions fold BatchNorm into the weights: same output as conv then BN."""
    block = small_model.image_encoder.encoder.s0[0][1]
    x = torch.randn(1, 48, 8, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        folded = block(x)
        reference = block.c1(x) + block.c2(x) + block.c3(x)
    torch.testing.assert_close(folded, reference, atol=1e-4, rtol=1e-5)
