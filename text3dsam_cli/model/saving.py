"""Model -> checkpoint folder: ``config.json``, ``model.safetensors`` and the tokenizer files.

Kept apart from :mod:`text3dsam_cli.model.loading` (which builds :class:`~text3dsam_cli.model.Text3DSAM`) so
that ``Text3DSAM.save_pretrained`` can use it without an import cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from text3dsam_cli.io.atomic import write_json, write_text
from text3dsam_cli.model.tokenizer import WordPieceTokenizer


def save_model(model: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` (with ``text_config``), ``model.safetensors`` and tokenizer files into ``folder``."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["text_config"] = dict(model.config.text_config or {})
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; models are meant to be shared
    os.replace(tmp, out / "model.safetensors")
    write_json(out / "config.json", config)
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, out)
    return out


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Tokenizer files: a plain ``vocab.txt`` (that the authors' ``BertTokenizer`` reads too) and its configs."""
    if isinstance(tokenizer, WordPieceTokenizer):
        tokenizer.save_pretrained(folder)
        return
    tokenizer.save_pretrained(str(folder))  # another tokenizer object (e.g. transformers'): keep its files
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    write_text(folder / "vocab.txt", "".join(t + "\n" for t in tokens))
    special = {name: str(getattr(tokenizer, name)) for name in
               ("cls_token", "mask_token", "pad_token", "sep_token", "unk_token")}
    write_json(folder / "special_tokens_map.json", special)
