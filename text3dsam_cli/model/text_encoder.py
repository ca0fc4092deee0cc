"""Text encoder: a Hugging Face ``BertModel`` whose [CLS] hidden state a small projector maps to the decoder width.

The published ``config.json`` names only ``text_model`` (``nlpie/tiny-clinicalbert``), not its geometry. We
resolve the BERT config from (1) a ``text_config`` stored in our own checkpoints, (2) the Hugging Face cache
(or hub, when online) for ``text_model``, (3) the checkpoint tensors themselves, with the number of attention
heads from :data:`KNOWN_HEADS`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel

log = logging.getLogger(__name__)

#: Attention-head counts of encoders the published model family uses (not inferable from tensor shapes).
KNOWN_HEADS = {
    "nlpie/tiny-clinicalbert": 12,
    "nlpie/bio-tinybert": 12,
    "huawei-noah/TinyBERT_General_4L_312D": 12,
    "bert-base-uncased": 12,
    "google-bert/bert-base-uncased": 12,
    "emilyalsentzer/Bio_ClinicalBERT": 12,
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext": 12,
}
#: Head size assumed for an unknown encoder when the head count has to be guessed.
DEFAULT_HEAD_DIM = 64

BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "pad_token_id",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "model_type")


def infer_text_config(state_dict: Mapping[str, torch.Tensor], text_model: str,
                      prefix: str = "text_encoder.") -> dict[str, Any]:
    """BERT geometry read off the checkpoint tensors; heads from :data:`KNOWN_HEADS` (else hidden/64)."""
    def shape(name: str) -> tuple[int, ...]:
        key = prefix + name
        if key not in state_dict:
            raise KeyError(key)
        return tuple(state_dict[key].shape)

    vocab, hidden = shape("embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in state_dict
              if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))}
    heads = KNOWN_HEADS.get(text_model)
    if heads is None:
        heads = max(1, hidden // DEFAULT_HEAD_DIM)
        log.warning("unknown text encoder %s: assuming %d attention heads", text_model, heads)
    return {
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads,
        "intermediate_size": shape("encoder.layer.0.intermediate.dense.weight")[0],
        "max_position_embeddings": shape("embeddings.position_embeddings.weight")[0],
        "type_vocab_size": shape("embeddings.token_type_embeddings.weight")[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }


def text_config_from_hub(text_model: str, cache_dir: str | None = None,
                        allow_network: bool = False) -> dict[str, Any] | None:
    """The text model's BERT config from the Hugging Face cache (or the hub if allowed), else None."""
    try:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(text_model, "config.json", cache_dir=cache_dir, local_files_only=True)
        except Exception:
            if not allow_network:
                return None
            path = hf_hub_download(text_model, "config.json", cache_dir=cache_dir, etag_timeout=5)
        config = BertConfig.from_json_file(path).to_dict()
    except Exception as exc:  # network, missing repo, not a BERT config
        log.debug("no hub config for %s: %s", text_model, exc)
        return None
    return {k: config[k] for k in BERT_KEYS if k in config}


def build_text_encoder(text_config: Mapping[str, Any]) -> BertModel:
    """An untrained ``BertModel`` (with pooler, as published) of the given geometry."""
    config = BertConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
    return BertModel(config, add_pooling_layer=True)


def build_text_projector(text_dim: int, embed_dim: int) -> nn.Sequential:
    """Linear-LayerNorm-GELU-Linear from the text width to the decoder width (``text_projector.{0,1,3}``)."""
    return nn.Sequential(nn.Linear(text_dim, embed_dim), nn.LayerNorm(embed_dim), nn.GELU(),
                         nn.Linear(embed_dim, embed_dim))
