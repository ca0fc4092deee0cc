"""Checkpoint loading: strict tensor checks, text-config resolution, saving, and the HF cache (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from text3dsam_cli import DEFAULT_MODEL
from text3dsam_cli.errors import CheckpointError, ModelNotFoundError
from text3dsam_cli.model import load_model, resolve_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(small_checkpoint, tmp_path):
    folder = _copy(small_checkpoint, tmp_path / "ck")
    _edit_tensors(folder, lambda t: t.pop("seg_decoder.mask_decoder.feat_conv0.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor seg_decoder\.mask_decoder\.feat_conv0\.bias"):
        load_model(folder)


def test_unexpected_tensor_is_named(small_checkpoint, tmp_path):
    folder = _copy(small_checkpoint, tmp_path / "ck")
    _edit_tensors(folder, lambda t: t.__setitem__("extra.head.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor extra\.head\.weight"):
        load_model(folder)


def test_misshaped_tensor_is_named(small_checkpoint, tmp_path):
    folder = _copy(small_checkpoint, tmp_path / "ck")
    key = "text_projector.3.weight"
    _edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(768, 700)))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensor text_projector\.3\.weight \(768, 700\)"):
        load_model(folder)


def test_folder_without_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "med3d_seg"}))
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "noweights")


def test_wrong_model_type_refused(small_checkpoint, tmp_path):
    folder = _copy(small_checkpoint, tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type"):
        load_model(folder)


def test_save_pretrained_round_trip(small_model, tmp_path):
    out = tmp_path / "saved"
    small_model.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "med3d_seg"
    assert config["text_config"]["num_attention_heads"] == 12
    assert (out / "vocab.txt").is_file()
    again = load_model(out)
    for (k1, v1), (k2, v2) in zip(small_model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2
        assert torch.equal(v1, v2), k1
    assert again.tokenizer("liver")["input_ids"] == small_model.tokenizer("liver")["input_ids"]


def test_stored_text_config_wins(small_model, tmp_path):
    out = tmp_path / "saved"
    small_model.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = 6  # still divides 312: must be honoured
    (out / "config.json").write_text(json.dumps(config))
    assert load_model(out).text_encoder.config.num_attention_heads == 6


def _fake_hub_cache(home: Path, checkpoint: Path, repo_id: str = DEFAULT_MODEL, rev: str = "a" * 40) -> Path:
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return snapshot


def test_offline_cache_layout_resolves_default_model(small_checkpoint, tmp_path, monkeypatch):
    home = tmp_path / "hf"
    snapshot = _fake_hub_cache(home, small_checkpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    location = resolve_model()
    assert location.path == snapshot
    assert location.repo_id == DEFAULT_MODEL and location.commit == "a" * 40
    model = load_model()
    assert model.source["model"] == DEFAULT_MODEL


def test_model_env_variable_overrides_default(small_checkpoint, monkeypatch):
    monkeypatch.setenv("TEXT3DSAM_MODEL", str(small_checkpoint))
    assert resolve_model().path == small_checkpoint.resolve()


def test_not_cached_offline_gives_actionable_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model()
    message = str(info.value)
    assert DEFAULT_MODEL in message and "text3dsam download" in message
    assert "--model" in message and "HF_ENDPOINT" in message


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no such model folder"):
        resolve_model(str(tmp_path / "does" / "not" / "exist"))


def test_image_encoder_variant_from_config():
    """A model variant is a config: widths, depths, kernels and heads come from ``image_encoder``."""
    from text3dsam_cli.model.config import ImageEncoderConfig, Text3DSAMConfig
    from text3dsam_cli.model.image_encoder import ImageEncoder

    config = Text3DSAMConfig.from_dict({
        "image_size": [32, 32, 32], "patch_size": [32, 32, 32], "embed_dim": 64,
        "image_encoder": {"channels": [4, 8, 16, 32, 64], "blocks": [1, 1, 2, 1, 1], "kernels": [5, 3, 3],
                          "num_heads": 4},
    })
    assert config.image_encoder == ImageEncoderConfig((4, 8, 16, 32, 64), (1, 1, 2, 1, 1), (5, 3, 3), 7, 4, 4)
    assert Text3DSAMConfig.from_dict(config.to_dict()).image_encoder == config.image_encoder
    encoder = ImageEncoder(config.image_encoder).eval()
    assert len(encoder.encoder.s2) == 2 and encoder.encoder.s4[0].spatial_attention.attn.num_heads == 4
    with torch.no_grad():
        features = encoder(torch.zeros(1, 1, 32, 32, 32))
    assert [tuple(f.shape[1:]) for f in features] == [(4, 8, 8, 8), (8, 4, 4, 4), (16, 2, 2, 2), (32, 1, 1, 1),
                                                      (64, 1, 1, 1)]


def test_image_encoder_config_must_fit_the_decoder(tmp_path, small_checkpoint):
    """Stage widths the decoder cannot read are refused with one line naming config.json."""
    folder = tmp_path / "bad"
    shutil.copytree(small_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_encoder"] = {"channels": [8, 96, 192, 384, 768]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json.*stages s0, s2, s4 must be \[48, 192, 768\]"):
        load_model(folder)
