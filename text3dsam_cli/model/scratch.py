"""A new, untrained model: text-encoder geometry, tokenizer and (when available) pretrained BERT weights.

``train --from-scratch`` builds its model here (:func:`new_model`); the training loop itself is
:mod:`text3dsam_cli.training.trainer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from text3dsam_cli.errors import UsageError
from text3dsam_cli.model.config import Text3DSAMConfig
from text3dsam_cli.model.hub import hub_cache_dir, hub_offline
from text3dsam_cli.model.loading import cached_tokenizer_folder
from text3dsam_cli.model.text3dsam import Text3DSAM
from text3dsam_cli.model.text_encoder import BERT_KEYS, KNOWN_TEXT_MODELS, text_config_from_hub
from text3dsam_cli.model.tokenizer import WordPieceTokenizer


def load_tokenizer_for_training(text_model: str, tokenizer: str | os.PathLike[str] | None = None) -> Any:
    """``--tokenizer`` (a folder with vocab.txt / tokenizer.json, or a vocab.txt file), else the text model's."""
    if tokenizer:
        path = Path(tokenizer).expanduser()
        if not path.exists():
            raise UsageError(f"--tokenizer {path}: no such file or folder")
        try:
            loaded = WordPieceTokenizer.from_folder(path) if path.is_dir() else WordPieceTokenizer.from_vocab(path)
        except Exception as exc:
            raise UsageError(f"--tokenizer {path}: cannot load a BERT tokenizer ({exc})") from exc
        if len(loaded) < 100:
            raise UsageError(f"--tokenizer {path}: only {len(loaded)} tokens; expected a BERT vocab.txt")
        return loaded
    try:
        return WordPieceTokenizer.from_folder(cached_tokenizer_folder(text_model))
    except Exception as exc:
        raise UsageError(f"no tokenizer for {text_model} (not in the Hugging Face cache and not downloadable); "
                         "pass --tokenizer PATH (a folder holding vocab.txt)") from exc


def text_config_for_training(text_model: str, vocab_size: int) -> tuple[dict[str, Any], str]:
    """BERT config for ``text_model``: a local folder's config.json, the HF cache, the known table, the hub."""
    config: dict[str, Any] | None = None
    where = ""
    local = Path(text_model).expanduser()
    if (local / "config.json").is_file():
        try:
            full = json.loads((local / "config.json").read_text(encoding="utf-8"))
            if not isinstance(full, dict):
                raise ValueError("not a JSON object")
        except Exception as exc:
            raise UsageError(f"--text-model {local}: unreadable config.json ({exc})") from exc
        config, where = {k: full[k] for k in BERT_KEYS if k in full}, f"{local}/config.json"
    if config is None:
        config = text_config_from_hub(text_model, str(hub_cache_dir()), allow_network=False)
        where = "the Hugging Face cache" if config else ""
    if config is None and text_model in KNOWN_TEXT_MODELS:
        config, where = {"model_type": "bert", **KNOWN_TEXT_MODELS[text_model]}, "the built-in table"
    if config is None and not hub_offline():
        config = text_config_from_hub(text_model, str(hub_cache_dir()), allow_network=True)
        where = "the Hugging Face hub" if config else ""
    if config is None:
        raise UsageError(f"unknown text model {text_model!r}: not cached and not one of "
                         f"{', '.join(sorted(KNOWN_TEXT_MODELS))}; pass a local BERT folder as --text-model")
    config = {"model_type": "bert", "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "pad_token_id": 0, **config}
    config["vocab_size"] = max(int(config.get("vocab_size", 0)), int(vocab_size))
    return config, where


def pretrained_text_state(text_model: str) -> dict[str, torch.Tensor] | None:
    """BERT tensors of ``text_model`` (a local folder or the HF cache) under ``BertModel``'s key names, or None.

    Read with safetensors (or ``torch.load(weights_only=True)``) directly; checkpoints of BERT heads
    (``bert.``-prefixed keys) and old ``gamma``/``beta`` LayerNorm names are mapped.
    """
    local = Path(text_model).expanduser()
    files: list[Path] = []
    if local.is_dir():
        files = [local / name for name in ("model.safetensors", "pytorch_model.bin") if (local / name).is_file()]
    else:
        from huggingface_hub import hf_hub_download

        for name in ("model.safetensors", "pytorch_model.bin"):
            try:
                files.append(Path(hf_hub_download(text_model, name, cache_dir=str(hub_cache_dir()),
                                                  local_files_only=hub_offline())))
                break
            except Exception:
                continue
    if not files:
        return None
    try:
        if files[0].suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(files[0]))
        else:
            raw = torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception:
        return None
    state = {}
    for key, tensor in raw.items():
        key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        state[key.replace("LayerNorm.beta", "LayerNorm.bias")] = tensor
    return state


def _load_pretrained_text(model: Text3DSAM, text_model: str) -> bool:
    """Copy pretrained BERT weights (local folder or HF cache) into ``model.text_encoder``; False if none fit."""
    pretrained = pretrained_text_state(text_model)
    if pretrained is None:
        return False
    own = model.text_encoder.state_dict()
    state = {k: v for k, v in pretrained.items() if k in own and own[k].shape == v.shape}
    if len(state) < len(own) - 2:  # allow the pooler to differ, nothing else
        return False
    model.text_encoder.load_state_dict(state, strict=False)
    return True


def new_model(config: Text3DSAMConfig, tokenizer: str | os.PathLike[str] | None = None,
              pretrained_text: bool = True) -> tuple[Text3DSAM, list[str]]:
    """A freshly initialised model for ``config`` (text encoder pretrained when available) and notes about it."""
    tok = load_tokenizer_for_training(config.text_model, tokenizer)
    text_config, where = text_config_for_training(config.text_model, len(tok))
    config.text_config = text_config
    notes = [f"text encoder geometry of {config.text_model} from {where}"]
    try:
        model = Text3DSAM(config)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot build the model: {exc}") from exc
    model.tokenizer = tok
    if pretrained_text and _load_pretrained_text(model, config.text_model):
        notes.append(f"text encoder initialised from the pretrained {config.text_model}")
    else:
        notes.append("text encoder randomly initialised" + ("" if not pretrained_text else
                     f" (no pretrained weights for {config.text_model} found offline)"))
    model.source = {"model": "scratch", "path": None}
    return model, notes
