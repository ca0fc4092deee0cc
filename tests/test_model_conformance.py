"""The model reproduces the published checkpoint's interface and the authors' numbers (../shared/reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REFERENCE

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
