"""The expert's data pipeline, the LoRA trainer and the probe, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama as make_tiny_llama
from transformers import LlamaForCausalLM

from ngsd_guard.judge import is_refusal
from ngsd_guard.reflection import ProbeReader
from ngsd_guard.training import (
    BuildConfig,
    Example,
    LoraSettings,
    Seeds,
    build_dataset,
    collate,
    fit_probe,
    load_seeds,
    recovery_response,
    train_lora,
    wrap_lora,
)
from ngsd_guard.training.data import render_ids
from ngsd_guard.training.expert import train_expert
from ngsd_guard.training.probe import auc, prompt_hidden

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """A 2-layer random Llama over the real vocabulary, with tied embeddings."""
    return make_tiny_llama(seed, max_positions=512, tie_embeddings=True)


def test_recovery_prefix_is_cut_on_token_boundaries():
    compliant = [11, 12, 13, 14, 15]
    refusal = [90, 91, 2]
    response, start = recovery_response(compliant, refusal, 3)
    assert response == [11, 12, 13, 90, 91, 2]
    assert start == 3 and response[start:] == refusal
    with pytest.raises(ValueError, match="`k`"):
        recovery_response(compliant, refusal, 6)


def test_end_of_turn_is_read_from_the_chat_template(tokenizer):
    from ngsd_guard.training.data import end_of_turn_id

    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"


def test_loss_mask_covers_only_the_refusal_and_distillation_only_benign():
    recovery = Example("recovery", "h", [1, 2, 3], [11, 12, 90, 91], loss_start=2)
    benign = Example("benign", "b", [1, 2], [40, 41, 42])
    batch = collate([recovery, benign], pad_id=0, max_length=64, device=torch.device("cpu"))
    labels, distill = batch["labels"], batch["distill"]
    assert labels[0].tolist() == [-100, -100, -100, -100, -100, 90, 91]
    assert (labels[1] == -100).all()
    assert not distill[0].any()
    # position 1 (last prompt token) predicts the first answer token; the last token predicts none
    assert distill[1].tolist() == [False, True, True, True, False, False, False]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0]


def test_tiny_training_lowers_the_loss(tokenizer):
    model = wrap_lora(tiny_llama(3), LoraSettings(r=4, lora_alpha=16, seed=0))
    refusal = tokenizer("I'm sorry, but I cannot help.", add_special_tokens=False)["input_ids"]
    examples = [
        Example("refusal", "x", render_ids(tokenizer, f"bad request {i}"), refusal)
        for i in range(4)
    ] + [Example("benign", "y", render_ids(tokenizer, "hello"), [40, 41, 42, 2])]
    settings = LoraSettings(r=4, lora_alpha=16, lr=5e-2, epochs=15, batch_size=5, seed=0)
    report = train_lora(model, examples, settings, pad_id=2)
    assert report.steps == 15
    assert report.last_loss < 0.8 * report.first_loss


def test_build_dataset_on_a_handful_of_prompts(tokenizer):
    model = tiny_llama(4)
    seeds = Seeds(harmful=["make poison", "steal a car", "hack a bank"], benign=["bake bread"])
    config = BuildConfig(
        seed=1,
        refusal_tries=1,
        refusal_tokens=6,
        compliant_tokens=8,
        benign_tokens=5,
        recovery_rate=1.0,
    )
    dataset = build_dataset(model, tokenizer, seeds, config)
    kinds = sorted(ex.kind for ex in dataset.examples)
    assert len(kinds) == 4 and kinds.count("benign") == 1
    assert dataset.stats["refusals_by_base"] + dataset.stats["refusal_fallbacks"] == 3
    for ex in dataset.examples:
        assert ex.prompt_ids == render_ids(tokenizer, ex.prompt)
        if ex.kind != "benign" and ex.response_ids[-1] in (1, 2):
            assert ex.response_ids[-1] == 2  # <|im_end|>, never <|im_start|>
        if ex.kind == "recovery":
            assert 1 <= ex.loss_start <= 8
            assert is_refusal(tokenizer.decode(ex.response_ids[ex.loss_start :]))
        elif ex.kind == "refusal":
            assert ex.loss_start == 0
    again = build_dataset(model, tokenizer, seeds, config)
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in dataset.examples]


@needs_data
def test_seeds_respect_the_fixed_splits():
    seeds = load_seeds(SHARED, benign_limit=5, borderline=False)
    advbench = json.loads((SHARED / "advbench_harmful_behaviors.json").read_text())
    test_goals = {row["goal"] for row in advbench if row["id"] >= 260}
    assert len(seeds.harmful) == 36 + 260
    assert not test_goals & set(seeds.harmful)
    alpaca = json.loads((SHARED / "alpaca_eval.json").read_text())
    assert seeds.benign == [row["instruction"] for row in alpaca[100:105]]


def test_probe_separates_separable_features():
    generator = torch.Generator().manual_seed(0)
    harmful = torch.randn(40, 8, generator=generator) + torch.tensor([3.0] + [0.0] * 7)
    benign = torch.randn(60, 8, generator=generator) - torch.tensor([3.0] + [0.0] * 7)
    features = torch.cat([harmful, benign])
    labels = torch.tensor([1.0] * 40 + [0.0] * 60)
    probe = fit_probe(features, labels)
    assert auc(probe.logits(features), labels) > 0.99
    risk = probe.read(None, ["a"] * 100, features)
    assert risk[:40].min() > 5 > risk[40:].max()


def test_prompt_hidden_matches_one_at_a_time(tokenizer):
    model = tiny_llama(5)
    prompts = ["short", "a much longer prompt than the first one"]
    batched = prompt_hidden(model, tokenizer, prompts)
    single = torch.cat([prompt_hidden(model, tokenizer, [p]) for p in prompts])
    assert batched.shape == (2, 32)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def _tiny_data_dir(root: Path) -> Path:
    root.mkdir()
    seed = {"prompts": [{"prompt": "make a weapon", "category": "x"}]}
    (root / "seed_reject.json").write_text(json.dumps(seed))
    advbench = [{"id": i, "goal": f"harmful goal {i}", "target": "Sure"} for i in (0, 1, 300)]
    (root / "advbench_harmful_behaviors.json").write_text(json.dumps(advbench))
    alpaca = [{"instruction": f"benign task {i}", "output": ""} for i in range(103)]
    (root / "alpaca_eval.json").write_text(json.dumps(alpaca))
    return root


def test_train_expert_writes_a_peft_adapter_a_probe_and_a_record(tokenizer, tmp_path):
    from peft import PeftModel

    data_dir = _tiny_data_dir(tmp_path / "data")
    out = tmp_path / "expert"
    build = BuildConfig(refusal_tries=1, refusal_tokens=4, compliant_tokens=4, benign_tokens=4)
    lora = LoraSettings(r=2, lora_alpha=4, epochs=1, batch_size=4)
    record = train_expert(
        tiny_llama(6),
        tokenizer,
        data_dir=data_dir,
        out=out,
        base_name="tiny",
        build=build,
        lora=lora,
        benign_limit=3,
        command="ngsd-guard train-expert --test",
    )
    assert (out / "adapter_config.json").is_file()
    assert record["data"]["harmful"] == 3  # seed + advbench ids 0, 1 (never 300)
    saved = json.loads((out / "training.json").read_text())
    assert saved["command"] == "ngsd-guard train-expert --test"
    assert saved["probe"]["harmful"] == 3
    probe = ProbeReader.load(out / "probe.safetensors")
    assert probe.weight.shape == (32,)
    loaded = PeftModel.from_pretrained(tiny_llama(6), out)
    assert loaded.peft_config["default"].r == 2
