"""Checkpoint folder -> model: config and text-config resolution, strict tensor check, tokenizer (saving is
:mod:`text3dsam_cli.model.saving`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from text3dsam_cli.errors import CheckpointError
from text3dsam_cli.model.config import Text3DSAMConfig
from text3dsam_cli.model.hub import ModelLocation, hub_cache_dir, hub_offline, resolve_model
from text3dsam_cli.model.text3dsam import Text3DSAM
from text3dsam_cli.model.text_encoder import KNOWN_HEADS, infer_text_config, text_config_from_hub
from text3dsam_cli.model.tokenizer import WordPieceTokenizer

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``model.safetensors`` (or a sharded index, or ``pytorch_model.bin`` loaded weights-only)."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        try:
            return load_file(folder / "model.safetensors")
        except Exception as exc:
            raise CheckpointError(f"cannot read weights: {exc}", folder / "model.safetensors") from exc
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(folder / shard))
        return tensors
    if (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read weights: {exc}", folder / "pytorch_model.bin") from exc
    raise CheckpointError("no weights found (expected model.safetensors or pytorch_model.bin)", folder)


def read_config(folder: Path) -> Text3DSAMConfig:
    """The folder's ``config.json`` as a :class:`Text3DSAMConfig` (refusing other model types)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError("no config.json: not a Text3DSAM checkpoint folder", folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable config.json ({exc})", path) from exc
    if data.get("model_type", "med3d_seg") != "med3d_seg":
        raise CheckpointError(f"model_type is {data.get('model_type')!r}, expected 'med3d_seg'", path)
    try:
        return Text3DSAMConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid config ({exc})", path) from exc


def resolve_text_config(config: Text3DSAMConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """BERT config: stored ``text_config`` > tensor geometry with heads from the HF cache > known table > hub."""
    if config.text_config:
        return dict(config.text_config)
    try:
        inferred = infer_text_config(tensors, config.text_model)
    except KeyError as exc:
        raise CheckpointError(f"missing tensor {exc.args[0]} (needed to size the text encoder)") from exc
    cached = text_config_from_hub(config.text_model, str(hub_cache_dir()), allow_network=False)
    if cached is None and config.text_model not in KNOWN_HEADS and not hub_offline():
        cached = text_config_from_hub(config.text_model, str(hub_cache_dir()), allow_network=True)
    if cached:
        # Geometry comes from the tensors (the vocabulary follows the shipped tokenizer); the rest from the hub.
        for key in ("num_attention_heads", "hidden_act", "layer_norm_eps", "pad_token_id"):
            if key in cached:
                inferred[key] = cached[key]
    return inferred


def check_state_dict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming the first few of each.

    :func:`load_model` lets ``load_state_dict(strict=True)`` do the check and calls this only to word its
    refusal (checking first cost 1-17 ms per load, measured; see ``docs/dependencies.md``).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [f"{k} {tuple(tensors[k].shape)} (model expects {tuple(v.shape)})"
                  for k, v in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing tensor", missing), ("unexpected tensor", unexpected),
                         ("mis-shaped tensor", mismatched)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}{'s' if len(items) > 1 else ''} {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError("checkpoint does not match the Text3DSAM architecture: " + "; ".join(problems),
                              where)


def load_tokenizer(folder: Path, text_model: str) -> WordPieceTokenizer:
    """The BERT WordPiece tokenizer shipped with the checkpoint (else the text model's, from the HF cache)."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        try:
            return WordPieceTokenizer.from_folder(folder)
        except Exception as exc:
            raise CheckpointError(f"cannot load the tokenizer ({exc})", folder) from exc
    try:
        return WordPieceTokenizer.from_folder(cached_tokenizer_folder(text_model))
    except Exception as exc:
        raise CheckpointError(f"no tokenizer files (vocab.txt) and none cached for {text_model}", folder) from exc


def cached_tokenizer_folder(text_model: str) -> Path:
    """The folder holding ``text_model``'s vocab.txt: a local folder, else its HF cache snapshot (or download)."""
    local = Path(text_model).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import hf_hub_download

    offline = hub_offline()
    path = Path(hf_hub_download(text_model, "vocab.txt", cache_dir=str(hub_cache_dir()), local_files_only=offline))
    with contextlib.suppress(Exception):  # optional: BERT defaults (lowercasing) apply without it
        hf_hub_download(text_model, "tokenizer_config.json", cache_dir=str(hub_cache_dir()),
                        local_files_only=offline)
    return path.parent


def tokenizer_digest(folder: Path) -> str | None:
    """A hash of the tokenizer files in ``folder`` (part of the prompt-embedding fingerprint), None if absent."""
    import hashlib

    digest = hashlib.sha256()
    found = False
    for name in (*TOKENIZER_FILES, "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
            found = True
    return digest.hexdigest() if found else None


#: ``torch.nn.init`` functions that module constructors call to fill their parameters.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def skeleton_construction() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers (the checkpoint fills every tensor).

    Initialisers on meta tensors would route through torch's reference implementations, which import
    ``torch._dynamo`` (seconds of start-up); skipping them also skips work whose result is thrown away.
    """
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS if hasattr(init, name)}
    try:
        for name in saved:
            setattr(init, name, _keep)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def load_model(source: str | os.PathLike[str] | None = None, revision: str | None = None,
               device: str | torch.device = "cpu", download: bool = True) -> Text3DSAM:
    """Load a Text3DSAM model in eval mode from a checkpoint folder or a hub repo id.

    ``source`` defaults to ``$TEXT3DSAM_MODEL`` or the published ``MagicXin/Text3DSAM``. The tokenizer is
    attached as ``model.tokenizer`` and where the weights came from as ``model.source``.
    """
    location = source if isinstance(source, ModelLocation) else resolve_model(source, revision, download)
    folder = location.path
    config = read_config(folder)
    tensors = read_state_dict(folder)
    config.text_config = resolve_text_config(config, tensors)
    try:
        with skeleton_construction():  # no random initialisation: every tensor comes from the checkpoint
            model = Text3DSAM(config)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"invalid text-encoder config ({exc})", folder / "config.json") from exc
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:  # torch's strict check refused the tensors: name them in one line
        check_state_dict(model, tensors, folder)
        reason = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint does not match the Text3DSAM architecture: {reason}", folder) from exc
    # The tokenizer is loaded on first use: a run whose prompts are all in the embedding store never needs it.
    has_files = any((folder / name).is_file() for name in TOKENIZER_FILES)
    if has_files:
        model.set_tokenizer_loader(lambda: load_tokenizer(folder, config.text_model), tokenizer_digest(folder))
    else:  # the text model's tokenizer from the HF cache: resolved now, so a missing one fails at load time,
        # and its files (which the cache can update) are hashed into the prompt-embedding fingerprint
        try:
            hub_folder = cached_tokenizer_folder(config.text_model)
        except Exception as exc:
            raise CheckpointError(f"no tokenizer files (vocab.txt) and none cached for {config.text_model}",
                                  folder) from exc
        model.set_tokenizer_loader(lambda: load_tokenizer(hub_folder, config.text_model),
                                   tokenizer_digest(hub_folder) or f"hub:{config.text_model}")
        model.tokenizer  # noqa: B018
    model.source = location.describe()
    return model.to(device).eval()
