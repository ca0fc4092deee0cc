"""Parameter-efficient fine-tuning: LoRA through peft (merged on save) and `--freeze decoder-only`, tiny real runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_training import US_CASE, _args, _cli, _log, npz_in_file, tiny_checkpoint, us_small  # noqa: F401

from text3dsam_cli.errors import UsageError
from text3dsam_cli.model import load_model
from text3dsam_cli.training import TrainingArguments, finetune, list_checkpoints, parse_freeze
from text3dsam_cli.training.lora import add_lora, count_parameters, default_lora_targets, has_lora, merge_lora

pytest.importorskip("peft")


def _forward(model, prompt: str = "left ventricle") -> torch.Tensor:
    torch.manual_seed(0)
    image = torch.rand(1, 1, *model.config.image_size) * 255
    tokens = model.tokenizer([prompt], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(image, tokens["input_ids"], tokens["attention_mask"])


def test_default_targets_are_attention_and_mlp_layers(small_model):
    targets = default_lora_targets(small_model)
    image = [t for t in targets if t.startswith("image_encoder.")]
    decoder = [t for t in targets if t.startswith("seg_decoder.mask_decoder.transformer.")]
    assert len(image) + len(decoder) == len(targets)
    assert {t.rsplit(".", 1)[-1] for t in decoder} == {"q_proj", "k_proj", "v_proj", "out_proj", "lin1", "lin2"}
    assert any(t.endswith("attn.qkv") for t in image) and any(t.endswith("attn.proj") for t in image)
    assert any(t.endswith("mlp1.mlp.0") for t in image) and any(t.endswith("mlp.mlp.3") for t in image)
    linear = {n for n, m in small_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(targets) <= linear
    assert not any(t.startswith(("text_encoder", "text_projector")) or "hypernetworks" in t for t in targets)


def test_lora_starts_at_the_base_model_and_merges_exactly(tiny_checkpoint):  # noqa: F811
    model = load_model(tiny_checkpoint)
    before = _forward(model)
    tuner = add_lora(model, 4)
    trainable, total = count_parameters(model)
    assert has_lora(model) and 0 < trainable < total / 50
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(_forward(model), before)  # B = 0: the adapters change nothing yet
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    adapted = _forward(model)
    assert not torch.allclose(adapted, before)
    assert merge_lora(tuner) is model and not has_lora(model)
    assert torch.allclose(_forward(model), adapted, atol=1e-4, rtol=1e-4)  # folded: W + (alpha/r) B A
    assert set(model.state_dict()) == set(load_model(tiny_checkpoint).state_dict())


@pytest.mark.slow
def test_finetune_with_lora_saves_a_plain_merged_checkpoint(tmp_path, tiny_checkpoint, npz_in_file):  # noqa: F811
    base = load_model(tiny_checkpoint)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = load_model(tiny_checkpoint)
    out = tmp_path / "out"
    events = []
    result = finetune(_args(npz_in_file, out, lora_rank=4, lora_alpha=8.0, warmup_ratio=0.0, learning_rate=1e-3),
                      model, callback=events.append)
    assert result.steps == 2 and math.isfinite(result.loss)
    assert any(e.kind == "info" and e.message.startswith("LoRA rank 4: ") for e in events)
    saved = load_model(out)
    state = saved.state_dict()
    assert not any("lora" in k or "base_layer" in k for k in state)
    assert set(state) == set(base_state)
    merged = model.state_dict()  # the in-memory model was merged in place before saving
    assert set(merged) == set(state) and all(torch.equal(state[k], merged[k]) for k in state)
    assert torch.equal(_forward(saved), _forward(model))
    targets = set(default_lora_targets(base))
    moved = {k.rsplit(".", 1)[0] for k in state if not torch.equal(state[k], base_state[k])}
    assert moved and moved <= targets, moved - targets  # only the adapted weights changed...
    assert all(torch.equal(state[k], base_state[k]) for k in state  # ...not BatchNorm statistics, not biases
               if "running_" in k or k.endswith(".bias"))
    recorded = json.loads((out / "training_args.json").read_text())["args"]
    assert recorded["lora_rank"] == 4 and recorded["lora_alpha"] == 8.0
    # `segment --model OUT` loads it like any checkpoint
    data = tmp_path / "seg"
    seg = _cli("segment", npz_in_file / f"{US_CASE}.npz", "--model", out, "-o", data / "x.npz", "--device", "cpu",
               "--quiet")
    assert seg.exit_code == 0, seg.output


def test_decoder_only_trains_only_the_mask_decoder(tmp_path, tiny_checkpoint, npz_in_file):  # noqa: F811
    assert parse_freeze("decoder-only") == ("decoder-only",)
    base = load_model(tiny_checkpoint).state_dict()
    out = tmp_path / "out"
    finetune(_args(npz_in_file, out, freeze="decoder-only", warmup_ratio=0.0), str(tiny_checkpoint))
    state = load_model(out).state_dict()
    changed = {k for k in state if not torch.equal(state[k], base[k])}
    assert changed and all(k.startswith("seg_decoder.mask_decoder.") for k in changed), changed
    assert json.loads((out / "training_args.json").read_text())["args"]["freeze"] == ["decoder-only"]


@pytest.mark.slow
def test_lora_run_resumes_exactly(tmp_path, tiny_checkpoint, npz_in_file):  # noqa: F811
    class Stop(Exception):
        pass

    def stop(event):
        if event.kind == "checkpoint" and event.step == 2:
            raise Stop

    out, straight = tmp_path / "out", tmp_path / "straight"
    with pytest.raises(Stop):
        finetune(_args(npz_in_file, out, max_steps=3, save_every=2, lora_rank=4), str(tiny_checkpoint),
                 callback=stop)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    result = finetune(_args(npz_in_file, out, max_steps=3, save_every=2, lora_rank=4), str(tiny_checkpoint))
    assert result.start_step == 2 and [r["step"] for r in _log(out)] == [1, 2, 3]
    finetune(_args(npz_in_file, straight, max_steps=3, lora_rank=4), str(tiny_checkpoint))
    resumed, reference = load_model(out).state_dict(), load_model(straight).state_dict()
    worst = max(float((resumed[k].float() - reference[k].float()).abs().max()) for k in reference)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("extra", [["--lora-rank", "-1"], ["--lora-rank", "4", "--freeze", "text"],
                                   ["--lora-rank", "4", "--lora-alpha", "0"], ["--freeze", "decoder"]])
def test_lora_usage_errors_exit_2(tmp_path, npz_in_file, extra):  # noqa: F811
    result = _cli("finetune", npz_in_file, "-o", tmp_path / "out", "--model", tmp_path / "never", *extra)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists()


def test_missing_peft_is_a_usage_error(monkeypatch, small_model):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UsageError, match=r"pip install 'text3dsam-cli\[lora\]'"):
        add_lora(small_model, 4)
    with pytest.raises(UsageError):
        TrainingArguments(data="x", output="y", lora_rank=2, freeze=("image",)).check()


@pytest.mark.slow
def test_lora_best_model_is_saved_merged_while_training_goes_on(tmp_path, tiny_checkpoint, npz_in_file):  # noqa: F811
    """With a validation split, the best model so far is saved during training from a merged copy: OUTPUT (best)
    and OUTPUT/last are plain checkpoints, and the adapters kept training after the best was saved."""
    import shutil

    shutil.copy(npz_in_file / f"{US_CASE}.npz", npz_in_file / f"{US_CASE}_b.npz")  # two cases: a split exists
    out = tmp_path / "out"
    finetune(_args(npz_in_file, out, lora_rank=4, warmup_ratio=0.0, learning_rate=1e-3, max_steps=2,
                   val_fraction=0.5, val_every=1), load_model(tiny_checkpoint))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["best_step"] in (1, 2) and summary["last_step"] == 2
    states = [load_model(folder).state_dict() for folder in (out, out / "last")]
    for state in states:
        assert not any("lora" in k or "base_layer" in k for k in state)
    if summary["best_step"] == 1:  # the best (step 1) was saved, then the adapters trained one more step
        assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert json.loads((out / "splits.json").read_text())["val"]
