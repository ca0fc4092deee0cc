"""Where model weights come from: a local folder, or a Hugging Face repo id through the standard HF cache.

Downloads go through ``huggingface_hub`` so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``
(mirrors, proxies) and tokens (``HF_TOKEN`` or ``huggingface-cli login``) work as users expect; downloads are
resumable and show progress on stderr.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from text3dsam_cli import DEFAULT_MODEL
from text3dsam_cli.errors import ModelNotFoundError

#: Files of a model repository that inference and fine-tuning need.
MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin", "vocab.txt",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
MODEL_ENV = "TEXT3DSAM_MODEL"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelLocation:
    """A resolved model: the folder holding its files and where it came from."""

    path: Path
    source: str  # what the user asked for (folder or repo id)
    repo_id: str | None = None  # hub repo id, None for a local folder
    revision: str | None = None  # requested revision (branch, tag or commit), if any
    commit: str | None = None  # resolved commit hash of a hub snapshot

    def describe(self) -> dict[str, str | None]:
        """JSON-friendly description (for sidecars and ``text3dsam info``)."""
        return {"model": self.repo_id or str(self.path), "revision": self.revision, "commit": self.commit,
                "path": str(self.path)}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring ``HF_HUB_CACHE`` and ``HF_HOME`` at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def requested_model(source: str | os.PathLike[str] | None) -> str:
    """The model to use: the argument, else ``$TEXT3DSAM_MODEL``, else the published weights."""
    return str(source) if source else os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def resolve_model(source: str | os.PathLike[str] | None = None, revision: str | None = None,
                  download: bool = True) -> ModelLocation:
    """Find a model folder: a local path, or a repo id from the cache (downloading it if allowed and online)."""
    source = requested_model(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError("a model must be a folder holding config.json and the weights", path)
        return ModelLocation(path.resolve(), source)
    if not _REPO_ID.match(source):
        raise ModelNotFoundError("no such model folder (and not a Hugging Face repo id like owner/name)", source)
    return _snapshot(source, revision, download)


def _snapshot(repo_id: str, revision: str | None, download: bool) -> ModelLocation:
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    local_only = hub_offline() or not download
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES,
                                   cache_dir=str(cache), local_files_only=local_only)
    except Exception as exc:  # offline and not cached, no network, unknown repo or revision, auth
        raise ModelNotFoundError(_not_found_message(repo_id, revision, cache, local_only, exc)) from exc
    path = Path(folder)
    commit = path.name if path.parent.name == "snapshots" else None
    return ModelLocation(path, repo_id, repo_id, revision, commit)


def _not_found_message(repo_id: str, revision: str | None, cache: Path, local_only: bool,
                       exc: Exception) -> str:
    what = f"{repo_id}" + (f"@{revision}" if revision else "")
    if local_only:
        tried = f"looked in the Hugging Face cache {cache} (offline: HF_HUB_OFFLINE is set)"
    else:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        tried = f"looked in the cache {cache} and tried to download from {endpoint} ({reason[:200]})"
    return (f"model {what} not available: {tried}. Fix: run `text3dsam download {repo_id}` on a connected "
            f"machine and copy its cache (HF_HOME), pass --model PATH to a local checkpoint folder, or set "
            f"HF_ENDPOINT to a reachable mirror")


def download_model(repo_id: str | None = None, revision: str | None = None) -> ModelLocation:
    """Fetch a model repo into the cache (resumable, progress on stderr) and the text model's config too."""
    location = resolve_model(repo_id, revision, download=True)
    if location.repo_id is not None:
        _prefetch_text_config(location.path)
    return location


def _prefetch_text_config(folder: Path) -> None:
    """Cache the text encoder's config.json so offline loads need not guess its head count."""
    import json

    try:
        text_model = json.loads((folder / "config.json").read_text()).get("text_model")
        if text_model:
            from huggingface_hub import hf_hub_download

            hf_hub_download(text_model, "config.json", cache_dir=str(hub_cache_dir()))
    except Exception:  # optional: the loader can infer the geometry from the weights
        pass
