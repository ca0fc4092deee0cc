"""Text encoder: BERT on plain torch, whose [CLS] hidden state a small projector maps to the decoder width.

The module tree (``embeddings``, ``encoder.layer.N.attention.self.query`` ...) and therefore the state-dict
keys are those of Hugging Face's ``BertModel``: they are the checkpoint's interface. The arithmetic is BERT's
(post-LayerNorm, erf GELU, additive attention mask), written here so that neither inference nor training imports
transformers' model stack (several seconds of ``import`` on a small machine). ``tests/test_text_path.py`` proves
it equal to ``transformers.BertModel`` and to the reference embeddings.

The published ``config.json`` names only ``text_model`` (``nlpie/tiny-clinicalbert``), not its geometry. We
resolve the BERT config from (1) a ``text_config`` stored in our own checkpoints, (2) the Hugging Face cache
(or hub, when online) for ``text_model``, (3) the checkpoint tensors themselves, with the number of attention
heads from :data:`KNOWN_HEADS`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: BERT geometry of the text encoders the published model family uses: building one from scratch when neither a
#: local folder nor the HF cache has its config, and the attention heads of a checkpoint (not inferable from
#: tensor shapes).
_TINY_BERT = {"hidden_size": 312, "num_hidden_layers": 4, "num_attention_heads": 12, "intermediate_size": 1200}
_BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
KNOWN_TEXT_MODELS: dict[str, dict[str, int]] = {
    "nlpie/tiny-clinicalbert": _TINY_BERT,
    "nlpie/bio-tinybert": _TINY_BERT,
    "huawei-noah/TinyBERT_General_4L_312D": _TINY_BERT,
    "bert-base-uncased": _BERT_BASE,
    "google-bert/bert-base-uncased": _BERT_BASE,
    "emilyalsentzer/Bio_ClinicalBERT": _BERT_BASE,
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext": _BERT_BASE,
}
#: Attention-head counts of :data:`KNOWN_TEXT_MODELS`.
KNOWN_HEADS = {name: geometry["num_attention_heads"] for name, geometry in KNOWN_TEXT_MODELS.items()}
#: Version of the text path's code (this encoder's arithmetic, the tokenizer pipeline, the projector): part of
#: the prompt-embedding fingerprint. Bump it with any change that can change a prompt's embedding, so that stored
#: vectors of the old code are not reused.
TEXT_PATH_VERSION = "1"
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
    """The text model's BERT config from the Hugging Face cache (or the hub if allowed), else None.

    The cache is looked up on disk first (``models--org--name/refs/main`` -> snapshot), so that a load that
    needs no download does not import ``huggingface_hub``.
    """
    try:
        path = _cached_hub_file(text_model, "config.json", cache_dir)
        if path is None:
            if not allow_network:
                return None
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(text_model, "config.json", cache_dir=cache_dir, etag_timeout=5)
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type {config.get('model_type')!r} is not bert")
    except Exception as exc:  # network, missing repo, not a BERT config
        log.debug("no hub config for %s: %s", text_model, exc)
        return None
    return {k: config[k] for k in BERT_KEYS if k in config}


def _cached_hub_file(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    """``filename`` of ``repo_id``'s ``main`` snapshot in a Hugging Face hub cache folder, if present."""
    from pathlib import Path

    if cache_dir is None or "/" not in repo_id:
        return None
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    path = repo / "snapshots" / commit / filename
    return str(path) if path.is_file() else None


