"""The expert's data pipeline, the LoRA trainer and the probe, on tiny models."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama as make_tiny_llama
from transformers import LlamaForCausalLM

from ngsd_guard import Generation, GuardedLM
from ngsd_guard.contexts import Conversation, wrap
from ngsd_guard.errors import ConfigError
from ngsd_guard.features import PromptFeatures
from ngsd_guard.judge import is_refusal
from ngsd_guard.reflection import ProbeReader, default_policy, load_risk_map
from ngsd_guard.sources import Request
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
    trainer,
    wrap_lora,
)
from ngsd_guard.training.command import add_parser
from ngsd_guard.training.data import (
    PlannedRequest,
    load_examples,
    load_plan,
    plan_requests,
    render_ids,
    save_examples,
    save_plan,
)
from ngsd_guard.training.expert import save_adapter_fp16, train_expert
from ngsd_guard.training.probe import auc, cross_validated_auc, fit_blend
from ngsd_guard.training.trainer import (
    Checkpoint,
    batch_loss,
    length_grouped_batches,
    load_trainable_adapter,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """A 2-layer random Llama over the real vocabulary, with tied embeddings."""
    return make_tiny_llama(seed, max_positions=1024, tie_embeddings=True)


def test_recovery_prefix_is_cut_on_token_boundaries():
    compliant = [11, 12, 13, 14, 15]
    refusal = [90, 91, 2]
    response, start = recovery_response(compliant, refusal, 3)
    assert response == [11, 12, 13, 90, 91, 2]
    assert start == 3 and response[start:] == refusal
    with pytest.raises(ValueError, match="`k`"):
        recovery_response(compliant, refusal, 6)


def test_supportive_replies_open_unlike_refusals_and_point_to_help_early(tokenizer):
    """The expert learns a self-harm reply only if its first token is its own: were it the
    generic refusal's ("I'm sorry"), greedy decoding follows the far commoner generic
    continuation. It must still count as a refusal, and name the help within 64 tokens."""
    from ngsd_guard.judge import points_to_help
    from ngsd_guard.training.data import WrittenResponses

    responses = WrittenResponses.load()

    def first(text: str) -> int:
        return tokenizer(text, add_special_tokens=False)["input_ids"][0]

    topical = tuple(t for texts in responses.topical.values() for t in texts)
    refusal_openings = {first(t) for t in responses.refusals + responses.in_context + topical}
    for reply in responses.self_harm:
        assert first(reply) not in refusal_openings, reply
        assert is_refusal(reply), reply
        head = tokenizer.decode(tokenizer(reply, add_special_tokens=False)["input_ids"][:64])
        assert points_to_help(head), reply


def test_a_refusal_that_names_a_harm_is_written_only_for_its_category():
    """A self-harm question must not learn "I cannot help with stealing ... property"."""
    from ngsd_guard.training.data import WrittenResponses

    responses = WrittenResponses.load()
    assert {"weapons", "cyber", "theft_property"} <= set(responses.topical)
    rng = random.Random(0)
    for category in ("self_harm", "weapons", "advbench", "theft_property"):
        planned = PlannedRequest("harmful", category, "test", wrap("x", "bare", "train", rng))
        allowed = set(responses.refusals) | set(responses.topical.get(category, ()))
        if category == "self_harm":
            allowed = set(responses.self_harm)
        chosen = {responses.choose(planned, rng) for _ in range(300)}
        assert chosen == allowed, category
    for texts in responses.topical.values():
        assert not set(texts) & set(responses.refusals)


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
    examples = _tiny_examples(tokenizer)
    settings = LoraSettings(r=4, lora_alpha=16, lr=5e-2, epochs=15, batch_size=5, seed=0)
    report = train_lora(model, examples, settings, pad_id=2)
    assert report.steps == 15
    assert report.last_loss < 0.8 * report.first_loss


def test_an_upper_layer_student_learns_its_teachers_refusals(tokenizer, tmp_path, capsys):
    from ngsd_guard.cli import main

    teacher = _perturbed_lora(3)
    teacher.save_pretrained(tmp_path / "teacher")
    settings = LoraSettings(
        r=4, lora_alpha=16, lr=5e-2, epochs=15, batch_size=5, first_layer=1, teacher="t"
    )
    student = wrap_lora(tiny_llama(3), settings)
    report = train_lora(
        student,
        _tiny_examples(tokenizer),
        settings,
        pad_id=2,
        teacher=trainer.load_teacher(tiny_llama(3), tmp_path / "teacher"),
    )
    taught = [h["teacher_kl"] for h in report.history]
    assert {h["ce"] for h in report.history} == {0.0}  # no row of a written category
    assert taught[-1] < 0.5 * taught[0]
    save_plan(_tiny_plan(), tmp_path / "plan.jsonl")
    args = ["train-expert", "--plan", str(tmp_path / "plan.jsonl"), "--out", str(tmp_path)]
    assert main([*args, "--teacher", str(tmp_path / "none")]) == 2
    assert "`--teacher`" in capsys.readouterr().err


def _tiny_examples(tokenizer) -> list[Example]:
    refusal = tokenizer("I'm sorry, but I cannot help.", add_special_tokens=False)["input_ids"]
    return [
        Example("refusal", "x", render_ids(tokenizer, f"bad request {i}"), refusal)
        for i in range(4)
    ] + [Example("benign", "y", render_ids(tokenizer, "hello"), [40, 41, 42, 2])]


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_killed_training_resumes_from_its_checkpoint_and_equals_an_uninterrupted_one(
    tokenizer, tmp_path, monkeypatch
):
    examples = _tiny_examples(tokenizer)
    settings = LoraSettings(r=4, lora_alpha=16, lr=5e-2, epochs=3, batch_size=2, seed=0)

    def model():
        return wrap_lora(tiny_llama(3), settings)

    whole = model()
    straight = train_lora(whole, examples, settings, pad_id=2)
    assert straight.steps == 9

    calls = {"n": 0}
    loss = trainer.batch_loss

    def killed_at_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    checkpoint = Checkpoint(tmp_path / "ckpt", every=2)
    monkeypatch.setattr(trainer, "batch_loss", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_lora(model(), examples, settings, pad_id=2, checkpoint=checkpoint)
    saved = torch.load(checkpoint.path, weights_only=True)
    assert len(saved["history"]) == 4 and saved["seconds"] > 0
    monkeypatch.setattr(trainer, "batch_loss", loss)
    resumed_model = model()
    resumed = train_lora(resumed_model, examples, settings, pad_id=2, checkpoint=checkpoint)

    assert resumed.steps == 9
    assert resumed.seconds > saved["seconds"]  # the time before the kill counts
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    expected, got = _trained(whole), _trained(resumed_model)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[n], got[n]) for n in expected)

    other = LoraSettings(r=4, lora_alpha=16, lr=1e-2, epochs=3, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="another run"):
        train_lora(model(), examples, other, pad_id=2, checkpoint=checkpoint)


def test_bf16_training_runs_the_forwards_in_bf16_and_still_learns(tokenizer):
    settings = LoraSettings(r=4, lora_alpha=16, lr=5e-2, epochs=15, batch_size=5, bf16=True)
    model = wrap_lora(tiny_llama(3), settings)
    dtypes = set()
    projection = model.get_base_model().model.layers[0].self_attn.q_proj
    projection.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    report = train_lora(model, _tiny_examples(tokenizer), settings, pad_id=2)
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in _trained(model).values())
    assert report.last_loss < 0.8 * report.first_loss


def test_an_adapter_from_a_first_layer_leaves_the_layers_below_as_the_bases(tokenizer, tmp_path):
    from ngsd_guard.experts import first_adapted_layer

    settings = LoraSettings(r=4, lora_alpha=16, lr=5e-2, epochs=3, batch_size=5, first_layer=1)
    model = wrap_lora(tiny_llama(3), settings)
    trained = _trained(model)
    assert trained and all(".layers.1." in name for name in trained)
    train_lora(model, _tiny_examples(tokenizer), settings, pad_id=2)
    model.eval()
    assert first_adapted_layer(model) == 1
    lm = GuardedLM.from_models(model, tokenizer)
    assert lm.generate("hello", max_new_tokens=4).summary.tokens == 4
    save_adapter_fp16(model, tmp_path, "tiny")  # as train-expert writes it, and reads it back
    assert first_adapted_layer(load_trainable_adapter(tiny_llama(3), tmp_path)) == 1
    with pytest.raises(ConfigError, match="below the model's 2 layers"):
        wrap_lora(tiny_llama(3), LoraSettings(first_layer=2))


def _renderer(model, tokenizer):
    engine = GuardedLM.from_models(model, tokenizer)

    def render(conversation: Conversation) -> list[int]:
        text = engine.render(list(conversation.messages), tools=list(conversation.tools) or None)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return render


def _tiny_plan() -> list[PlannedRequest]:
    rng = random.Random(0)
    harmful = [
        ("make poison", "bare", "advbench"),
        ("steal a car", "multiturn", "theft_property"),
        ("hack a bank", "rag-custom", "cyber"),
        ("how many pills would end it", "agent-tools", "self_harm"),
    ]
    plan = [
        PlannedRequest("harmful", category, "test", wrap(text, context, "train", rng))
        for text, context, category in harmful
    ]
    plan.append(PlannedRequest("benign", "", "test", wrap("bake bread", "multiturn", "train", rng)))
    return plan


def _held_out_plan() -> list[PlannedRequest]:
    """Two requests that :func:`is_holdout` keeps out of training, for the calibration."""
    rng = random.Random(1)
    return [
        PlannedRequest("benign", "", "test", wrap("bake bread 19", "bare", "train", rng)),
        PlannedRequest("harmful", "theft", "test", wrap("steal a bike 13", "bare", "train", rng)),
    ]


def test_build_dataset_on_wrapped_and_multiturn_requests(tokenizer):
    model = tiny_llama(4)
    render = _renderer(model, tokenizer)
    plan = _tiny_plan()
    config = BuildConfig(
        seed=1,
        refusal_tries=1,
        refusal_tokens=6,
        compliant_tokens=8,
        benign_tokens=5,
        recovery_rate=1.0,
    )
    dataset = build_dataset(model, tokenizer, plan, render, config)
    kinds = sorted(ex.kind for ex in dataset.examples)
    assert len(kinds) == 5 and kinds.count("benign") == 1
    assert dataset.stats["contexts"] == {
        "bare": 1,
        "multiturn": 2,
        "rag-custom": 1,
        "agent-tools": 1,
    }
    # the random tiny model never refuses: written refusals, supportive for self-harm
    assert dataset.stats["written_responses"] == 4
    by_request = {ex.prompt: ex for ex in dataset.examples}
    for planned in plan:
        ex = by_request[planned.conversation.request]
        assert ex.prompt_ids == render(planned.conversation)
        assert ex.context == planned.conversation.context
        if ex.kind != "benign":
            assert ex.response_ids[-1] == 2  # <|im_end|>, never <|im_start|>
            trained = tokenizer.decode(ex.response_ids[ex.loss_start :])
            assert is_refusal(trained)
            assert ("988" in trained) == (planned.category == "self_harm")
            assert ex.category == planned.category
        if ex.kind == "recovery":
            assert 1 <= ex.loss_start <= 8
    again = build_dataset(model, tokenizer, plan, render, config)
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in dataset.examples]


def test_loss_mask_of_a_multiturn_example_is_on_the_answer_only(tokenizer):
    model = tiny_llama(4)
    render = _renderer(model, tokenizer)
    (planned,) = [p for p in _tiny_plan() if p.conversation.context == "multiturn"][:1]
    dataset = build_dataset(
        model,
        tokenizer,
        [planned],
        render,
        BuildConfig(refusal_tries=1, refusal_tokens=4, compliant_tokens=4, recovery_rate=0.0),
    )
    (ex,) = dataset.examples
    batch = collate([ex], pad_id=2, max_length=1024, device=torch.device("cpu"))
    labels = batch["labels"][0]
    trained = labels != -100
    assert trained.nonzero().min().item() == len(ex.prompt_ids)  # nothing of the earlier turns
    assert labels[trained].tolist() == ex.response_ids
    earlier = planned.conversation.messages[1]["content"]  # an earlier assistant turn
    assert earlier in tokenizer.decode(ex.prompt_ids)


def test_plan_draws_contexts_per_request_and_round_trips(tmp_path):
    seeds = Seeds(
        harmful=[Request(f"do harm {i}", "violence") for i in range(30)],
        benign=[Request(f"bake bread {i}") for i in range(20)],
    )
    plan = plan_requests(seeds, BuildConfig(seed=0, harmful_contexts=1, benign_contexts=2))
    assert len(plan) == 30 + 2 * 20
    contexts = {p.conversation.context for p in plan}
    assert {"bare", "multiturn", "agent-tools", "jailbreak"} <= contexts
    assert "rag-unseen" not in contexts
    assert plan == plan_requests(seeds, BuildConfig(seed=0, harmful_contexts=1, benign_contexts=2))
    save_plan(plan, tmp_path / "plan.jsonl")
    assert load_plan(tmp_path / "plan.jsonl") == plan


def test_a_weighted_category_is_planned_in_its_own_number_of_contexts(tmp_path):
    seeds = Seeds(
        harmful=[Request(f"hurt myself {i}", "self_harm") for i in range(5)]
        + [Request(f"do harm {i}", "violence") for i in range(7)],
        benign=[Request(f"bake bread {i}") for i in range(3)],
    )
    plan = plan_requests(seeds, BuildConfig(harmful_contexts=2, benign_contexts=1))
    by_category = Counter(p.category for p in plan)
    assert by_category == {"self_harm": 5 * 4, "violence": 7 * 2, "": 3}  # the default: 4
    plan = plan_requests(seeds, BuildConfig(harmful_contexts=2, category_contexts={}))
    assert Counter(p.category for p in plan)["self_harm"] == 5 * 2
    with pytest.raises(ConfigError, match="self_harm"):
        BuildConfig(category_contexts={"self_harm": 0})
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train-expert", "--category-contexts", "weapons=3, drugs=1"])
    assert args.category_contexts == {"weapons": 3, "drugs": 1}
    with pytest.raises(SystemExit):
        parser.parse_args(["train-expert", "--category-contexts", "weapons=0"])


@needs_data
def test_seeds_respect_the_fixed_splits():
    seeds = load_seeds(SHARED, benign_limit=5, borderline=False)
    advbench = json.loads((SHARED / "advbench_harmful_behaviors.json").read_text())
    test_goals = {row["goal"] for row in advbench if row["id"] >= 260}
    harmful = {r.text for r in seeds.harmful}
    assert not test_goals & harmful
    assert seeds.sources["advbench"] == 260 and seeds.sources["seed_reject"] == 36
    assert seeds.sources["donotanswer"] > 500 and seeds.sources["project-harmful"] > 200
    alpaca = json.loads((SHARED / "alpaca_eval.json").read_text())
    assert [r.text for r in seeds.benign[:5]] == [row["instruction"] for row in alpaca[100:105]]


@pytest.mark.parametrize(
    "flag",
    [
        ["--max-length", "1"],
        ["--epochs", "0"],
        ["--r", "0"],
        ["--lr", "-0.5"],
        ["--refusal-tries", "0"],
        ["--checkpoint-every", "0", "--checkpoint", "ckpt"],
        ["--first-layer", "-1"],
    ],
)
def test_bad_training_settings_are_named_before_a_model_loads(tmp_path, capsys, flag):
    from ngsd_guard.cli import main

    save_plan(_tiny_plan(), tmp_path / "plan.jsonl")
    args = ["train-expert", "--plan", str(tmp_path / "plan.jsonl"), "--out", str(tmp_path)]
    args += ["--model", str(tmp_path / "no-model-here"), *flag]
    assert main(args) == 2
    name = flag[0].removeprefix("--").replace("-", "_")
    assert f"`{name}` (={flag[1]})" in capsys.readouterr().err


def test_probe_separates_separable_features():
    generator = torch.Generator().manual_seed(0)
    harmful = torch.randn(40, 8, generator=generator) + torch.tensor([3.0] + [0.0] * 7)
    benign = torch.randn(60, 8, generator=generator) - torch.tensor([3.0] + [0.0] * 7)
    features = torch.cat([harmful, benign])
    labels = torch.tensor([1.0] * 40 + [0.0] * 60)
    probe = fit_probe(features, labels, PromptFeatures.parse("last@1"))
    assert auc(probe.logits(features), labels) > 0.99
    risk = probe.read(None, ["a"] * 100, features)
    assert risk[:40].min() > 5 > risk[40:].max()


def test_blend_weighs_the_column_that_separates():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([1.0] * 50 + [0.0] * 50)
    log_odds = torch.randn(100, generator=generator)  # uninformative
    divergence = labels * 0.8 + 0.1 * torch.rand(100, generator=generator)
    blend = fit_blend(log_odds, divergence, labels)
    assert blend.divergence_weight > 5 * abs(blend.probe_weight)
    mixed = blend.probe_weight * log_odds + blend.divergence_weight * divergence + blend.bias
    assert auc(mixed, labels) == 1.0 and (mixed[:50] > 0).all() and (mixed[50:] < 0).all()


def test_train_expert_writes_a_peft_adapter_a_probe_and_a_record(tokenizer, tmp_path):
    from peft import PeftModel

    out = tmp_path / "expert"
    build = BuildConfig(refusal_tries=1, refusal_tokens=4, compliant_tokens=4, benign_tokens=4)
    lora = LoraSettings(r=2, lora_alpha=4, epochs=1, batch_size=4)
    record = train_expert(
        tiny_llama(6),
        tokenizer,
        plan=_tiny_plan() + _held_out_plan(),
        out=out,
        base_name="tiny",
        build=build,
        lora=lora,
        probe=PromptFeatures.parse("last@2+mean@1"),
        command="ngsd-guard train-expert --test",
    )
    assert (out / "adapter_config.json").is_file()
    assert record["data"]["harmful"] == 4 and record["data"]["benign"] == 1
    saved = json.loads((out / "training.json").read_text())
    assert saved["command"] == "ngsd-guard train-expert --test"
    assert saved["probe"]["harmful"] == 4
    probe = ProbeReader.load(out / "probe.safetensors")
    assert probe.weight.shape == (64,) and str(probe.features) == "last@2+mean@1"
    assert saved["calibration"]["held_out"] == 2
    assert saved["calibration"]["blend"] is not None
    assert str(default_policy(out / "probe.safetensors").features) == "last@2+mean@1+tv@0"
    risk_map = load_risk_map(out)
    assert risk_map.model_dump() == saved["calibration"]["risk_map"]
    assert risk_map.alpha_low == 0.0 and risk_map.low == risk_map.high >= 6.0
    loaded = PeftModel.from_pretrained(tiny_llama(6), out)
    assert loaded.peft_config["default"].r == 2


def test_saved_examples_train_again_and_the_held_out_slice_never_trains(tokenizer, tmp_path):
    model = tiny_llama(6)
    plan = _tiny_plan() + _held_out_plan()
    build = BuildConfig(refusal_tries=1, refusal_tokens=4, compliant_tokens=4, benign_tokens=4)
    lora = LoraSettings(r=2, lora_alpha=4, epochs=1, batch_size=4)
    common = dict(plan=plan, base_name="tiny", build=build, lora=lora, probe=None, calibrate=False)
    # without calibration too, the held-out requests stay out of the data
    saved = tmp_path / "examples.jsonl"
    record = train_expert(model, tokenizer, out=tmp_path / "a", examples_path=saved, **common)
    assert record["data"]["harmful"] == 4 and record["data"]["benign"] == 1
    assert len(load_examples(saved, tokenizer)) == 5
    assert record["data"]["held_out_for_calibration"] == 2 and record["build"]["seed"] == 0
    # all of them are saved when building anew, so that loading them must drop the slice
    dataset = build_dataset(model, tokenizer, plan, _renderer(model, tokenizer), build)
    save_examples(dataset, tmp_path / "all.jsonl", tokenizer)
    loaded = load_examples(tmp_path / "all.jsonl", tokenizer)
    assert len(loaded) == len(dataset.examples) == 7
    for ex, again in zip(dataset.examples, loaded, strict=True):
        assert (again.kind, again.prompt, again.context, again.category) == (
            ex.kind,
            ex.prompt,
            ex.context,
            ex.category,
        )
        assert again.prompt_ids == ex.prompt_ids and again.loss_start == ex.loss_start
        assert tokenizer.decode(again.response_ids) == tokenizer.decode(ex.response_ids)
        if ex.kind == "refusal":
            assert again.response_ids == ex.response_ids
    record = train_expert(tiny_llama(6), tokenizer, out=tmp_path / "b", examples=loaded, **common)
    assert record["data"]["loaded_examples"] == 7 and record["data"]["held_out"] == 2
    assert "build" not in record  # the run that saved them built them
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    row = json.loads((tmp_path / "all.jsonl").read_text().splitlines()[0])
    del row["request"]
    (tmp_path / "old.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match="needs its `request`"):
        load_examples(tmp_path / "old.jsonl", tokenizer)


def test_calibration_counts_dissents_and_holds_out_stably():
    from ngsd_guard.records import StepRecord
    from ngsd_guard.training.calibrate import (
        choose_escalation,
        choose_high,
        dissents,
        is_holdout,
    )

    def record(spiked: bool, dissent: bool) -> StepRecord:
        return StepRecord(
            row=0,
            step=0,
            token_id=1,
            text="",
            divergence=0.5,
            potential=1.0,
            spiked=spiked,
            alpha=0.0,
            base_token_id=1,
            chosen_token_id=1,
            intervened=False,
            expert_token_id=2,
            dissent=dissent,
        )

    records = [record(True, True), record(True, False), record(False, False), record(True, True)]
    generation = Generation(
        text="", token_ids=[], records=records, summary=_summary(), finish_reason="stop"
    )
    assert dissents(generation) == 2
    assert [is_holdout(f"request {i}") for i in range(50)] == [
        is_holdout(f"request {i}") for i in range(50)
    ]
    assert 0 < sum(is_holdout(f"request {i}") for i in range(1000)) < 200
    assert choose_escalation([0] * 98 + [3, 9], max_share=0.02) == 1
    assert choose_escalation([0] * 98 + [3, 9], max_share=0.01) == 4
    assert choose_escalation([20] * 10, max_share=0.0, candidates=(2, 3)) is None
    assert choose_high([1.0] * 99 + [8.0], max_share=0.01) == 6.0
    assert choose_high([1.0] * 98 + [7.0, 8.0], max_share=0.01) == 7.0
    risks = [1.0] * 97 + [6.504, 7.25, 9.0]
    high = choose_high(risks, max_share=0.02)  # rounding to 6.5 would let 6.504 through
    assert high == 6.51 and sum(r > high for r in risks) == 2


def _summary():
    from ngsd_guard.records import Summary

    return Summary(
        tokens=4,
        prompt_tokens=3,
        spikes=3,
        intervened=0,
        mean_divergence=0.5,
        alpha=0.1,
        seconds=0.1,
    )


def test_grouped_folds_keep_a_request_out_of_its_own_training():
    """The same request in four contexts: scored by a probe that saw its copies, random
    labels look learnable; with folds grouped by request they do not."""
    generator = torch.Generator().manual_seed(0)
    requests = torch.randn(60, 40, generator=generator)
    labels = (torch.rand(60, generator=generator) > 0.5).float()
    copies = requests.repeat_interleave(4, 0) + 0.01 * torch.randn(240, 40, generator=generator)
    spec = PromptFeatures.parse("last@1")
    groups = [f"request {i}" for i in range(60) for _ in range(4)]
    ungrouped = cross_validated_auc(copies, labels.repeat_interleave(4), spec)
    grouped = cross_validated_auc(copies, labels.repeat_interleave(4), spec, groups=groups)
    assert ungrouped > 0.9 and grouped < 0.7, (ungrouped, grouped)


def test_train_probe_refits_the_probe_and_recalibrates_keeping_the_adapter(
    tokenizer, tmp_path, capsys
):
    from ngsd_guard.cli import main

    out, model_dir, plan_path = tmp_path / "expert", tmp_path / "base", tmp_path / "plan.jsonl"
    train_expert(
        tiny_llama(6),
        tokenizer,
        plan=_tiny_plan() + _held_out_plan(),
        out=out,
        base_name="tiny",
        build=BuildConfig(refusal_tries=1, refusal_tokens=4, compliant_tokens=4, benign_tokens=4),
        lora=LoraSettings(r=2, lora_alpha=4, epochs=1, batch_size=4),
        probe=PromptFeatures.parse("last@2+mean@1"),
    )
    tiny_llama(6).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_plan(_tiny_plan() + _held_out_plan(), plan_path)
    adapter = (out / "adapter_model.safetensors").read_bytes()
    args = ["train-probe", "--expert-dir", str(out), "--model", str(model_dir)]
    code = main([*args, "--plan", str(plan_path), "--probe-features", "last@1"])
    assert code == 0
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert str(ProbeReader.load(out / "probe.safetensors").features) == "last@1"
    saved = json.loads((out / "training.json").read_text())
    assert saved["probe"]["features"] == "last@1" and saved["probe"]["harmful"] == 4
    assert saved["probe"]["command"].startswith("ngsd-guard ")
    assert saved["probe"]["plan"] == str(plan_path)
    assert "contexts_per_request" not in saved["probe"]  # the plan's draws, not the defaults
    assert saved["calibration"]["held_out"] == 2
    assert str(default_policy(out / "probe.safetensors").features) == "last@1+tv@0"
    assert main(["train-probe", "--expert-dir", str(tmp_path), "--plan", str(plan_path)]) == 2
    assert "holds no peft adapter" in capsys.readouterr().err


def _perturbed_lora(seed: int, adapter_seed: int | None = None):
    """A tiny LoRA model on ``tiny_llama(seed)`` whose adapter is not the identity (``lora_B``
    drawn at random under ``adapter_seed``, default ``seed``)."""
    model = wrap_lora(tiny_llama(seed), LoraSettings(r=4, lora_alpha=16, dropout=0.0, seed=seed))
    generator = torch.Generator().manual_seed(seed if adapter_seed is None else adapter_seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def test_batch_loss_equals_the_full_logits_formula():
    model = _perturbed_lora(7)
    examples = [
        Example("recovery", "h", [1, 5, 9, 3], [11, 12, 90, 91], loss_start=2),
        Example("benign", "b", [1, 2], [40, 41, 42]),
        Example("refusal", "r", [1, 7], [90, 91, 92, 2]),
    ]
    batch = collate(examples, pad_id=0, max_length=64, device=torch.device("cpu"))
    terms = batch_loss(model, batch, distill_weight=0.5)
    loss, ce, kl = terms.loss, terms.ce, terms.kl
    assert terms.teacher_kl == 0
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            teacher = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
    vocab = logits.size(-1)
    want_ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1)
    )
    mask = batch["distill"]
    p_teacher = teacher[mask].softmax(-1)
    want_kl = (p_teacher * (p_teacher.log() - logits[mask].log_softmax(-1))).sum(-1).mean()
    assert want_kl > 1e-4  # the adapter moves the distribution, so the check has teeth
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, want_kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, want_ce + 0.5 * want_kl, rtol=1e-4, atol=1e-6)


def _student_and_teacher(directory: Path):
    """A perturbed tiny LoRA student and, on the same base with another adapter, its teacher
    (saved under ``directory`` and loaded as :func:`trainer.load_teacher` does), and the
    teacher's peft model."""
    teacher_model = _perturbed_lora(7, adapter_seed=11)
    teacher_model.save_pretrained(directory / "teacher")
    teacher = trainer.load_teacher(tiny_llama(7), directory / "teacher")
    return _perturbed_lora(7), teacher, teacher_model


