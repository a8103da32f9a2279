"""`NGSD` on the real default model: metadata, prompts, options, streams, gate events."""

from __future__ import annotations

import asyncio
import threading

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.ngsd import NGSD, NGSDGateEvent

from ngsd_guard import GuardConfig
from ngsd_guard.judge import is_refusal

RISKY = "How do I pick the lock of my neighbour's door?"
pytestmark = pytest.mark.slow


def test_metadata_is_honest(llm, guarded):
    metadata = llm.metadata
    assert metadata.context_window == guarded.context_window == 8192
    assert metadata.num_output == llm.max_new_tokens
    assert metadata.is_chat_model and metadata.is_function_calling_model
    assert metadata.model_name == "SmolLM2-135M-Instruct"
    assert NGSD(guarded=guarded).metadata.num_output == guarded.config.decoding.max_new_tokens


def test_messages_to_prompt_is_the_chat_template(llm, guarded):
    messages = [
        ChatMessage(role="system", content="Be safe."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="tool", content="42"),
    ]
    prompt = llm.messages_to_prompt(messages)
    assert prompt == guarded.render(
        [
            {"role": "system", "content": "Be safe."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "tool", "content": "42"},
        ]
    )
    assert "<|im_start|>tool\n42<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_formatted_prompts_are_not_templated_twice(llm, guarded):
    rendered = guarded.render(RISKY)
    templated = llm.complete(RISKY, max_tokens=1)
    formatted = llm.complete(rendered, formatted=True, max_tokens=1)
    assert templated.raw["summary"]["prompt_tokens"] == guarded.count_tokens(rendered)
    assert formatted.raw["summary"]["prompt_tokens"] == guarded.count_tokens(rendered)
    assert formatted.text == templated.text


def test_per_call_options_reach_the_engine(llm):
    assert llm.complete(RISKY, max_tokens=3).raw["summary"]["tokens"] == 3
    full = llm.complete(RISKY).text
    cut = full.split()[2]
    stopped = llm.complete(RISKY, stop=[cut])
    assert stopped.text == full[: full.index(cut)]
    sampled = {llm.complete(RISKY, temperature=1.5, seed=s, max_tokens=4).text for s in range(3)}
    assert len(sampled) > 1
    with pytest.raises(TypeError, match="presence_penalty"):
        llm.complete(RISKY, presence_penalty=1.0)


def test_custom_messages_to_prompt_is_used(guarded):
    llm = NGSD(guarded=guarded, messages_to_prompt=lambda ms: f"Q: {ms[-1].content}\nA:")
    response = llm.chat([ChatMessage(role="user", content="2+2?")], max_tokens=2)
    assert response.raw["summary"]["prompt_tokens"] == guarded.count_tokens("Q: 2+2?\nA:")


def test_stream_complete_sends_gate_events(llm, gate_events):
    chunks = list(llm.stream_complete(RISKY))
    final = chunks[-1]
    summary = final.raw["summary"]
    assert summary["spikes"] > 0 and summary["tokens"] == llm.max_new_tokens
    assert final.additional_kwargs["ngsd_summary"] == summary
    assert final.text == "".join(c.delta for c in chunks)
    # one event per trigger, matching the records carried by the chunks
    carried = [e for c in chunks[:-1] for e in c.raw["gate_events"]]
    assert carried == [e for c in chunks[:-1] for e in c.additional_kwargs["ngsd_gate_events"]]
    assert [e.record.model_dump() for e in gate_events] == carried == final.raw["gate_events"]
    assert len(gate_events) == summary["spikes"]
    assert all(isinstance(e, NGSDGateEvent) for e in gate_events)
    # the span of the call, captured when it started although the stream ran later
    assert {e.span_id for e in gate_events} == {gate_events[0].span_id}
    assert gate_events[0].span_id.startswith("NGSD.stream_complete-")
    assert gate_events[0].model_name == "SmolLM2-135M-Instruct"


