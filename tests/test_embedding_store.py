"""The on-disk prompt-embedding store: location, fingerprint, reuse, corruption, concurrency, cold imports."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHALLENGE

from text3dsam_cli.embedding_store import EmbeddingStore, cache_root, fill_embedding_store, text_fingerprint
from text3dsam_cli.inference import Segmenter

US = CHALLENGE / "US_Cardiac_patient0027_2CH_half_sequence.npz"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TEXT3DSAM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("TEXT3DSAM_CACHE")
    assert cache_root() == tmp_path / "x" / "text3dsam"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "text3dsam"


def test_fingerprint_follows_text_tensors_only(small_checkpoint):
    from text3dsam_cli.model import load_model

    model = load_model(small_checkpoint)
    base = text_fingerprint(model)
    assert text_fingerprint(load_model(small_checkpoint)) == base  # stable across loads
    with torch.no_grad():
        next(model.image_encoder.parameters()).add_(1.0)
        next(model.seg_decoder.parameters()).add_(1.0)
    assert text_fingerprint(model) == base
    with torch.no_grad():
        model.text_projector[3].bias[0] += 1e-6  # a finetune touching one number
    assert text_fingerprint(model) != base
    other = load_model(small_checkpoint)
    with torch.no_grad():
        other.text_encoder.encoder.layer[3].output.dense.weight[0, 0] += 1e-6
    assert text_fingerprint(other) not in (base, text_fingerprint(model))


def test_segmenter_reuses_stored_vectors(small_model):
    first = Segmenter(small_model, device="cpu")
    vectors = first.embed_prompts(["liver", "spleen", "liver"])
    store = first.embedding_store()
    assert store is not None and store.path.is_file() and len(store) == 2
    assert torch.equal(vectors[0], vectors[2])
    second = Segmenter(small_model, device="cpu")
    calls = []
    original = small_model.encode_prompts
    small_model.encode_prompts = lambda prompts: calls.append(prompts) or original(prompts)
    try:
        again = second.embed_prompts(["spleen", "liver", "pancreas"])
    finally:
        del small_model.encode_prompts
    assert calls == [["pancreas"]]  # only the new prompt is encoded
    torch.testing.assert_close(again[1], vectors[0], atol=0, rtol=0)
    torch.testing.assert_close(again[0], vectors[1], atol=0, rtol=0)
    assert len(EmbeddingStore.for_model(small_model)) == 3


def test_stored_vector_equals_fresh_encoding(small_model):
    Segmenter(small_model, device="cpu").embed_prompts(["left kidney"])
    stored = Segmenter(small_model, device="cpu").embed_prompts(["left kidney"])
    fresh = Segmenter(small_model, device="cpu", embedding_cache=False).embed_prompts(["left kidney"])
    assert torch.abs(stored - fresh).max().item() < 1e-6


def test_no_embedding_cache_writes_nothing(small_model):
    segmenter = Segmenter(small_model, device="cpu", embedding_cache=False)
    segmenter.embed_prompts(["liver"])
    assert segmenter.embedding_store() is None
    assert not (cache_root() / "embeddings").exists()


def test_corrupt_store_is_rebuilt_with_one_warning(small_model, caplog):
    Segmenter(small_model, device="cpu").embed_prompts(["liver"])
    store = EmbeddingStore.for_model(small_model)
    store.path.write_bytes(b"PK\x03\x04 this is not a zip file")
    caplog.set_level(logging.WARNING)
    segmenter = Segmenter(small_model, device="cpu")
    segmenter.embed_prompts(["liver", "spleen"])
    segmenter.embed_prompts(["kidney"])
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1
    assert len(EmbeddingStore.for_model(small_model)) == 3  # rebuilt and readable again


def test_store_with_wrong_contents_is_rebuilt(tmp_path, caplog):
    store = EmbeddingStore("f" * 32, tmp_path)
    store.put({"a": np.ones(4, np.float32)})
    np.savez(store.path, prompts=np.asarray(["a", "b"]), vectors=np.ones((1, 4), np.float32),
             fingerprint=np.asarray("f" * 32))
    caplog.set_level(logging.WARNING)
    assert EmbeddingStore("f" * 32, tmp_path).get(["a"]) == {}
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_unwritable_store_warns_and_continues(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = EmbeddingStore("e" * 32, blocker / "embeddings")  # its folder cannot be created
    caplog.set_level(logging.WARNING)
    store.put({"a": np.ones(3, np.float32)})
    store.put({"b": np.ones(3, np.float32)})
    assert sorted(store.get(["a", "b"])) == ["a", "b"]  # kept in memory
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1


def _put_many(args: tuple[str, int]) -> int:
    folder, worker = args
    store = EmbeddingStore("c" * 32, folder)
    for i in range(15):
        store.put({f"w{worker}-p{i}": np.full(8, worker * 100 + i, np.float32)})
    return worker


def test_concurrent_writers_lose_nothing(tmp_path):
    with ProcessPoolExecutor(max_workers=4) as pool:
        list(pool.map(_put_many, [(str(tmp_path), w) for w in range(4)]))
    store = EmbeddingStore("c" * 32, tmp_path)
    assert len(store) == 60
    assert store.get(["w3-p14"])["w3-p14"][0] == 314
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_fill_embedding_store(small_model):
    added = fill_embedding_store(small_model, ["liver", "spleen", "liver", "  "], batch_size=1)
    assert added == 2
    assert fill_embedding_store(small_model, ["liver", "kidney"]) == 1
    store = EmbeddingStore.for_model(small_model)
    fresh = Segmenter(small_model, device="cpu", embedding_cache=False).embed_prompts(["spleen"])[0].numpy()
    assert np.abs(store.get(["spleen"])["spleen"] - fresh).max() < 1e-5


def test_download_fills_store_from_vocabulary(small_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from text3dsam_cli.cli import app

    vocab = tmp_path / "prompts.json"
    vocab.write_text(json.dumps({"CT_X": {"1": ["Liver", "Liver in CT"], "2": ["Spleen"], "instance_label": 0}}))
    result = CliRunner().invoke(app, ["download", str(small_checkpoint), "--vocabulary", str(vocab)])
    assert result.exit_code == 0, result.output
    from text3dsam_cli.model import load_model

    store = EmbeddingStore.for_model(load_model(small_checkpoint))
    assert sorted(store.get(["Liver", "Liver in CT", "Spleen", "0"])) == ["Liver", "Liver in CT", "Spleen"]


WARM_RUN = """
import sys
from text3dsam_cli.cli import app
sys.argv = ["text3dsam", *sys.argv[1:]]
try:
    app(prog_name="text3dsam")  # not main(): it ends the process without returning
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
loaded = sorted(m for m in ("transformers", "tokenizers", "SimpleITK") if m in sys.modules)
print("LOADED=" + ",".join(loaded), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
def test_warm_run_never_imports_the_text_stack(small_checkpoint, tmp_path):
    env = {**os.environ, "TEXT3DSAM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", WARM_RUN, "segment", str(US), "left ventricle", "myocardium", "-m",
            str(small_checkpoint), "--device", "cpu", "-q"]

    def run(out: Path) -> str:
        result = subprocess.run([*args, "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stderr.splitlines() if line.startswith("LOADED=")][-1]

    # npz in, npz out: SimpleITK is never needed either
    assert run(tmp_path / "cold.npz") == "LOADED=tokenizers"  # cold: the tokenizer, never transformers
    assert run(tmp_path / "warm.npz") == "LOADED="  # warm: no text stack at all
    cold = np.load(tmp_path / "cold.npz")["segs"]
    warm = np.load(tmp_path / "warm.npz")["segs"]
    assert np.array_equal(cold, warm)


def _copy_with_text_config(checkpoint: Path, target: Path, **changes) -> Path:
    """A copy of ``checkpoint`` (same tensors, same tokenizer files) whose config.json states a text_config."""
    import shutil

    from text3dsam_cli.model import load_model

    shutil.copytree(checkpoint, target)
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"] = {**load_model(checkpoint).config.text_config, **changes}
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_a_changed_text_config_is_another_fingerprint_and_never_reuses_vectors(small_checkpoint, tmp_path):
    """The issue's probe: config.json with hidden_act relu and layer_norm_eps 0.5, same tensors."""
    from text3dsam_cli.model import load_model

    original = load_model(small_checkpoint)
    stated = load_model(_copy_with_text_config(small_checkpoint, tmp_path / "same"))
    changed = load_model(_copy_with_text_config(small_checkpoint, tmp_path / "relu", hidden_act="relu",
                                                layer_norm_eps=0.5))
    assert text_fingerprint(stated) == text_fingerprint(original)  # the same resolved config: the same vectors
    assert text_fingerprint(changed) != text_fingerprint(original)
    only_eps = load_model(_copy_with_text_config(small_checkpoint, tmp_path / "eps", layer_norm_eps=1e-5))
    assert len({text_fingerprint(m) for m in (original, changed, only_eps)}) == 3  # every field counts

    prompts = ["liver", "spleen"]
    first = Segmenter(original, device="cpu").embed_prompts(prompts)
    second = Segmenter(changed, device="cpu").embed_prompts(prompts)
    fresh = Segmenter(changed, device="cpu", embedding_cache=False).embed_prompts(prompts)
    assert torch.abs(second - fresh).max().item() < 1e-6  # the relu model's own vectors ...
    assert torch.abs(second - first).max().item() > 1e-3  # ... not the first checkpoint's


def test_fingerprint_covers_code_version_and_tokenize_settings(small_model, monkeypatch):
    import text3dsam_cli.model.text3dsam as text3dsam_module
    import text3dsam_cli.model.text_encoder as text_encoder_module

    base = text_fingerprint(small_model)
    monkeypatch.setattr(text_encoder_module, "TEXT_PATH_VERSION", "test-bump")
    bumped = text_fingerprint(small_model)
    monkeypatch.undo()
    monkeypatch.setattr(text3dsam_module, "PROMPT_MAX_LENGTH", 128)
    shorter = text_fingerprint(small_model)
    assert len({base, bumped, shorter}) == 3


@pytest.mark.parametrize(("vectors", "reason"), [
    (lambda n, width: np.ones((n, 10), np.float32), "vectors of length 10"),
    (lambda n, width: np.ones((n, width), np.float64), "not float32"),
])
def test_store_with_wrong_shape_or_dtype_under_a_valid_stamp_is_rebuilt(small_model, caplog, vectors, reason):
    store = EmbeddingStore.for_model(small_model)
    store.folder.mkdir(parents=True, exist_ok=True)
    width = small_model.config.embed_dim
    np.savez(store.path, prompts=np.asarray(["liver", "spleen"]), vectors=vectors(2, width),
             fingerprint=np.asarray(store.fingerprint))
    caplog.set_level(logging.WARNING)
    segmenter = Segmenter(small_model, device="cpu")
    got = segmenter.embed_prompts(["liver", "spleen"])  # was: RuntimeError: Sizes of tensors must match
    segmenter.embed_prompts(["kidney"])
    Segmenter(small_model, device="cpu").embed_prompts(["liver", "spleen", "kidney"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(store.path) in warnings[0] and reason in warnings[0], warnings
    assert got.shape == (2, width)
    fresh = Segmenter(small_model, device="cpu", embedding_cache=False).embed_prompts(["liver", "spleen"])
    assert torch.abs(got - fresh).max().item() < 1e-6
    with np.load(store.path) as data:  # rebuilt: right shape and dtype
        assert data["vectors"].shape == (3, width) and data["vectors"].dtype == np.float32


def test_text_config_from_the_hf_cache_is_in_the_fingerprint(small_checkpoint, monkeypatch):
    """No checkpoint file changes, but the cached config of the text model does: another fingerprint."""
    import text3dsam_cli.model.loading as loading
    from text3dsam_cli.model import load_model

    plain = text_fingerprint(load_model(small_checkpoint))
    monkeypatch.setattr(loading, "text_config_from_hub",
                        lambda *args, **kwargs: {"hidden_act": "relu", "layer_norm_eps": 0.5})
    cached = load_model(small_checkpoint)
    assert cached.config.text_config["hidden_act"] == "relu"
    assert text_fingerprint(cached) != plain