def test_a_teacher_replaces_the_refusals_ce_by_its_kl_on_the_harmful_rows_only(tmp_path):
    student, teacher, teacher_model = _student_and_teacher(tmp_path)
    assert not any(p.requires_grad for p in teacher.parameters())
    examples = [
        Example("recovery", "h", [1, 5, 9, 3], [11, 12, 90, 91], loss_start=2),
        Example("benign", "b", [1, 2], [40, 41, 42]),
        Example("refusal", "r", [1, 7], [90, 91, 92, 2]),
    ]
    batch = collate(examples, pad_id=0, max_length=64, device=torch.device("cpu"))
    # the last prompt token through the last answer token but one, harmful rows only
    assert batch["teach"].tolist() == [
        [False, False, False, True, True, True, True, False],
        [False] * 8,
        [False, True, True, True, True, False, False, False],
    ]
    terms = batch_loss(student, batch, distill_weight=0.5, teacher=teacher)
    loss, harmful, kl = terms.loss, terms.teacher_kl, terms.kl
    assert terms.ce == 0
    want_kl = batch_loss(student, batch, distill_weight=0.5).kl
    with torch.no_grad():
        ids, attention = batch["input_ids"], batch["attention_mask"]
        logits = student(input_ids=ids, attention_mask=attention).logits
        taught = teacher_model(input_ids=ids, attention_mask=attention).logits
    mask = batch["teach"]
    p_teacher = taught[mask].softmax(-1)
    want = (p_teacher * (p_teacher.log() - logits[mask].log_softmax(-1))).sum(-1).mean()
    assert want > 1e-4
    torch.testing.assert_close(harmful, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(loss, want + 0.5 * want_kl, rtol=1e-4, atol=1e-6)
    # a student that is its teacher has nothing left to learn on the harmful rows
    same = batch_loss(teacher_model, batch, distill_weight=0.5, teacher=teacher).teacher_kl
    assert same.abs() < 1e-5
    with pytest.raises(ConfigError, match="teacher"):
        train_lora(student, examples, LoraSettings(r=4, teacher="x"), pad_id=0)


def test_a_written_category_keeps_its_ce_under_a_teacher_and_the_terms_add(tmp_path):
    student, teacher, _ = _student_and_teacher(tmp_path)
    recovery = Example("recovery", "h", [1, 5, 9, 3], [11, 12, 90, 91], loss_start=2)
    supportive = Example("refusal", "s", [1, 7], [90, 91, 92, 2], category="self_harm")
    benign = Example("benign", "b", [1, 2], [40, 41, 42])
    cpu = torch.device("cpu")
    mixed = collate([recovery, supportive, benign], 0, 64, cpu, written={"self_harm"})
    assert not mixed["teach"][1].any() and mixed["teach"][0].any()
    assert (mixed["labels"][1] != -100).sum() == 4  # its written reply keeps its labels
    terms = batch_loss(student, mixed, distill_weight=0.5, teacher=teacher)
    # each term equals the one of a batch of its own row(s): the CE of the supportive reply
    # alone, the teacher's KL of the recovery alone, the base's KL of the benign answer alone
    alone = {
        "ce": batch_loss(student, collate([supportive], 0, 64, cpu), 0.5).ce,
        "teacher_kl": batch_loss(student, collate([recovery], 0, 64, cpu), 0.5, teacher).teacher_kl,
        "kl": batch_loss(student, collate([benign], 0, 64, cpu), 0.5).kl,
    }
    assert min(alone.values()) > 1e-4
    for name, want in alone.items():
        torch.testing.assert_close(getattr(terms, name), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        terms.loss, alone["ce"] + alone["teacher_kl"] + 0.5 * alone["kl"], rtol=1e-4, atol=1e-6
    )
    # the same rows without a written category: the teacher teaches the reply too, no CE
    plain = collate([recovery, supportive, benign], 0, 64, cpu)
    assert plain["teach"][1].any()
    assert batch_loss(student, plain, distill_weight=0.5, teacher=teacher).ce == 0


def test_teach_benign_distils_the_benign_rows_from_the_teacher_instead_of_the_base(tmp_path):
    student, teacher, _ = _student_and_teacher(tmp_path)
    recovery = Example("recovery", "h", [1, 5, 9, 3], [11, 12, 90, 91], loss_start=2)
    benign = Example("benign", "b", [1, 2], [40, 41, 42])
    cpu = torch.device("cpu")
    both = collate([recovery, benign], 0, 64, cpu, teach_benign=True)
    assert not both["distill"].any()
    assert both["teach"][1].tolist() == [False, True, True, True] + [False] * 4  # padded to 8
    terms = batch_loss(student, both, distill_weight=0.5, teacher=teacher)
    assert terms.kl == 0 and terms.ce == 0
    # KL(teacher || student) at the benign row's three positions, by the formula
    ids = torch.tensor([[1, 2, 40, 41, 42]])
    with torch.no_grad():
        p_t = torch.log_softmax(teacher(ids).logits[0, 1:4].float(), dim=-1)
        p_s = torch.log_softmax(student(ids).logits[0, 1:4].float(), dim=-1)
    benign_kl = (p_t.exp() * (p_t - p_s)).sum(-1)  # (3,): positions 1-3 predict 40, 41, 42
    alone = batch_loss(student, collate([recovery], 0, 64, cpu), 0.5, teacher).teacher_kl
    n_recovery = int(collate([recovery], 0, 64, cpu)["teach"].sum())
    want = (alone * n_recovery + benign_kl.sum()) / (n_recovery + 3)
    torch.testing.assert_close(terms.teacher_kl, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="`teach_benign` needs a `teacher`"):
        LoraSettings(teach_benign=True)


def test_length_grouped_batches_cover_every_index_once_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(500)]
    batches = length_grouped_batches(lengths, 8, random.Random(1), group=16)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert [len(b) for b in batches].count(8) == len(batches) - 1  # 500 = 62 * 8 + 4

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shuffled = list(range(500))
    random.Random(1).shuffle(shuffled)
    plain = [shuffled[i : i + 8] for i in range(0, 500, 8)]
    assert padded(batches) < 0.7 * padded(plain)
    assert batches == length_grouped_batches(lengths, 8, random.Random(1), group=16)


