"""Prompt features for the risk probe: pooling maths, layer capture, the engine's reading."""

from __future__ import annotations

import pytest
import torch

from ngsd_guard import GuardedLM
from ngsd_guard.alpha import Assessment
from ngsd_guard.errors import ConfigError
from ngsd_guard.experts import without_adapters
from ngsd_guard.features import PromptFeatures, capture_layers, first_divergence


def test_pool_last_and_mean_over_the_span():
    states = {
        1: torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2),  # (B, T, H)
        2: torch.ones(2, 4, 2),
    }
    spans = torch.tensor([[1, 3], [3, 4]])
    pooled = PromptFeatures.parse("last@2+mean@1").pool(states, spans)
    # row 0: mean of positions 1, 2 of [[0,1],[2,3],[4,5],[6,7]] = [3, 4]; row 1: position 3
    assert pooled.tolist() == [[1.0, 1.0, 3.0, 4.0], [1.0, 1.0, 14.0, 15.0]]


def test_spec_parsing_and_errors():
    spec = PromptFeatures.parse("last@30+mean@18")
    assert str(spec) == "last@30+mean@18" and spec.layers == (18, 30)
    assert not spec.reads_expert
    for bad in ("max@3", "last@x", "last@0", "tv@1", ""):
        with pytest.raises(ConfigError):
            PromptFeatures.parse(bad)
    both = PromptFeatures.parse("tv@0+last@2")
    assert both.reads_expert and both.layers == (2,)
    assert str(spec.with_first_divergence()) == "last@30+mean@18+tv@0"
    assert both.with_first_divergence() == both


def test_first_divergence_is_the_total_variation_and_is_placed_where_named():
    base = torch.log(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]).clamp_min(1e-30))
    expert = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]).clamp_min(1e-30))
    divergence = first_divergence(base, expert)
    torch.testing.assert_close(divergence, torch.tensor([0.25, 1.0]))
    pooled = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])  # two terms, H = 2
    spec = PromptFeatures.parse("last@2+tv@0+mean@1")
    assert spec.assemble(pooled, divergence).tolist() == [
        [1.0, 2.0, 0.25, 3.0, 4.0],
        [5.0, 6.0, 1.0, 7.0, 8.0],
    ]
    assert PromptFeatures.parse("tv@0").assemble(pooled[:, :0], divergence).shape == (2, 1)
    with pytest.raises(ConfigError, match="no expert"):
        spec.assemble(pooled, None)


def test_capture_matches_hidden_states(tiny_base):
    ids = torch.tensor([[5, 6, 7, 8]])
    with capture_layers(tiny_base, (1, 2)) as states:
        out = tiny_base(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(states[1], out.hidden_states[1])
    torch.testing.assert_close(states[2], out.hidden_states[-1])  # the final, normed output
    with pytest.raises(ConfigError, match="exceeds"), capture_layers(tiny_base, (3,)):
        pass


def test_engine_reads_the_same_features_batched_and_alone(tiny_base, tokenizer):
    lm = GuardedLM.from_models(tiny_base, tokenizer)
    spec = PromptFeatures.parse("last@2+mean@1")
    prompts = ["short one", [{"role": "user", "content": "a much longer request than that"}]]
    batched = lm.read_features(prompts, spec)
    alone = torch.cat([lm.read_features([p], spec) for p in prompts])
    assert batched.shape == (2, 2 * 32)
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


class Recording:
    """An alpha policy that reads ``spec`` and keeps what it was given (alpha 0)."""

    def __init__(self, spec: PromptFeatures) -> None:
        self.features, self.seen = spec, []

    def assess(self, lm, requests, features):
        self.seen.append(features)
        return [Assessment(alpha=0.0) for _ in requests]


def test_the_policy_sees_the_features_of_the_prefill(tiny_base, tokenizer):
    spec = PromptFeatures.parse("mean@1")
    policy = Recording(spec)
    lm = GuardedLM.from_models(tiny_base, tokenizer, alpha_policy=policy)
    prompts = ["Tell me a story.", "How are you?"]
    lm.generate_batch(prompts, max_new_tokens=2)
    torch.testing.assert_close(
        policy.seen[0], lm.read_features(prompts, spec), atol=1e-4, rtol=1e-4
    )


def test_tv_at_0_reads_the_two_prefills_and_decoding_sees_the_same(
    tiny_base, tiny_expert, tokenizer
):
    spec = PromptFeatures.parse("mean@1+tv@0")
    policy = Recording(spec)
    lm = GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_expert, alpha_policy=policy)
    prompts = ["Tell me a story.", "How are you?"]
    lm.generate_batch(prompts, max_new_tokens=2)
    read = lm.read_features(prompts, spec)
    torch.testing.assert_close(policy.seen[0], read, atol=1e-4, rtol=1e-4)
    texts = [lm.render(p) for p in prompts]
    plain = GuardedLM.from_models(tiny_base, tokenizer)
    alone = GuardedLM.from_models(tiny_expert, tokenizer)
    expected = first_divergence(plain.next_token_logprobs(texts), alone.next_token_logprobs(texts))
    torch.testing.assert_close(read[:, -1], expected, atol=1e-4, rtol=1e-4)


def test_a_hook_on_the_base_tree_never_fires_in_the_adapter_model():
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    model = get_peft_model(tiny_llama(7), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    base = without_adapters(model)
    with capture_layers(base, (1,)) as states:
        model(input_ids=torch.tensor([[5, 6]]))
        assert states == {}
        base(input_ids=torch.tensor([[5, 6]]))
        assert set(states) == {1}


def test_first_step_reader_reads_ten_times_d0_from_the_decoding_prefills(
    tiny_base, tiny_expert, tokenizer
):
    from ngsd_guard.reflection import FirstStepReader, ReflectionAlpha, RiskMap

    risk_map = RiskMap(high=9.99, low=9.99, alpha_low=0.0)
    policy = ReflectionAlpha(FirstStepReader(), risk_map)
    lm = GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_expert, alpha_policy=policy)
    prompts = ["Tell me a story.", "How are you?"]
    summaries = [g.summary for g in lm.generate_batch(prompts, max_new_tokens=2)]
    texts = [lm.render(p) for p in prompts]
    plain = GuardedLM.from_models(tiny_base, tokenizer)
    alone = GuardedLM.from_models(tiny_expert, tokenizer)
    d0 = first_divergence(plain.next_token_logprobs(texts), alone.next_token_logprobs(texts))
    assert [s.risk for s in summaries] == pytest.approx((10 * d0).tolist(), abs=1e-3)
    assert str(FirstStepReader.features) == "tv@0"
    with pytest.raises(ConfigError, match="one feature"):
        FirstStepReader().read(lm, ["a"], torch.zeros(1, 3))
