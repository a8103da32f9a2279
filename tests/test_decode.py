"""The decode loop against an independent, uncached, step-by-step NGSD written here."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ngsd_guard import GateConfig, GenerationRequest, GuardConfig, GuardedLM, InterventionConfig
from ngsd_guard.alpha import Assessment
from ngsd_guard.decode import (
    FIRST_ACTIVE_WINDOW,
    OVERLAP_MAX_TOKENS,
    Decoder,
    LinearCost,
    Timing,
    overlaps,
)

PROMPTS = ["Tell me a story about a dragon.", "Hi", "What is the capital of France, please?"]


def guarded(base, tokenizer, expert=None, **config) -> GuardedLM:
    return GuardedLM.from_models(base, tokenizer, expert=expert, config=GuardConfig(**config))


@torch.no_grad()
def reference_ngsd(
    base_logits,
    expert_logits,
    base_ids,
    expert_ids,
    *,
    tau,
    threshold,
    alpha,
    top_k,
    max_new,
    eos=2,
):
    """Greedy NGSD, recomputing both full sequences every token (the paper's way)."""
    generated, spikes, v = [], [], 0.0
    for _ in range(max_new):
        p_b = torch.softmax(base_logits(base_ids + generated), -1)
        p_e = torch.softmax(expert_logits(expert_ids + generated), -1)
        d = 0.5 * (p_b - p_e).abs().sum().item()
        v = (1 - 1 / tau) * v + d
        spiked = v >= threshold
        if spiked:
            v = 0.6 * v
            union = set(p_b.topk(top_k).indices.tolist()) | set(p_e.topk(top_k).indices.tolist())
            mixed = p_b + alpha * (p_e - p_b)
            token = max(union, key=lambda i: mixed[i].item())
        else:
            token = int(p_b.argmax())
        generated.append(token)
        spikes.append(spiked)
        if token == eos:
            break
    return generated, spikes


def full_logits(model):
    return lambda ids: model(torch.tensor([ids])).logits[0, -1, :].float()


def test_gate_that_never_fires_is_model_generate(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=float("inf")))
    for prompt in PROMPTS:
        ids = tokenizer(lm.render(prompt), return_tensors="pt", add_special_tokens=False)
        expected = tiny_base.generate(**ids, max_new_tokens=20, do_sample=False)
        got = lm.generate(prompt, max_new_tokens=20)
        assert got.token_ids == expected[0, ids["input_ids"].shape[1] :].tolist()
        assert got.summary.spikes == 0 and got.summary.mean_divergence > 0


def test_gate_that_never_fires_is_model_generate_batched(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=float("inf")))
    texts = [lm.render(p) for p in PROMPTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    expected = tiny_base.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=2)
    expected = expected[:, batch["input_ids"].shape[1] :].tolist()
    results = lm.generate_batch(PROMPTS, max_new_tokens=12)
    for row, result in enumerate(results):
        tokens = expected[row]
        if 2 in tokens:
            tokens = tokens[: tokens.index(2) + 1]
        assert result.token_ids == tokens


@pytest.mark.parametrize("window", [1, 8])
def test_matches_uncached_step_by_step_ngsd(tiny_base, tiny_expert, tokenizer, window):
    lm = guarded(
        tiny_base,
        tokenizer,
        tiny_expert,
        gate=GateConfig(tau=4, threshold=1.5),
        intervention=InterventionConfig(alpha=0.7),
        window=window,
    )
    for prompt in PROMPTS:
        ids = tokenizer(lm.render(prompt), add_special_tokens=False)["input_ids"]
        tokens, spikes = reference_ngsd(
            full_logits(tiny_base),
            full_logits(tiny_expert),
            ids,
            ids,
            tau=4,
            threshold=1.5,
            alpha=0.7,
            top_k=64,
            max_new=24,
        )
        got = lm.generate(prompt, max_new_tokens=24)
        assert got.token_ids == tokens
        assert [r.spiked for r in got.records] == spikes
    assert sum(spikes) > 0