@dataclass
class BertGeometry:
    """The BERT hyper-parameters the encoder needs (names as in Hugging Face's ``BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 312
    num_hidden_layers: int = 4
    num_attention_heads: int = 12
    intermediate_size: int = 1200
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BertGeometry:
        """Known keys of a BERT config dict (others, like ``model_type``, are ignored)."""
        names = {f.name for f in fields(cls)}
        geometry = cls(**{k: v for k, v in data.items() if k in names})
        if geometry.hidden_size % geometry.num_attention_heads:
            raise ValueError(f"hidden_size {geometry.hidden_size} is not a multiple of num_attention_heads "
                             f"{geometry.num_attention_heads}")
        if geometry.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported text-encoder activation {geometry.hidden_act!r}")
        return geometry


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: BERT ``hidden_act`` names -> functions (``gelu`` is the exact erf form, as in BERT).
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh}


class BertEmbeddings(nn.Module):
    """Word + token-type + position embeddings, LayerNorm, dropout."""

    def __init__(self, g: BertGeometry) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(g.vocab_size, g.hidden_size, padding_idx=g.pad_token_id)
        self.position_embeddings = nn.Embedding(g.max_position_embeddings, g.hidden_size)
        self.token_type_embeddings = nn.Embedding(g.type_vocab_size, g.hidden_size)
        self.LayerNorm = nn.LayerNorm(g.hidden_size, eps=g.layer_norm_eps)
        self.dropout = nn.Dropout(g.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        # token type 0 throughout, added in BERT's order: (word + type) + position
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention with BERT's ``query``/``key``/``value`` projections."""

    def __init__(self, g: BertGeometry) -> None:
        super().__init__()
        self.heads = g.num_attention_heads
        self.query = nn.Linear(g.hidden_size, g.hidden_size)
        self.key = nn.Linear(g.hidden_size, g.hidden_size)
        self.value = nn.Linear(g.hidden_size, g.hidden_size)
        self.dropout_p = g.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, c)


class BertSelfOutput(nn.Module):
    """Dense + dropout + residual + LayerNorm (post-LN)."""

    def __init__(self, g: BertGeometry, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, g.hidden_size)
        self.LayerNorm = nn.LayerNorm(g.hidden_size, eps=g.layer_norm_eps)
        self.dropout = nn.Dropout(g.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """``attention.self`` and ``attention.output``."""

    def __init__(self, g: BertGeometry) -> None:
        super().__init__()
        self.self = BertSelfAttention(g)
        self.output = BertSelfOutput(g, g.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class BertIntermediate(nn.Module):
    """The feed-forward expansion with its activation."""

    def __init__(self, g: BertGeometry) -> None:
        super().__init__()
        self.dense = nn.Linear(g.hidden_size, g.intermediate_size)
        self.act = ACTIVATIONS[g.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One post-LN transformer layer: attention, then feed-forward, each with residual + LayerNorm."""

    def __init__(self, g: BertGeometry) -> None:
        super().__init__()
        self.attention = BertAttention(g)
        self.intermediate = BertIntermediate(g)
        self.output = BertSelfOutput(g, g.intermediate_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        h = self.attention(x, bias)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    """The stack of layers (``encoder.layer.N``)."""

    def __init__(self, g: BertGeometry) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(g) for _ in range(g.num_hidden_layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, bias)
        return x


class BertPooler(nn.Module):
    """The published checkpoint carries BERT's pooler; loaded for the interface, unused by Text3DSAM."""

    def __init__(self, g: BertGeometry) -> None:
        super().__init__()
        self.dense = nn.Linear(g.hidden_size, g.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertTextEncoder(nn.Module):
    """BERT as the published checkpoint holds it (``embeddings``, ``encoder``, ``pooler``): ids -> hidden states."""

    def __init__(self, config: Mapping[str, Any] | BertGeometry) -> None:
        super().__init__()
        self.config = config if isinstance(config, BertGeometry) else BertGeometry.from_dict(config)
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.pooler = BertPooler(self.config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation (normal with ``initializer_range``, zero biases, unit LayerNorms), as in
        training from scratch; loading a checkpoint replaces every tensor (and skips this on the meta device)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif (isinstance(module, nn.Embedding) and module.padding_idx is not None
              and module.weight.device.type != "meta"):
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids (+ 0/1 mask) -> (B, L, hidden) last hidden states."""
        x = self.embeddings(input_ids)
        bias = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # additive mask, as BERT: 0 where attended, the dtype's minimum on padding
            bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
            bias.masked_fill_(attention_mask == 0, torch.finfo(x.dtype).min)
            bias = bias[:, None, None, :]
        return self.encoder(x, bias)


def build_text_encoder(text_config: Mapping[str, Any]) -> BertTextEncoder:
    """An untrained BERT text encoder (with pooler, as published) of the given geometry."""
    return BertTextEncoder(text_config)


def build_text_projector(text_dim: int, embed_dim: int) -> nn.Sequential:
    """Linear-LayerNorm-GELU-Linear from the text width to the decoder width (``text_projector.{0,1,3}``)."""
    return nn.Sequential(nn.Linear(text_dim, embed_dim), nn.LayerNorm(embed_dim), nn.GELU(),
                         nn.Linear(embed_dim, embed_dim))
