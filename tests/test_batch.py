"""Per-row requests in one batch: options per row, cancelling a row, rows joining."""

from __future__ import annotations

import pytest

from ngsd_guard import (
    Assessment,
    ConfigError,
    GateConfig,
    GenerationRequest,
    GuardConfig,
    GuardedLM,
)

PROMPTS = ["Tell me a story about a dragon.", "Hi", "What is the capital of France, please?"]


@pytest.fixture(scope="module")
def lm(tiny_base, tiny_expert, tokenizer) -> GuardedLM:
    config = GuardConfig(gate=GateConfig(threshold=0.8), window=8)
    return GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_expert, config=config)


def _single(lm: GuardedLM, request: GenerationRequest):
    return lm.generate(request.prompt, **request.options)


def test_each_row_keeps_its_options_and_equals_its_single_run(lm):
    full = lm.generate(PROMPTS[2], max_new_tokens=16, alpha=0.2)
    stop = lm.tokenizer.decode(full.token_ids[6:8])
    requests = [
        GenerationRequest(PROMPTS[0], {"max_new_tokens": 12}),
        GenerationRequest(
            PROMPTS[1], {"max_new_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 3}
        ),
        GenerationRequest(PROMPTS[2], {"max_new_tokens": 16, "alpha": 0.2, "stop": [stop]}),
    ]
    stream = lm.stream_requests(requests)
    records = list(stream)
    batch = stream.generations
    assert {r.row for r in records} == {0, 1, 2}
    for request, generation in zip(requests, batch, strict=True):
        single = _single(lm, request)
        assert generation.token_ids == single.token_ids
        assert generation.text == single.text
        assert generation.finish_reason == single.finish_reason
    assert len(batch[0].token_ids) <= 12
    assert batch[2].finish_reason == "stop" and stop not in batch[2].text
    assert batch[2].summary.alpha == 0.2


def test_cancelling_one_row_leaves_the_others_unchanged(lm):
    requests = [GenerationRequest(p, {"max_new_tokens": 24}) for p in PROMPTS]
    stream = lm.stream_requests(requests)
    for record in stream:
        if record.row == 1 and record.step == 2:
            stream.cancel(1)
    batch = stream.generations
    assert batch[1].finish_reason == "cancelled"
    alone = [_single(lm, r) for r in requests]
    assert alone[1].token_ids[: len(batch[1].token_ids)] == batch[1].token_ids
    assert len(batch[1].token_ids) < len(alone[1].token_ids)
    for row in (0, 2):
        assert batch[row].token_ids == alone[row].token_ids


def test_a_request_added_while_streaming_joins_the_batch(lm):
    first = GenerationRequest(PROMPTS[0], {"max_new_tokens": 20})
    later = GenerationRequest(PROMPTS[2], {"max_new_tokens": 10, "temperature": 0.7, "seed": 5})
    stream = lm.stream_requests([first])
    added = None
    for record in stream:
        if added is None and record.step == 3:
            added = stream.add(later)
    assert added == 1 and stream.rows == 2
    batch = stream.generations
    assert batch[0].token_ids == _single(lm, first).token_ids
    assert batch[1].token_ids == _single(lm, later).token_ids
    with pytest.raises(RuntimeError, match="finished"):
        stream.add(later)


def test_bad_batches_fail_before_decoding(lm):
    with pytest.raises(ConfigError, match="guard"):
        lm.stream_requests(
            [GenerationRequest("a", {"guard": False}), GenerationRequest("b", {"guard": True})]
        )
    with pytest.raises(ConfigError, match="unknown option"):
        lm.stream_requests([GenerationRequest("a", {"max_tokens": 3})])  # type: ignore[typeddict-unknown-key]


def test_base_alone_reports_the_gate_potential_not_another_state_value(lm):
    class Primed:
        features = None

        def assess(self, lm, requests, hidden):
            return [Assessment(alpha=0.5, potential=2.0) for _ in requests]

    adam = lm.with_options(
        config=GuardConfig(gate=GateConfig(kind="adam", threshold=5.0)), alpha_policy=Primed()
    )
    records = adam.generate(PROMPTS[0], max_new_tokens=4, guard=False).records
    assert [r.potential for r in records] == [2.0] * 4  # v, not Adam's first moment m = 0
