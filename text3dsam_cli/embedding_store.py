"""Prompt-embedding store: the projected text embedding of each prompt, kept on disk between runs.

A run whose prompts are all stored never tokenizes or runs the text encoder (and never imports a tokenizer).
Vectors are keyed by a fingerprint of everything that decides a prompt's embedding (:func:`text_fingerprint`:
the resolved text config, the text-encoder and projector tensors, the tokenizer files and settings, and the
version of the text path's code), so another or finetuned model never reuses a model's vectors. One file per
fingerprint, ``<cache>/embeddings/<fingerprint>.npz`` (arrays ``prompts`` and ``vectors``, no pickles), where
``<cache>`` is ``$TEXT3DSAM_CACHE``, else ``$XDG_CACHE_HOME/text3dsam``, else ``~/.cache/text3dsam``.

Concurrent writers (shards of one job) merge under an advisory file lock and replace the file atomically, so a
reader sees either the old or the new store, never a partial one. An unreadable store, or one whose vectors have
the wrong shape or dtype for the model, is rebuilt with one warning naming the file;
a store that cannot be written is skipped with one warning. Embeddings are computed and stored in float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from text3dsam_cli.model import Text3DSAM

log = logging.getLogger(__name__)

#: Model-state prefixes whose tensors decide a prompt's embedding.
TEXT_PREFIXES = ("text_encoder.", "text_projector.")
STORE_VERSION = "1"


def cache_root() -> Path:
    """``$TEXT3DSAM_CACHE``, else ``$XDG_CACHE_HOME/text3dsam``, else ``~/.cache/text3dsam``."""
    explicit = os.environ.get("TEXT3DSAM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "text3dsam"
    return Path.home() / ".cache" / "text3dsam"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    import torch

    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def text_fingerprint(model: Text3DSAM) -> str:
    """Hash of everything that maps a prompt to its embedding: the resolved text config (every field, wherever it
    came from: the checkpoint, the HF cache of the text model, or the tensors), the tokenizer files and the
    settings prompts are tokenized with, the text-encoder and projector tensors, the projector's width, and
    :data:`~text3dsam_cli.model.text_encoder.TEXT_PATH_VERSION` (the text path's code)."""
    from text3dsam_cli.model.text3dsam import PROMPT_MAX_LENGTH
    from text3dsam_cli.model.text_encoder import TEXT_PATH_VERSION

    digest = hashlib.sha256(f"text3dsam-embeddings-v{STORE_VERSION}\0code-v{TEXT_PATH_VERSION}\0".encode())
    text_config = json.dumps(model.config.text_config, sort_keys=True, default=repr, allow_nan=True)
    digest.update(f"text_config {text_config}\0embed_dim {model.config.embed_dim}\0".encode())
    digest.update(f"tokenize max_length={PROMPT_MAX_LENGTH} truncation padding=longest\0".encode())
    digest.update(model.tokenizer_digest().encode() + b"\0")
    for key, tensor in model.state_dict().items():
        if key.startswith(TEXT_PREFIXES):
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An advisory exclusive lock on ``path`` (POSIX); a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: atomic replacement alone (a concurrent writer may drop the other's entries)
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EmbeddingStore:
    """Prompt -> float32 vector for one text-encoder fingerprint, backed by one ``.npz`` file."""

    def __init__(self, fingerprint: str, root: str | os.PathLike[str] | None = None, width: int | None = None) -> None:
        self.fingerprint = fingerprint
        self.width = width  # the vectors' length (the model's embed_dim); None: not checked
        self.folder = Path(root) if root is not None else cache_root() / "embeddings"
        self.path = self.folder / f"{fingerprint}.npz"
        self._vectors: dict[str, np.ndarray] | None = None
        self._warned = False

    @classmethod
    def for_model(cls, model: Text3DSAM, root: str | os.PathLike[str] | None = None) -> EmbeddingStore:
        """The store of ``model``'s text encoder (vectors of length ``embed_dim``)."""
        return cls(text_fingerprint(model), root, width=int(model.config.embed_dim))

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True

    def _read(self) -> dict[str, np.ndarray]:
        """The stored vectors (empty if there is no store yet; rebuilt with one warning if unreadable)."""
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as data:
                prompts = [str(p) for p in data["prompts"]]
                vectors = np.asarray(data["vectors"])
                stamp = str(data["fingerprint"]) if "fingerprint" in data.files else None
            if vectors.ndim != 2 or vectors.shape[0] != len(prompts) or stamp != self.fingerprint:
                raise ValueError("inconsistent contents")
            if vectors.dtype != np.float32:
                raise ValueError(f"vectors are {vectors.dtype}, not float32")
            if self.width is not None and vectors.shape[1] != self.width:
                raise ValueError(f"vectors of length {vectors.shape[1]}, but the model's are {self.width}")
            if not np.isfinite(vectors).all():
                raise ValueError("non-finite vectors")
        except Exception as exc:  # any damage: start over (the vectors are recomputed on demand)
            self._warn(f"prompt-embedding store {self.path} is unreadable ({exc}); rebuilding it")
            return {}
        return dict(zip(prompts, vectors))

    def _loaded(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            self._vectors = self._read()
        return self._vectors

    def __len__(self) -> int:
        return len(self._loaded())

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._loaded()

    def get(self, prompts: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those ``prompts`` that are in the store."""
        vectors = self._loaded()
        return {p: vectors[p] for p in prompts if p in vectors}

    def put(self, new: Mapping[str, np.ndarray]) -> None:
        """Add vectors: merge with what other processes stored meanwhile, then replace the file atomically."""
        if not new:
            return
        fresh = {str(p): np.asarray(v, dtype=np.float32).reshape(-1) for p, v in new.items()}
        if self.width is not None and any(v.shape != (self.width,) for v in fresh.values()):
            raise ValueError(f"prompt embeddings must have length {self.width}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with _locked(self.folder / f".{self.fingerprint}.lock"):
                merged = self._read()
                merged.update(fresh)
                self._write(merged)
        except OSError as exc:
            self._warn(f"cannot write the prompt-embedding store in {self.folder} ({exc.strerror or exc}); "
                       "continuing without it")
            merged = {**self._loaded(), **fresh}
        self._vectors = merged

    def _write(self, vectors: Mapping[str, np.ndarray]) -> None:
        prompts = list(vectors)
        width = len(next(iter(vectors.values())))
        matrix = np.stack([vectors[p] for p in prompts]) if prompts else np.zeros((0, width), np.float32)
        tmp = self.folder / f".tmp-{secrets.token_hex(4)}-{self.path.name}"
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, prompts=np.asarray(prompts, dtype=str), vectors=matrix.astype(np.float32),
                         fingerprint=np.asarray(self.fingerprint))
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def phrasings_from_prompts_json(path: str | os.PathLike[str]) -> list[str]:
    """Every phrasing in a challenge prompts JSON (``{dataset: {label: [phrasings...]}}``), first-seen order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    found: dict[str, None] = {}

    def walk(node: Any) -> None:
        if isinstance(node, str):
            if node.strip():
                found.setdefault(node, None)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key != "instance_label":
                    walk(value)

    walk(data)
    return list(found)


def fill_embedding_store(model: Text3DSAM, phrasings: Sequence[str], store: EmbeddingStore | None = None,
                         batch_size: int = 64) -> int:
    """Compute and store the embeddings of ``phrasings`` not yet stored for ``model``; returns how many.

    Used by ``text3dsam download`` to fill the store with the whole training vocabulary.
    """
    import torch

    store = store or EmbeddingStore.for_model(model)
    todo = [p for p in dict.fromkeys(phrasings) if p.strip() and p not in store]
    computed: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            vectors = model.encode_prompts(batch).float().cpu().numpy()
            computed.update(zip(batch, vectors))
    store.put(computed)
    return len(computed)
