"""Self-reflection: the risk formula, both model readers on known outputs, the probe, alpha."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from ngsd_guard.errors import ConfigError
from ngsd_guard.features import PromptFeatures
from ngsd_guard.reflection import (
    JsonReader,
    LogprobReader,
    ProbeReader,
    ReflectionAlpha,
    RiskMap,
    combine_risk,
    expected_score,
    parse_scores,
)


@pytest.mark.parametrize(
    ("scores", "risk"),
    [
        ((0, 0, 0, 0), 0.0),
        ((7, 2, 0, 0), 7.0),  # severity dominates: max(7, 3.5 + 0.5)
        ((4, 8, 6, 0), 5.5),  # 0.5*4 + 0.5*mean(8, 6); S < 5, no escalation
        ((5, 8, 2, 1), 8.0),  # escalation: S >= 5 and A >= 8 gives A
        ((6, 3, 9, 8), 9.0),  # escalation takes the largest of A, E, T >= 8
        ((2, 10, 10, 10), 6.0),  # no escalation below S = 5: 1 + 5
        ((12, -3, 0, 0), 10.0),  # clipped to [0, 10]
    ],
)
def test_paper_risk_formula(scores, risk):
    assert combine_risk(torch.tensor([scores], dtype=torch.float32)).item() == pytest.approx(risk)


def test_parse_scores_variants_and_malformed():
    plain = '{"severity": 8, "actionability": 7, "evasion": 1, "targeting": 0}'
    assert parse_scores(plain) == {
        "severity": 8.0,
        "actionability": 7.0,
        "evasion": 1.0,
        "targeting": 0.0,
    }
    paper_keys = "```json\n{'severityScore': '9', 'actionabilityScore': 11, 'evasionScore': 2.5,"
    paper_keys += " 'targetingScore': 3,}\n```"
    assert parse_scores(paper_keys) == {
        "severity": 9.0,
        "actionability": 10.0,
        "evasion": 2.5,
        "targeting": 3.0,
    }
    assert parse_scores("Severity: 4\nActionability = 2\nEvasion: 0\nTargeting: 1")["severity"] == 4
    assert parse_scores('{"severity": 8, "actionability": 7') is None
    assert parse_scores("I cannot rate this request.") is None
    assert parse_scores("") is None


class FakeLM:
    """Stands in for GuardedLM: canned generations, next-token log-probs peaked on a digit."""

    def __init__(self, replies=(), digits=()):
        self.replies, self.digits = list(replies), list(digits)
        self.tokenizer = lambda text, add_special_tokens=False: {
            "input_ids": [100 + int(text)] if text.isdigit() and int(text) < 10 else [1, 2]
        }
        self.calls = 0

    def render(self, messages):
        return "|".join(m["content"] for m in messages)

    def generate_batch(self, prompts, **options):
        assert options["guard"] is False and options["raw"] is True
        assert options["alpha"] == 0.0  # a fixed policy: the reader must not recurse
        self.options = options
        return [SimpleNamespace(text=self.replies[i]) for i in range(len(prompts))]

    def next_token_logprobs(self, texts):
        logprobs = torch.full((len(texts), 200), -30.0)
        for row, digit in enumerate(self.digits[self.calls]):
            logprobs[row, 100 + digit] = 0.0
        self.calls += 1
        return logprobs


def test_json_reader_decodes_under_the_scores_grammar_and_falls_back_with_a_log(caplog, tokenizer):
    good = '{"severity": 9, "actionability": 9, "evasion": 0, "targeting": 0}'
    lm = FakeLM(replies=[good, "I will not"])  # the second: a decode cut short (cancelled)
    lm.tokenizer = tokenizer  # the reader builds its grammar on the real tokenizer
    reader = JsonReader(fallback=(5, 6, 6, 5))
    with caplog.at_level(logging.WARNING, logger="ngsd_guard.reflection"):
        risk = reader.read(lm, ["harmful", "odd"], torch.zeros(2, 4))
    assert risk.tolist() == pytest.approx([9.0, 5.5])
    assert reader.failures == 1
    assert "did not parse" in caplog.text
    matcher = lm.options["constraint"].matcher()
    for token in tokenizer.encode(good, add_special_tokens=False):
        assert matcher.allowed()[token]
        matcher.accept(token)
    assert matcher.is_complete()
    with pytest.raises(ConfigError, match="too small"):
        JsonReader(max_new_tokens=8).scores(lm, ["x"])


def test_logprob_reader_reads_expected_scores_one_forward_per_dimension():
    # rows: a harmful request (9, 8, 1, 2) and a benign one (0, 1, 0, 0)
    lm = FakeLM(digits=[(9, 0), (8, 1), (1, 0), (2, 0)])
    scores = LogprobReader().scores(lm, ["harmful", "benign"])
    assert lm.calls == 4
    torch.testing.assert_close(
        scores, torch.tensor([[9.0, 8, 1, 2], [0, 1, 0, 0]]), atol=1e-4, rtol=0
    )
    risk = LogprobReader().read(FakeLM(digits=[(9, 0), (8, 1), (1, 0), (2, 0)]), ["h", "b"], None)
    assert risk.tolist() == pytest.approx([8.0, 0.25], abs=1e-4)


def test_expected_score_mixes_number_tokens():
    logprobs = torch.log(torch.tensor([[0.0, 0.5, 0.25, 0.25, 0.0]]).clamp_min(1e-30))
    ids = torch.tensor([1, 2, 3, -1])  # "0" -> 1, "1" -> 2, "2" -> 3, "3" not one token
    assert expected_score(logprobs, ids).item() == pytest.approx(0.75)


def test_probe_reader_round_trip_and_risk(tmp_path):
    spec = PromptFeatures.parse("last@2")
    probe = ProbeReader(
        torch.tensor([2.0, 0.0]), torch.tensor(0.0), torch.zeros(2), torch.ones(2), spec
    )
    probe.save(tmp_path / "probe.safetensors")
    loaded = ProbeReader.load(tmp_path / "probe.safetensors")
    assert loaded.features == spec
    hidden = torch.tensor([[3.0, 5.0], [-3.0, 5.0], [0.0, 0.0]])
    risk = loaded.read(None, ["a", "b", "c"], hidden)
    assert risk[0] > 9.9 and risk[1] < 0.1 and risk[2].item() == pytest.approx(5.0)
    with pytest.raises(ConfigError, match="features"):
        loaded.read(None, ["a"], torch.zeros(1, 3))


def test_blended_probe_reads_tv_at_0_last_and_loads_from_policy_json(tmp_path):
    import json
    import math

    from ngsd_guard.reflection import FirstStepBlend, default_policy

    ones, zeros = torch.ones(1), torch.zeros(1)
    probe = ProbeReader(2 * ones, torch.tensor(1.0), zeros, ones, PromptFeatures.parse("last@2"))
    blend = FirstStepBlend(probe_weight=0.5, divergence_weight=4.0, bias=-3.0)
    reader = probe.blended(blend)
    assert str(reader.features) == "last@2+tv@0" and str(probe.features) == "last@2"
    features = torch.tensor([[1.0, 0.5], [-1.0, 0.0]])  # (h, D_0)
    # l = 2h + 1 -> [3, -1]; risk = 10 sigmoid(0.5 l + 4 D_0 - 3)
    expected = [10 / (1 + math.exp(-0.5)), 10 / (1 + math.exp(3.5))]
    assert reader.read(None, ["a", "b"], features).tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="2 features"):
        reader.read(None, ["a"], torch.zeros(1, 1))
    with pytest.raises(ConfigError, match="tv@0"):
        ProbeReader(ones, torch.tensor(0.0), zeros, ones, PromptFeatures.parse("tv@0"))
    probe.save(tmp_path / "probe.safetensors")
    policy = {"risk_map": {"high": 7.0, "low": 7.0}, "blend": blend.model_dump()}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    loaded = default_policy(tmp_path / "probe.safetensors")
    assert loaded.reader.blend == blend and loaded.risk_map.high == 7.0
    assert str(loaded.features) == "last@2+tv@0"


def test_risk_map_thresholds_and_primed_potential():
    risk_map = RiskMap(potential_high=2.0, potential_mid=0.5, escalate_after=4)
    probe = ProbeReader(
        torch.tensor([1.0]),
        torch.tensor(0.0),
        torch.zeros(1),
        torch.ones(1),
        PromptFeatures.parse("last@1"),
    )
    policy = ReflectionAlpha(probe, risk_map)
    assert policy.features == probe.features
    # logits 5 -> risk 9.93 (high), 0 -> 5 (middle band), -5 -> 0.07 (low)
    assessments = policy.assess(None, ["h", "m", "l"], torch.tensor([[5.0], [0.0], [-5.0]]))
    assert [a.alpha for a in assessments] == [0.9, 0.5, 0.1]
    assert [a.potential for a in assessments] == [2.0, 0.5, 0.0]
    assert assessments[1].risk == pytest.approx(5.0)
    assert {a.escalate_after for a in assessments} == {4}
    with pytest.raises(ConfigError, match="`low`"):
        RiskMap(low=7, high=6)