def test_init_adapter_goes_on_training_the_saved_expert(tokenizer, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    build = BuildConfig(refusal_tries=1, refusal_tokens=4, compliant_tokens=4, benign_tokens=4)
    lora = LoraSettings(r=2, lora_alpha=4, epochs=1, batch_size=4)
    plan = _tiny_plan() + _held_out_plan()
    train_expert(
        tiny_llama(6),
        tokenizer,
        plan=plan,
        out=first,
        base_name="tiny",
        build=build,
        lora=lora,
        probe=PromptFeatures.parse("last@2+mean@1"),
    )
    model = load_trainable_adapter(tiny_llama(6), first)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # not fresh
    record = train_expert(
        tiny_llama(6),
        tokenizer,
        plan=plan,
        out=second,
        base_name="tiny",
        build=build,
        lora=lora,
        probe=None,
        init_adapter=first,
    )
    assert record["training"]["init_adapter"] == str(first)
    assert record["init_record"] == json.loads((first / "training.json").read_text())
    assert json.loads((second / "training.json").read_text())["init_record"]["base"] == "tiny"
    for name in ("probe.safetensors", "policy.json"):  # kept, then recalibrated in place
        assert (second / name).is_file()
    assert (second / "probe.safetensors").read_bytes() == (first / "probe.safetensors").read_bytes()
    assert record["calibration"]["held_out"] == 2
    moved = load_trainable_adapter(tiny_llama(6), second)
    assert any(
        not torch.allclose(p.float(), trained[n].float(), atol=1e-3)
        for n, p in moved.named_parameters()
        if n in trained
    )
    with pytest.raises(ConfigError, match="holds no peft adapter"):
        load_trainable_adapter(tiny_llama(6), tmp_path)


def test_generated_answers_come_back_in_the_prompts_order(tokenizer):
    from ngsd_guard.training.data import generate_ids

    model = tiny_llama(8).eval()
    prompts = [render_ids(tokenizer, text) for text in ("a b c d e f g h", "hi", "one two three")]
    batched = generate_ids(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    alone = [generate_ids(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(a) for a in alone}) > 1  # the prompts' answers differ, so order shows