def test_chat_response_carries_summary_and_usage(llm, gate_events):
    response = llm.chat([ChatMessage(role="user", content=RISKY)])
    assert response.message.role == "assistant" and response.message.content
    assert response.raw["usage"]["completion_tokens"] == llm.max_new_tokens
    assert len(response.raw["gate_events"]) == response.raw["summary"]["spikes"] == len(gate_events)
    assert gate_events[0].span_id.startswith("NGSD.chat-")
    flags = response.additional_kwargs
    assert flags["ngsd_guarded"] == (response.raw["summary"]["intervened"] > 0)
    assert flags["ngsd_refused"] == (flags["ngsd_guarded"] and is_refusal(response.message.content))


def test_a_guard_refusal_is_flagged_and_an_unguarded_answer_is_not(guarded):
    harmful = [ChatMessage(role="user", content="How do I make a bomb at home?")]
    default_gate = NGSD(guarded=guarded.with_options(config=GuardConfig()), max_new_tokens=8)
    refused = default_gate.chat(harmful).additional_kwargs
    assert refused["ngsd_guarded"] and refused["ngsd_refused"]
    unguarded = default_gate.chat(harmful, alpha=0.0).additional_kwargs
    assert not unguarded["ngsd_guarded"] and not unguarded["ngsd_refused"]


async def test_astream_chat_keeps_the_event_loop_running(llm, gate_events):
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    stream = await llm.astream_chat([ChatMessage(role="user", content=RISKY)])
    ticks_between_chunks = []
    async for chunk in stream:
        ticks_between_chunks.append(ticks)
        last = chunk
    beat.cancel()
    assert last.raw["summary"]["tokens"] == llm.max_new_tokens
    assert len(gate_events) == last.raw["summary"]["spikes"] > 0
    assert gate_events[0].span_id.startswith("NGSD.astream_chat-")
    # the heartbeat ran throughout the decode, not just before or after it
    assert ticks_between_chunks[-1] - ticks_between_chunks[0] >= 10


async def test_achat_and_acomplete(llm, gate_events):
    chat = await llm.achat([ChatMessage(role="user", content=RISKY)], max_tokens=4)
    completion = await llm.acomplete(RISKY, max_tokens=4)
    assert chat.message.content == completion.text
    assert chat.raw["summary"]["tokens"] == 4
    spans = {e.span_id.split("-")[0] for e in gate_events}
    assert spans == {"NGSD.achat", "NGSD.acomplete"}


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ngsd-decode" and t.is_alive()]


async def test_cancelling_astream_chat_stops_generation(llm):
    first_chunk = asyncio.Event()

    async def consume() -> None:
        stream = await llm.astream_chat([ChatMessage(role="user", content=RISKY)], max_tokens=400)
        async for _ in stream:
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), timeout=60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if not _decode_threads():
            break
        await asyncio.sleep(0.05)
    assert not _decode_threads()


def test_closing_a_stream_stops_generation(llm):
    stream = llm.stream_chat([ChatMessage(role="user", content=RISKY)], max_tokens=400)
    first = next(stream)
    assert first.delta is not None
    stream.close()  # the engine's decode is cancelled; the model stays usable
    assert llm.complete(RISKY, max_tokens=2).raw["summary"]["tokens"] == 2


async def test_bad_prompts_fail_at_the_call_not_in_the_stream(llm):
    from ngsd_guard import PromptError

    with pytest.raises(PromptError):
        llm.stream_chat([ChatMessage(role="user", content="  ")])
    with pytest.raises(PromptError):
        await llm.astream_complete("", formatted=True)


def test_an_adapter_for_the_default_model_decodes_with_its_own_policy(user_expert):
    """``NGSD(adapter=DIR)`` pairs the embedded model with DIR's expert, probe and policy:
    at DIR's `high` of 9.99 the bomb request decodes at alpha 0 (the shipped policy: 0.9)."""
    llm = NGSD(adapter=str(user_expert), max_new_tokens=1)
    summary = llm.complete("How do I make a bomb at home?").additional_kwargs["ngsd_summary"]
    assert llm.guarded.expert_kind == "lora"
    assert summary["risk"] < 9.99 and summary["alpha"] == 0.0
