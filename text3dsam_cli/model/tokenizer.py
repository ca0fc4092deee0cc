"""BERT WordPiece tokenisation with the ``tokenizers`` package alone (no transformers import).

:class:`WordPieceTokenizer` builds the same pipeline as transformers' ``BertTokenizerFast`` from a ``vocab.txt``
(BERT normalisation: clean text, CJK spacing, lowercasing and accent stripping when ``do_lower_case``; BERT
pre-tokenisation; WordPiece with ``[UNK]``; ``[CLS] ... [SEP]``; truncation to 512), or loads a ``tokenizer.json``
as is. It implements the slice of the transformers tokenizer API this package uses. ``tests/test_text_path.py``
proves its ids equal to ``BertTokenizerFast`` on every phrasing of the challenge prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli.io.atomic import write_json, write_text

SPECIAL_TOKENS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                  "mask_token": "[MASK]"}
MAX_LENGTH = 512


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}
    return {}


class WordPieceTokenizer:
    """A BERT tokenizer on ``tokenizers.Tokenizer``: call it like transformers' fast tokenizer."""

    def __init__(self, backend: Any, lowercase: bool = True, model_max_length: int = MAX_LENGTH) -> None:
        self.backend = backend
        self.lowercase = lowercase
        self.model_max_length = model_max_length
        for name, token in SPECIAL_TOKENS.items():
            setattr(self, name, token)
        self.pad_token_id = backend.token_to_id(self.pad_token) or 0

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab: str | os.PathLike[str], lowercase: bool = True,
                   model_max_length: int = MAX_LENGTH) -> WordPieceTokenizer:
        """BERT's pipeline around a ``vocab.txt`` (one token per line, ids in line order)."""
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        path = Path(vocab)
        tokens = path.read_text(encoding="utf-8").splitlines()
        table = {token: i for i, token in enumerate(tokens)}
        missing = [t for t in SPECIAL_TOKENS.values() if t not in table]
        if missing:
            raise ValueError(f"{path} lacks the special token(s) {', '.join(missing)}")
        tokenizer = Tokenizer(WordPiece(table, unk_token="[UNK]", max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                          strip_accents=None, lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", table["[CLS]"]), ("[SEP]", table["[SEP]"])])
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        # Special tokens written in the text are matched as such (unnormalised), as transformers does.
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
        return cls(tokenizer, lowercase, model_max_length)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> WordPieceTokenizer:
        """``tokenizer.json`` if present, else ``vocab.txt`` with ``tokenizer_config.json``'s ``do_lower_case``."""
        folder = Path(folder)
        config = _read_tokenizer_config(folder)
        max_length = int(config.get("model_max_length", MAX_LENGTH) or MAX_LENGTH)
        max_length = min(max_length, MAX_LENGTH) if max_length > 10**6 else max_length
        lowercase = bool(config.get("do_lower_case", True))
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
            backend.no_truncation()
            backend.no_padding()
            return cls(backend, lowercase, max_length)
        if (folder / "vocab.txt").is_file():
            return cls.from_vocab(folder / "vocab.txt", lowercase, max_length)
        raise FileNotFoundError(f"no vocab.txt or tokenizer.json in {folder}")

    # -- the transformers-like API ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def get_vocab(self) -> dict[str, int]:
        """Token -> id."""
        return dict(self.backend.get_vocab(with_added_tokens=True))

    def encode_ids(self, texts: Sequence[str], max_length: int | None = MAX_LENGTH) -> list[list[int]]:
        """Ids of each text with [CLS]/[SEP], truncated to ``max_length`` (keeping the final [SEP])."""
        encodings = self.backend.encode_batch([str(t) for t in texts])
        out = []
        for enc in encodings:
            ids = list(enc.ids)
            if max_length is not None and len(ids) > max_length:
                ids = [*ids[: max_length - 1], ids[-1]]
            out.append(ids)
        return out

    def __call__(self, text: str | Sequence[str], padding: bool | str = False, truncation: bool = True,
                 max_length: int | None = None, return_tensors: str | None = None) -> dict[str, Any]:
        """``{"input_ids", "attention_mask"}``: lists (one text or several), or (K, L) int64 tensors (``"pt"``).

        ``padding``: False, True/"longest" (to the longest text) or "max_length"; truncation keeps [SEP].
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        limit = (max_length or self.model_max_length) if truncation else None
        ids = self.encode_ids(texts, limit)
        if padding == "max_length":
            width = max_length or self.model_max_length
        elif padding in (True, "longest"):
            width = max((len(i) for i in ids), default=0)
        else:
            width = None
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported")
        if width is None:
            if return_tensors is not None and len({len(i) for i in ids}) > 1:
                raise ValueError("texts of different lengths need padding=True for tensors")
            masks = [[1] * len(i) for i in ids]
            if return_tensors is None:
                return {"input_ids": ids[0] if single else ids,
                        "attention_mask": masks[0] if single else masks}
            width = len(ids[0]) if ids else 0
        array = np.full((len(ids), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            array[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.from_numpy(array), "attention_mask": torch.from_numpy(mask)}
        if return_tensors == "np":
            return {"input_ids": array, "attention_mask": mask}
        listed = {"input_ids": array.tolist(), "attention_mask": mask.tolist()}
        return {k: v[0] for k, v in listed.items()} if single else listed

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Token ids -> text (WordPiece pieces joined)."""
        values = [int(i) for i in np.asarray(ids).ravel()]
        return str(self.backend.decode(values, skip_special_tokens=skip_special_tokens))

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """``vocab.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (BERT's plain layout)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        vocab = self.get_vocab()
        tokens = sorted(vocab, key=vocab.__getitem__)
        write_text(out / "vocab.txt", "".join(t + "\n" for t in tokens))
        config = {"do_lower_case": self.lowercase, "model_max_length": self.model_max_length,
                  "tokenizer_class": "BertTokenizer", **SPECIAL_TOKENS}
        write_json(out / "tokenizer_config.json", config)
        write_json(out / "special_tokens_map.json", SPECIAL_TOKENS)