@pytest.mark.parametrize("overlap", [0, 1000])
@pytest.mark.parametrize("delay", [None, 1e-6])
def test_every_schedule_gives_the_step_by_step_tokens(
    tiny_base, tiny_expert, tokenizer, monkeypatch, overlap, delay
):
    """Streams whose windows the delay bound cuts to one token, or that grow to the window;
    verifications beside the base's steps or between them: the tokens of ``window=1``."""
    monkeypatch.setattr("ngsd_guard.decode.overlaps", lambda base, expert: True)
    monkeypatch.setattr("ngsd_guard.decode.OVERLAP_MAX_TOKENS", overlap)
    gate = GateConfig(threshold=0.8)
    step = guarded(tiny_base, tokenizer, tiny_expert, gate=gate, window=1)
    expected = step.generate_batch(PROMPTS, max_new_tokens=30)
    assert sum(g.summary.intervened for g in expected) > 0
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=gate, window=8, max_stream_delay=delay)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        stream = lm.stream(prompt, max_new_tokens=30)
        records = list(stream)
        assert [r.token_id for r in records] == want.token_ids
        assert [r.spiked for r in records] == [r.spiked for r in want.records]
    batch = lm.stream_requests([GenerationRequest(p, {"max_new_tokens": 30}) for p in PROMPTS])
    list(batch)
    assert [g.token_ids for g in batch.generations] == [g.token_ids for g in expected]


def test_interventions_happen_and_windows_agree(tiny_base, tiny_expert, tokenizer):
    runs = {}
    for window in (1, 3, 8):
        lm = guarded(
            tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=0.8), window=window
        )
        runs[window] = lm.generate_batch(PROMPTS, max_new_tokens=30)
    assert sum(g.summary.intervened for g in runs[1]) > 0
    for window in (3, 8):
        for a, b in zip(runs[1], runs[window], strict=True):
            assert a.token_ids == b.token_ids
            assert [r.spiked for r in a.records] == [r.spiked for r in b.records]
            assert [r.intervened for r in a.records] == [r.intervened for r in b.records]


def test_alpha_one_always_firing_is_expert_greedy_on_the_union(tiny_base, tiny_expert, tokenizer):
    lm = guarded(
        tiny_base,
        tokenizer,
        tiny_expert,
        gate=GateConfig(threshold=0.0),
        intervention=InterventionConfig(alpha=1.0),
    )
    got = lm.generate(PROMPTS[0], max_new_tokens=16)
    ids = tokenizer(lm.render(PROMPTS[0]), add_special_tokens=False)["input_ids"]
    expert = full_logits(tiny_expert)
    prefix = list(ids)
    for token in got.token_ids:
        assert token == int(expert(prefix).argmax())  # top-1 of p_e is always in the union
        prefix.append(token)
    assert all(r.spiked for r in got.records)


def test_lora_expert_shares_weights_and_matches_reference(tiny_base, tokenizer):
    import copy

    base = copy.deepcopy(tiny_base)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    lm = GuardedLM.from_models(
        peft_model, tokenizer, config=GuardConfig(gate=GateConfig(tau=4, threshold=0.5))
    )
    assert lm.expert_kind == "lora" and lm.expert_first_layer == 0  # layer 0 is adapted
    base_q = lm.base_model.model.layers[0].self_attn.q_proj
    peft_q = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert not hasattr(base_q, "lora_A") and hasattr(peft_q, "lora_A")
    assert base_q.weight.data_ptr() == peft_q.base_layer.weight.data_ptr()  # one copy
    got = lm.generate(PROMPTS[0], max_new_tokens=16)
    tokens, spikes = reference_lora_ngsd(peft_model, lm.render(PROMPTS[0]), tokenizer)
    assert got.token_ids == tokens and [r.spiked for r in got.records] == spikes
    assert got.summary.mean_divergence > 0


