"""The text path on torch and ``tokenizers`` alone equals transformers' BERT (imported here only) and the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DATA, REFERENCE

from text3dsam_cli.embedding_store import phrasings_from_prompts_json
from text3dsam_cli.model.text_encoder import BertTextEncoder
from text3dsam_cli.model.tokenizer import WordPieceTokenizer

PROMPTS_JSON = DATA / "prompts" / "CVPR25_TextSegFMData_with_class.json"
ODD_TEXTS = ["", "  Liver  ", "Left KIDNEY", "naïve café Ångström", "tumour/lesion (T2-w), 5mm", "肝脏 liver",
             "a\tb\nc", "x" * 300, "supercalifragilisticexpialidocious " * 200, "[CLS] [SEP] [PAD] [MASK]"]


@pytest.fixture(scope="module")
def phrasings() -> list[str]:
    """Every phrasing of the challenge prompts JSON, duplicates included (as the training data draws them)."""
    data = json.loads(PROMPTS_JSON.read_text())
    return [text for classes in data.values() for key, texts in classes.items() if key != "instance_label"
            for text in (texts if isinstance(texts, list) else [texts])]


@pytest.fixture(scope="module")
def hf_tokenizer(small_checkpoint):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast.from_pretrained(str(small_checkpoint))


def test_vocabulary_has_all_phrasings(phrasings):
    assert len(phrasings) == 3186
    assert phrasings_from_prompts_json(PROMPTS_JSON) == list(dict.fromkeys(phrasings))  # 2905 distinct


def test_wordpiece_ids_equal_transformers_on_every_phrasing(small_checkpoint, hf_tokenizer, phrasings):
    ours = WordPieceTokenizer.from_folder(small_checkpoint)
    texts = [*phrasings, *ODD_TEXTS]
    expected = hf_tokenizer(texts, truncation=True, max_length=512)["input_ids"]
    assert ours(texts, truncation=True, max_length=512)["input_ids"] == expected
    # padded tensors, as the model is fed
    a = ours(texts[:64], padding=True, truncation=True, max_length=512, return_tensors="pt")
    b = hf_tokenizer(texts[:64], padding=True, truncation=True, max_length=512, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert len(ours) == len(hf_tokenizer)
    assert max(len(ids) for ids in expected) == 512  # the truncation case is exercised


def test_wordpiece_from_bare_vocab_equals_folder(small_checkpoint):
    a = WordPieceTokenizer.from_folder(small_checkpoint)
    b = WordPieceTokenizer.from_vocab(REFERENCE / "vocab.txt")
    assert a(ODD_TEXTS)["input_ids"] == b(ODD_TEXTS)["input_ids"]
    assert a("left ventricle")["input_ids"] == [101, 2187, 18834, 7277, 2571, 102]
    assert b.decode(b("left ventricle")["input_ids"], skip_special_tokens=True) == "left ventricle"


def test_wordpiece_save_round_trip(small_checkpoint, tmp_path):
    a = WordPieceTokenizer.from_folder(small_checkpoint)
    a.save_pretrained(tmp_path)
    b = WordPieceTokenizer.from_folder(tmp_path)
    assert (tmp_path / "vocab.txt").read_bytes() == (REFERENCE / "vocab.txt").read_bytes()
    assert a(ODD_TEXTS)["input_ids"] == b(ODD_TEXTS)["input_ids"]


def test_bert_encoder_equals_transformers_bert(small_model, phrasings):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(**{k: v for k, v in small_model.config.text_config.items() if k != "model_type"})
    reference = transformers.BertModel(config, add_pooling_layer=True).eval()
    ours = small_model.text_encoder
    state = ours.state_dict()
    assert list(state) == [k for k in reference.state_dict() if k in state]  # same names, same order
    missing = reference.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    assert all(k.endswith(("position_ids", "token_type_ids")) for k in missing.missing_keys)
    texts = phrasings[::40] + ODD_TEXTS[:6]  # mixed lengths: padding and attention masks are exercised
    tokens = small_model.tokenize(texts)
    with torch.inference_mode():
        expected = reference(**tokens).last_hidden_state
        got = ours(tokens["input_ids"], tokens["attention_mask"])
    mask = tokens["attention_mask"].bool()
    diff = (got - expected).abs()[mask].max().item()
    assert diff < 1e-6, diff  # measured: 0 (bit-identical) on CPU with torch 2.13
    # and the [CLS] state the model uses
    assert (got[:, 0] - expected[:, 0]).abs().max().item() < 1e-6


def test_bert_encoder_has_no_random_state_in_training_mode_without_dropout(small_model):
    encoder = BertTextEncoder(small_model.text_encoder.config)
    encoder.load_state_dict(small_model.text_encoder.state_dict())
    encoder.train()
    for module in encoder.modules():  # dropout off: training mode must compute the eval function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for layer in encoder.encoder.layer:
        layer.attention.self.dropout_p = 0.0
    tokens = small_model.tokenize(["liver", "left kidney in abdominal CT"])
    got = encoder(tokens["input_ids"], tokens["attention_mask"])
    with torch.inference_mode():
        expected = small_model.text_encoder(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(got.detach(), expected, atol=1e-6, rtol=0)
    got[:, 0].sum().backward()  # differentiable
    assert encoder.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("variant", ["small", "full"])
def test_text_embeddings_equal_reference(variant, request):
    model = request.getfixturevalue(f"{variant}_model")
    ref = np.load(REFERENCE / f"vectors_{variant}.npz")
    for i in range(2):
        ids = torch.from_numpy(ref[f"input_ids_{i}"])
        mask = torch.from_numpy(ref[f"attention_mask_{i}"])
        with torch.inference_mode():
            padded = model.encode_text(ids, mask).numpy()
            n = int(mask.sum())
            dynamic = model.encode_text(ids[:, :n], mask[:, :n]).numpy()
        # 0 on the machine that wrote the reference; float32 rounding where the CPU's matmul kernels differ
        # (1.7e-6 on an AVX-512 AMD EPYC, values of magnitude ~1): a few ulp, far below any real error
        assert np.abs(padded - ref[f"text_embedding_{i}"]).max() < 1e-5
        assert np.abs(dynamic - ref[f"text_embedding_{i}"]).max() < 1e-5


def test_cosine_schedule_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from text3dsam_cli.training.trainer import cosine_schedule_with_warmup

    def rates(make):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=0.1)
        schedule = make(optimizer)
        out = []
        for _ in range(60):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    ours = rates(lambda o: cosine_schedule_with_warmup(o, 7, 50))
    theirs = rates(lambda o: transformers.get_cosine_schedule_with_warmup(o, 7, 50))
    assert ours == pytest.approx(theirs, abs=1e-12)
