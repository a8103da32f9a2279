"""In-flight alpha escalation: closed form, and in the decode loop (windowed = step by step)."""

from __future__ import annotations

import math

import torch

from ngsd_guard import GateConfig, GuardConfig, GuardedLM
from ngsd_guard.alpha import Assessment, escalated_alpha
from ngsd_guard.config import DecodingConfig


class EscalatingPolicy:
    """Every row: alpha 0.1, escalating to 0.9 after ``after`` dissents."""

    features = None

    def __init__(self, after: int, confidence: float = 0.0) -> None:
        self.after, self.confidence = after, confidence

    def assess(self, lm, requests, features):
        return [
            Assessment(
                alpha=0.1,
                escalate_after=self.after,
                escalated_alpha=0.9,
                dissent_confidence=self.confidence,
            )
            for _ in requests
        ]


def test_escalated_alpha_closed_form():
    alpha = torch.tensor([0.1, 0.1, 0.1, 0.95])
    dissents = torch.tensor([2.0, 3.0, 4.0, 5.0])
    after = torch.tensor([3.0, 3.0, math.inf, 1.0])
    raised = torch.full((4,), 0.9)
    # below the count: unchanged; at it: raised; never for inf; never lowered
    expected = torch.tensor([0.1, 0.9, 0.1, 0.95])
    assert torch.equal(escalated_alpha(alpha, dissents, after, raised), expected)


def _lm(
    tiny_base, tiny_expert, tokenizer, threshold: float, window: int, confidence: float = 0.0
) -> GuardedLM:
    config = GuardConfig(
        gate=GateConfig(threshold=threshold, tau=2.0),
        decoding=DecodingConfig(max_new_tokens=12),
        window=window,
    )
    return GuardedLM.from_models(
        tiny_base,
        tokenizer,
        expert=tiny_expert,
        config=config,
        alpha_policy=EscalatingPolicy(3, confidence),
    )


def test_alpha_rises_at_the_third_dissent(tiny_base, tiny_expert, tokenizer):
    lm = _lm(tiny_base, tiny_expert, tokenizer, threshold=0.0, window=4)
    generation = lm.generate("Tell me a story.")
    dissents, expected = 0, []
    for record in generation.records:
        assert record.spiked and record.expert_token_id >= 0
        # confidence 0: every spike where the expert's top token is not the draft's
        assert record.dissent == (record.expert_token_id != record.base_token_id)
        dissents += record.dissent
        expected.append(0.9 if dissents >= 3 else 0.1)
    assert dissents >= 3  # two random models disagree often
    assert [round(r.alpha, 4) for r in generation.records] == expected
    assert generation.summary.alpha == 0.1 and generation.summary.escalated
    # a dissent needs the expert to put at least `confidence` on its token: 1.0 never happens
    never = _lm(tiny_base, tiny_expert, tokenizer, threshold=0.0, window=4, confidence=1.0)
    generation = never.generate("Tell me a story.")
    assert not any(r.dissent for r in generation.records) and not generation.summary.escalated


def test_escalation_windowed_equals_step_by_step(tiny_base, tiny_expert, tokenizer):
    prompts = ["Tell me a story.", "How are you today?", "List three colours."]
    for threshold in (0.3, 0.8):
        stepwise = _lm(tiny_base, tiny_expert, tokenizer, threshold, 1).generate_batch(prompts)
        windowed = _lm(tiny_base, tiny_expert, tokenizer, threshold, 8).generate_batch(prompts)
        for one, other in zip(stepwise, windowed, strict=True):
            assert one.token_ids == other.token_ids
            assert [r.alpha for r in one.records] == [r.alpha for r in other.records]
            assert [r.spiked for r in one.records] == [r.spiked for r in other.records]