@pytest.mark.parametrize("setting", ["auto", "float32", "bfloat16"])
def test_the_expert_cache_is_stored_in_its_dtype_and_windows_still_agree(
    tiny_base, tokenizer, monkeypatch, setting
):
    """The expert's cache (``expert_cache_dtype``: float16 for a float32 expert by default)
    changes no schedule's tokens: one token per verification equals windows of 8, and a
    float16 or bfloat16 cache still decodes the float32 reference's tokens here. The base's
    cache stays as it computes."""
    import copy

    import ngsd_guard.sides

    stored = []
    growing = ngsd_guard.sides.growing

    def recording(cache, dtype=None):
        stored.append(dtype)
        return growing(cache, dtype)

    monkeypatch.setattr(ngsd_guard.sides, "growing", recording)
    peft_model = get_peft_model(
        copy.deepcopy(tiny_base),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    runs = []
    for window in (1, 8):
        config = GuardConfig(
            gate=GateConfig(tau=4, threshold=0.5), window=window, expert_cache_dtype=setting
        )
        lm = GuardedLM.from_models(peft_model, tokenizer, config=config)
        runs.append(lm.generate(PROMPTS[0], max_new_tokens=16))
    want = {"auto": torch.float16, "float32": None, "bfloat16": torch.bfloat16}[setting]
    assert set(stored) == {None, want}  # the base's sides as computed, the expert's in dtype
    tokens, spikes = reference_lora_ngsd(peft_model, lm.render(PROMPTS[0]), tokenizer)
    for got in runs:
        assert got.token_ids == tokens and [r.spiked for r in got.records] == spikes


def reference_lora_ngsd(peft_model, text, tokenizer):
    """The reference NGSD of a LoRA expert (adapter on) over its base (adapter off), at the
    tests' gate (tau 4, threshold 0.5), alpha 0.9, 16 tokens."""

    def with_adapter(enabled):
        def logits(seq):
            if enabled:
                return full_logits(peft_model)(seq)
            with peft_model.disable_adapter():
                return full_logits(peft_model)(seq)

        return logits

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return reference_ngsd(
        with_adapter(False),
        with_adapter(True),
        ids,
        ids,
        tau=4,
        threshold=0.5,
        alpha=0.9,
        top_k=64,
        max_new=16,
    )


@pytest.mark.parametrize("window", [1, 8])
def test_an_upper_layer_lora_expert_verifies_on_its_layers_alone(tiny_base, tokenizer, window):
    """A LoRA on layer 1 only: verifications run layer 1 over the base's states (the expert's
    layer 0 runs in its prefill alone), and the tokens are the reference NGSD's, one prompt at
    a time and batched."""
    import copy

    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(tiny_base), config).eval()
    gate = GateConfig(tau=4, threshold=0.5)
    lm = GuardedLM.from_models(peft_model, tokenizer, config=GuardConfig(gate=gate, window=window))
    assert lm.expert_first_layer == 1
    lower = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    calls = []
    lower.register_forward_hook(lambda *_: calls.append(1))
    expected = []
    for prompt in PROMPTS:
        tokens, spikes = reference_lora_ngsd(peft_model, lm.render(prompt), tokenizer)
        expected.append(tokens)
        calls.clear()
        got = lm.generate(prompt, max_new_tokens=16)
        # the prefill (and the first call's header): no verification ran the expert's layer 0
        assert len(calls) <= 2
        assert got.token_ids == tokens and [r.spiked for r in got.records] == spikes
        assert got.summary.spikes > 0
    calls.clear()
    batched = lm.generate_batch(PROMPTS, max_new_tokens=16)
    assert [g.token_ids for g in batched] == expected
    assert len(calls) == 1


def test_prompted_expert_sees_the_safety_prompt(tiny_base, tokenizer):
    lm = GuardedLM.from_models(tiny_base, tokenizer)
    assert lm.expert_kind == "prompted"
    tokens = lm.encode_prompt("hello")
    assert len(tokens.expert) > len(tokens.base) + 20
    assert lm.generate("hello", max_new_tokens=5).summary.tokens == 5


def test_batched_rows_equal_single_runs(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=0.8))
    batch = lm.generate_batch(PROMPTS, max_new_tokens=20)
    for prompt, result in zip(PROMPTS, batch, strict=True):
        single = lm.generate(prompt, max_new_tokens=20)
        assert single.token_ids == result.token_ids
        assert single.text == result.text


def test_stream_concatenates_to_generate(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=0.8))
    stream = lm.stream(PROMPTS[0], max_new_tokens=25)
    records = list(stream)
    assert "".join(r.text for r in records) == stream.generation.text
    assert stream.generation.text == lm.generate(PROMPTS[0], max_new_tokens=25).text
    assert [r.step for r in records] == list(range(len(records)))
    assert records[-1].finish_reason in {"stop", "length"}


def test_seeded_sampling_is_reproducible_and_window_independent(tiny_base, tiny_expert, tokenizer):
    outs = []
    for window in (1, 8):
        lm = guarded(
            tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=0.8), window=window
        )
        options = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=7)
        outs.append(lm.generate(PROMPTS[0], **options).token_ids)
        outs.append(lm.generate(PROMPTS[0], **options).token_ids)
    assert outs[0] == outs[1] == outs[2] == outs[3]
    other = lm.generate(PROMPTS[0], max_new_tokens=20, temperature=0.9, seed=8).token_ids
    assert other != outs[0]


