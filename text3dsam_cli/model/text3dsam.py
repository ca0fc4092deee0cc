"""``Text3DSAM``: the assembled model with separate ``encode_image`` / ``encode_text`` / ``decode`` steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from text3dsam_cli.model.config import Text3DSAMConfig
from text3dsam_cli.model.decoder import ImageContext, SegDecoder
from text3dsam_cli.model.image_encoder import ImageEncoder
from text3dsam_cli.model.saving import save_model
from text3dsam_cli.model.text_encoder import build_text_encoder, build_text_projector

#: Longest token sequence a prompt is cut to (part of the prompt-embedding fingerprint).
PROMPT_MAX_LENGTH = 512

class Text3DSAM(nn.Module):
    """Text-prompted 3-D segmentation model (the published ``Med3DSeg``).

    Attribute names (``image_encoder``, ``text_encoder``, ``text_projector``, ``seg_decoder``) are the
    checkpoint's key prefixes. ``tokenizer`` is attached by :func:`text3dsam_cli.model.load_model` (loaded on
    first use, so that a run whose prompt embeddings are all stored never imports a tokenizer).
    """

    def __init__(self, config: Text3DSAMConfig) -> None:
        super().__init__()
        if config.text_config is None:
            raise ValueError("config.text_config must be resolved before building the model")
        self.config = config
        self.image_encoder = ImageEncoder(config.image_encoder)
        self.text_encoder = build_text_encoder(config.text_config)
        self.text_projector = build_text_projector(config.text_config["hidden_size"], config.embed_dim)
        self.seg_decoder = SegDecoder(config.embed_dim, config.feat_size, config.pass_num,
                                      config.transformer_depth, config.mlp_dim, config.num_heads)
        self._tokenizer: Any = None
        self._tokenizer_loader: Callable[[], Any] | None = None
        self._tokenizer_digest: str | None = None
        self.source: dict[str, Any] = {}

    @property
    def tokenizer(self) -> Any:
        """The WordPiece tokenizer (loaded on first access when attached lazily), or None."""
        if self._tokenizer is None and self._tokenizer_loader is not None:
            self._tokenizer = self._tokenizer_loader()
            self._tokenizer_loader = None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer, self._tokenizer_loader, self._tokenizer_digest = value, None, None

    def set_tokenizer_loader(self, loader: Callable[[], Any], digest: str | None = None) -> None:
        """Attach a tokenizer that is built on first use; ``digest`` identifies its files without loading it."""
        self._tokenizer, self._tokenizer_loader, self._tokenizer_digest = None, loader, digest

    def tokenizer_digest(self) -> str:
        """A stable identifier of the tokenizer (file hash when known, else a hash of its vocabulary)."""
        if self._tokenizer_digest is None:
            import hashlib

            tok = self.tokenizer
            if tok is None:
                return "none"
            vocab = tok.get_vocab()
            text = "\n".join(sorted(vocab, key=vocab.__getitem__))
            lower = getattr(tok, "lowercase", getattr(tok, "do_lower_case", None))
            self._tokenizer_digest = hashlib.sha256(f"{lower}\n{text}".encode()).hexdigest()
        return self._tokenizer_digest

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.parameters()).device

    def encode_image(self, image: torch.Tensor) -> ImageContext:
        """(1,1,D,H,W) float image in 0..255 at ``config.image_size`` -> decoder context for that image."""
        expected = tuple(self.config.image_size)
        if tuple(image.shape[2:]) != expected:
            raise ValueError(f"image must be resized to {expected} first, got {tuple(image.shape[2:])}")
        return self.seg_decoder.prepare(self.image_encoder(image))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (K,L) -> (K, embed_dim) prompt embeddings ([CLS] state through the projector)."""
        hidden = self.text_encoder(input_ids, attention_mask)
        return self.text_projector(hidden[:, 0])

    def tokenize(self, prompts: list[str], max_length: int = PROMPT_MAX_LENGTH) -> dict[str, torch.Tensor]:
        """Tokenize with dynamic padding (the [CLS] embedding does not depend on padding length)."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached; load the model with load_model()")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device),
                "attention_mask": tokens["attention_mask"].to(self.device)}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Free-text prompts -> (K, embed_dim) embeddings."""
        tokens = self.tokenize(prompts)
        return self.encode_text(tokens["input_ids"], tokens["attention_mask"])

    def decode(self, ctx: ImageContext, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Image context + (K, embed_dim) prompt embeddings -> (K,1,D/4,H/4,W/4) low-resolution logits."""
        return self.seg_decoder(ctx, text_embeddings)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Training forward: (B,1,D,H,W) images with one prompt each -> (B,1,D/4,H/4,W/4) logits."""
        text = self.encode_text(input_ids, attention_mask)
        ctx = self.seg_decoder.prepare(self.image_encoder(image))
        return self.seg_decoder(ctx, text)

    @torch.no_grad()
    def generate(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The authors' ``generate``: low-resolution logits for (B,1,D,H,W) images and one prompt per image."""
        return self.forward(image, input_ids, attention_mask)

    def save_pretrained(self, folder: str) -> None:
        """Write ``config.json`` (with ``text_config``), ``model.safetensors`` and the tokenizer files."""
        save_model(self, folder)