def test_stop_string_spanning_tokens(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=float("inf")))
    full = lm.generate(PROMPTS[0], max_new_tokens=30)
    tokens = full.token_ids
    # a stop string made of the text of tokens 5 and 6 (two tokens)
    stop = tokenizer.decode(tokens[5:7])
    assert len(stop) > 1
    cut = lm.generate(PROMPTS[0], max_new_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in "".join(r.text for r in cut.records)


def test_listeners_receive_gate_events(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=0.8))
    events, objects = [], []

    class Handler:
        def on_gate(self, event):
            objects.append(event)

    result = lm.generate(PROMPTS[0], max_new_tokens=20, listeners=[events.append, Handler()])
    assert events and events == objects
    assert [e.step for e in events] == [r.step for r in result.records if r.spiked]
    assert len(result.gate_events) == result.summary.spikes == len(events)


def test_concurrent_threads_equal_sequential(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=0.8))
    prompts = [f"Question number {i}: why?" for i in range(8)]
    sequential = [lm.generate(p, max_new_tokens=16).token_ids for p in prompts]
    concurrent: list[list[int] | None] = [None] * 8

    def work(i):
        concurrent[i] = lm.generate(prompts[i], max_new_tokens=16).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert concurrent == sequential


async def test_astream_keeps_the_loop_running(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert)
    ticks = 0

    async def heartbeat():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    beat = asyncio.create_task(heartbeat())
    stream = lm.astream(PROMPTS[0], max_new_tokens=40)
    seen = [record async for record in stream]
    beat.cancel()
    assert len(seen) == stream.generation.summary.tokens
    assert ticks > 5
    assert (await lm.agenerate(PROMPTS[0], max_new_tokens=40)).token_ids == [
        r.token_id for r in seen
    ]


async def test_cancelling_astream_stops_generation(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=float("inf")))
    stream = lm.astream(PROMPTS[0], max_new_tokens=200, stop=["\x00never"])
    first = await stream.__anext__()
    await stream.aclose()
    assert first.step == 0
    assert stream.generation.finish_reason == "cancelled"
    # the instance stays usable
    assert lm.generate(PROMPTS[0], max_new_tokens=3).summary.tokens == 3


def test_closing_a_sync_stream_cancels(tiny_base, tiny_expert, tokenizer):
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=float("inf")))
    stream = lm.stream(PROMPTS[0], max_new_tokens=200)
    next(iter(stream))
    stream.close()
    assert lm.generate(PROMPTS[0], max_new_tokens=4).summary.tokens == 4


def test_probabilities_are_fp32_whatever_the_model_dtype(tiny_base, tiny_expert, tokenizer):
    import copy

    base = copy.deepcopy(tiny_base).to(torch.bfloat16)
    expert = copy.deepcopy(tiny_expert).to(torch.bfloat16)
    lm = guarded(base, tokenizer, expert, gate=GateConfig(threshold=0.8))
    assert lm.next_token_logprobs([lm.render(PROMPTS[0])]).dtype == torch.float32
    result = lm.generate(PROMPTS[0], max_new_tokens=12)
    assert all(0.0 <= r.divergence <= 1.0 for r in result.records)
    assert result.summary.mean_divergence > 0


class _CyclingConstraint:
    """Token ``j`` of the output must come from subset ``j % 3`` of 300 ids; complete after
    ``length`` tokens. Counts rollbacks, to show that cut drafts are rewound."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.subsets = [torch.zeros(49152, dtype=torch.bool) for _ in range(3)]
        for j, subset in enumerate(self.subsets):
            subset[1000 + 100 * j : 1100 + 100 * j] = True
        self.rolled_back = 0

    def matcher(self):
        return _CyclingMatcher(self)


class _CyclingMatcher:
    def __init__(self, constraint: _CyclingConstraint) -> None:
        self.constraint, self.tokens = constraint, []

    def allowed(self):
        return self.constraint.subsets[len(self.tokens) % 3]

    def accept(self, token_id):
        assert self.allowed()[token_id], "accepted a token the matcher did not allow"
        self.tokens.append(token_id)

    def rollback(self, count):
        self.constraint.rolled_back += count
        del self.tokens[len(self.tokens) - count :]

    def is_complete(self):
        return len(self.tokens) >= self.constraint.length


def test_constrained_windowed_equals_step_by_step(tiny_base, tiny_expert, tokenizer):
    outs = {}
    for window in (1, 8):
        lm = guarded(
            tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=0.5), window=window
        )
        constraint = _CyclingConstraint(length=20)
        outs[window] = lm.generate_batch(PROMPTS, max_new_tokens=30, constraint=constraint)
        if window > 1:
            assert constraint.rolled_back > 0
    assert sum(g.summary.intervened for g in outs[1]) > 0
    for a, b in zip(outs[1], outs[8], strict=True):
        assert a.token_ids == b.token_ids
        assert [r.spiked for r in a.records] == [r.spiked for r in b.records]
        assert a.finish_reason == "stop" and len(a.token_ids) == 20
        assert all(
            1000 + 100 * (j % 3) <= t < 1100 + 100 * (j % 3) for j, t in enumerate(a.token_ids)
        )


class _QuietThenEscalating:
    """Every row: alpha 0 (quiet), escalating to 0.9 after ``after`` dissents."""

    features = None

    def __init__(self, after: int) -> None:
        self.after = after

    def assess(self, lm, requests, features):
        quiet = Assessment(alpha=0.0, escalate_after=self.after, dissent_confidence=0.0)
        return [quiet for _ in requests]


def test_quiet_rows_verify_in_long_windows_until_they_escalate(
    tiny_base, tiny_expert, tokenizer, monkeypatch
):
    """A row at alpha 0 verifies up to ``quiet_window`` drafts at once; once it escalates,
    ``window`` caps it; a row whose alpha is above 0 starts small. Same tokens as window 1."""
    jobs = []  # (first verified token index, drafts verified) of row 0, per verification
    verify = Decoder._verify

    def spy(self, job):
        jobs.append((len(job.rows[0].tokens), job.counts[0]))
        return verify(self, job)

    monkeypatch.setattr(Decoder, "_verify", spy)
    config = GuardConfig(gate=GateConfig(threshold=0.0, tau=2.0), window=2, quiet_window=16)
    lm = GuardedLM.from_models(
        tiny_base,
        tokenizer,
        expert=tiny_expert,
        config=config,
        alpha_policy=_QuietThenEscalating(6),
    )
    got = lm.generate(PROMPTS[0], max_new_tokens=40)
    escalated = next(i for i, r in enumerate(got.records) if r.alpha > 0)
    assert 5 <= escalated < 30 and got.summary.intervened > 0
    assert max(count for start, count in jobs if start <= escalated) > config.window
    assert all(count <= config.window for start, count in jobs if start > escalated)
    step = lm.with_options(config=config.model_copy(update={"window": 1, "quiet_window": 1}))
    want = step.generate(PROMPTS[0], max_new_tokens=40)
    assert got.token_ids == want.token_ids
    assert [r.alpha for r in got.records] == [r.alpha for r in want.records]

    jobs.clear()
    active = guarded(tiny_base, tokenizer, tiny_expert, gate=GateConfig(threshold=0.0), window=16)
    active.generate(PROMPTS[0], max_new_tokens=12, alpha=0.5)
    assert jobs[0][1] == 1  # the first draft, scored by the prefill
    assert jobs[1][1] <= FIRST_ACTIVE_WINDOW


@pytest.mark.parametrize("side_by_side", [False, True])
def test_small_verifications_run_beside_the_base_only_where_the_forwards_can(
    tiny_base, tiny_expert, tokenizer, monkeypatch, side_by_side
):
    """Small verifications (the delay bound keeps them small) run on the worker thread beside
    the base's steps where the two forwards can run side by side (:func:`overlaps`, here
    forced), and on the loop's thread, between steps, where both models share the CPU. Quiet
    rows (alpha 0) and active ones give the tokens of step-by-step decoding either way."""
    threads = []  # the thread of each small verification that feeds the expert
    verify = Decoder._verify

    def spy(self, job):
        if 0 < job.fed_tokens <= OVERLAP_MAX_TOKENS:
            threads.append(threading.current_thread().name)
        return verify(self, job)

    monkeypatch.setattr(Decoder, "_verify", spy)
    monkeypatch.setattr("ngsd_guard.decode.overlaps", lambda base, expert: side_by_side)
    gate = GateConfig(threshold=0.8)
    lm = guarded(tiny_base, tokenizer, tiny_expert, gate=gate, max_stream_delay=1e-6)
    step = guarded(tiny_base, tokenizer, tiny_expert, gate=gate, window=1)
    for alpha in (0.0, 0.7):
        threads.clear()
        got = list(lm.stream(PROMPTS[0], max_new_tokens=32, alpha=alpha))
        assert [r.token_id for r in got] == step.generate(
            PROMPTS[0], max_new_tokens=32, alpha=alpha
        ).token_ids
        # how many depends on timing: the base drafts on while a verification runs
        assert len(threads) >= 2, threads
        assert {name.startswith("ngsd-verify") for name in threads} == {side_by_side}, threads


def test_linear_cost_fits_a_weighted_line_with_a_jacobson_karels_margin():
    """``x̂(n) = a + b·n`` by least squares with weights 7/8 per later observation; margin
    ``4·d`` with ``d = x₀/2``, then ``d ← d + (|x − x̂(n)| − d)/4``; ``b = 0`` from one size,
    never below 0."""
    cost = LinearCost()
    assert cost.estimate(1) is None
    cost.observe(1, 0.1)
    assert cost.estimate(9) == pytest.approx(0.1 + 4 * 0.05)  # one size: flat
    cost.observe(5, 0.3)  # two sizes: the line through both, b = 0.05
    deviation = 0.05 + (abs(0.3 - 0.1) - 0.05) / 4
    assert cost.estimate(9) == pytest.approx(0.05 + 0.05 * 9 + 4 * deviation)
    falling = LinearCost()
    falling.observe(1, 0.3)
    falling.observe(5, 0.1)  # cheaper when larger: noise, so flat at the weighted mean
    deviation = 0.15 + (abs(0.1 - 0.3) - 0.15) / 4
    mean = (7 / 8 * 0.3 + 0.1) / (7 / 8 + 1)
    assert falling.estimate(100) == pytest.approx(mean + 4 * deviation)


def test_timing_waits_a_step_and_a_verification_and_a_step_more_beside_the_base():
    """Putting a verification off adds a step and the verification, and one step more where
    it runs beside the base's steps; an unmeasured verification counts as two steps."""
    timing = Timing()
    assert timing.wait_added(rows=1, tokens=5, beside=False) == 0.0
    timing.observe_step(1, 0.1)
    step = 0.1 + 4 * 0.05
    assert timing.wait_added(rows=1, tokens=5, beside=False) == pytest.approx(3 * step)
    timing.observe_verification(5, 0.3)
    verify = 0.3 + 4 * 0.15
    assert timing.wait_added(rows=1, tokens=5, beside=False) == pytest.approx(step + verify)
    assert timing.wait_added(rows=1, tokens=5, beside=True) == pytest.approx(2 * step + verify)


def test_a_models_calls_and_its_copies_share_one_timing(
    tiny_base, tiny_expert, tokenizer, monkeypatch
):
    """Every call of a GuardedLM, and of the copies ``with_options`` makes, records its steps
    and verifications into one Timing: a stream never starts from a guess once the model has
    decoded."""
    seen = []
    observe = Timing.observe_verification

    def spy(self, tokens, seconds):
        seen.append(self)
        observe(self, tokens, seconds)

    monkeypatch.setattr(Timing, "observe_verification", spy)
    lm = guarded(tiny_base, tokenizer, tiny_expert, window=2)
    copy = lm.with_options(config=lm.config.model_copy())
    other = guarded(tiny_base, tokenizer, tiny_expert, window=2)
    timings = []
    for model in (lm, copy, other):
        seen.clear()
        list(model.stream(PROMPTS[0], max_new_tokens=8, alpha=0.5))
        assert seen, "no verification was timed"
        timings.append({id(t) for t in seen})
    assert timings[0] == timings[1] and len(timings[0]) == 1
    assert timings[2].isdisjoint(timings[0])


def test_verifications_overlap_the_base_only_where_the_forwards_can_run_side_by_side():
    """Both models on one CPU share its cores: their forwards run one after the other. On a
    GPU, or with the expert on a device of its own, any small verification runs beside the
    steps."""

    def runner(device: str) -> SimpleNamespace:
        return SimpleNamespace(handle=SimpleNamespace(device=torch.device(device)))

    def expert(device: str) -> SimpleNamespace:
        return SimpleNamespace(runner=runner(device))

    assert not overlaps(runner("cpu"), None)
    assert not overlaps(runner("cpu"), expert("cpu"))
    assert overlaps(runner("cpu"), expert("cuda:0"))
    assert overlaps(runner("cuda:0"), expert("cuda:0"))
    assert overlaps(runner("cuda:0"), expert("cuda:1"))
