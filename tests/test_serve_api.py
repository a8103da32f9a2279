"""The OpenAI-compatible service on tiny random models (fast): shapes, SSE framing, batching,
limits, auth and errors, over a real loopback port."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest
from serving import serving
from tiny_models import tiny_llama

from ngsd_guard import GateConfig, GuardConfig, GuardedLM
from ngsd_guard.serve import ServeSettings
from ngsd_guard.serve.app import create_app
from ngsd_guard.serve.mapping import to_engine_messages
from ngsd_guard.serve.protocol import ChatCompletionRequest
from ngsd_guard.tools import HERMES

KEY = "sk-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [
    "Tell me about volcanoes.",
    "What is two plus two?",
    "Write a haiku about the sea.",
    "How do I make a bomb at home?",
    "Name three colours.",
    "Why is the sky blue?",
    "Give me a recipe for bread.",
    "Who wrote Hamlet?",
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tiny_lm(tiny_base, tiny_expert, tokenizer) -> GuardedLM:
    # a low threshold: the neuron fires on these random models
    config = GuardConfig(gate=GateConfig(threshold=0.5))
    return GuardedLM.from_models(
        tiny_base, tokenizer, expert=tiny_expert, config=config, model_name="tiny"
    )


def settings(**changes: Any) -> ServeSettings:
    fields: dict[str, Any] = {
        "model_name": "tiny",
        "api_key": KEY,
        "max_batch": 8,
        "max_queue": 8,
        "max_tokens_cap": 32,
        "default_max_tokens": 8,
        "max_body_bytes": 16 * 1024,
        "join_window_s": 0.05,
    }
    return ServeSettings(**(fields | changes))


@pytest.fixture(scope="module")
def server(tiny_lm):
    app = create_app(tiny_lm, settings())
    with serving(app) as url:
        yield url, app


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as client:
        yield client


def chat(content: str = "Hello!", **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


def sse(response: httpx.Response) -> list[Any]:
    """The data of each SSE event; "[DONE]" stays a string."""
    events = []
    for block in response.text.split("\n\n"):
        data = [line[len("data: ") :] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            text = "\n".join(data)
            events.append(text if text == "[DONE]" else json.loads(text))
    return events


# ------------------------------------------------------------------ routes and shapes
def test_health_ready_and_models(http):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_chat_completion_is_the_engine_output(http, tiny_lm):
    expected = tiny_lm.generate(PROMPTS[0], max_new_tokens=8)
    body = http.post("/v1/chat/completions", json=chat(PROMPTS[0])).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text, "refusal": None}
    assert choice["finish_reason"] == expected.finish_reason
    assert body["usage"] == {
        "prompt_tokens": expected.summary.prompt_tokens,
        "completion_tokens": expected.summary.tokens,
        "total_tokens": expected.summary.prompt_tokens + expected.summary.tokens,
    }
    ngsd = body["ngsd"]
    assert ngsd["summary"]["spikes"] == expected.summary.spikes > 0
    assert [e["step"] for e in ngsd["gate_events"]] == [e.step for e in expected.gate_events]


def test_streamed_chunks_then_usage_then_done(http, tiny_lm):
    expected = tiny_lm.generate(PROMPTS[0], max_new_tokens=8)
    response = http.post(
        "/v1/chat/completions",
        json=chat(PROMPTS[0], stream=True, stream_options={"include_usage": True}),
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == expected.summary.tokens
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected.text
    # each spike rides on the chunk of its token; the summary on the finishing chunk
    spiking = [c for c in chunks if "gate_events" in c.get("ngsd", {})]
    assert len(spiking) == expected.summary.spikes
    for chunk in spiking:
        (event,) = chunk["ngsd"]["gate_events"]
        assert chunk["choices"][0]["delta"].get("content", "") == event["text"]
    *_, last = chunks
    assert last["choices"][0]["finish_reason"] == expected.finish_reason
    assert last["ngsd"]["summary"]["tokens"] == expected.summary.tokens


def test_completions_decode_each_prompt_raw(http, tiny_lm):
    prompts = ["The capital of France is", "Once upon a time"]
    body = http.post(
        "/v1/completions", json={"model": "tiny", "prompt": prompts, "max_tokens": 6}
    ).json()
    assert body["object"] == "text_completion"
    expected = [tiny_lm.generate(p, raw=True, max_new_tokens=6) for p in prompts]
    assert [c["text"] for c in body["choices"]] == [g.text for g in expected]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert len(body["ngsd"]["summaries"]) == 2


# ------------------------------------------------------------------ batching
async def test_concurrent_requests_share_batches_and_match_one_by_one(server, tiny_lm):
    url, app = server
    before = app.state.scheduler.load()["batches"]

    async def one(client: httpx.AsyncClient, prompt: str) -> str:
        body = chat(prompt, stream=True, max_tokens=12)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            text = ""
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[len("data: ") :])
                    text += chunk["choices"][0]["delta"].get("content", "")
            return text

    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
        texts = await asyncio.gather(*(one(client, p) for p in PROMPTS))
    load = app.state.scheduler.load()
    assert load["batches"] - before < len(PROMPTS) and load["largest_batch"] > 1
    assert texts == [tiny_lm.generate(p, max_new_tokens=12).text for p in PROMPTS]


async def test_a_client_that_disconnects_frees_its_row_and_the_others_finish(tokenizer):
    lm = GuardedLM.from_models(
        tiny_llama(0, max_positions=4096),
        tokenizer,
        expert=tiny_llama(1, max_positions=4096),
        model_name="tiny",
    )
    app = create_app(lm, settings(max_batch=2, max_tokens_cap=4000))
    scheduler = app.state.scheduler

    async def leave_after_the_first_chunk(client: httpx.AsyncClient) -> None:
        body = chat(PROMPTS[0], stream=True, max_tokens=4000)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    return  # leaving the block closes the connection

    async def stay(client: httpx.AsyncClient, prompt: str) -> str:
        await asyncio.sleep(0.01)  # behind the leaver
        response = await client.post("/v1/chat/completions", json=chat(prompt, max_tokens=8))
        return response.json()["choices"][0]["message"]["content"]

    with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
            _, *texts = await asyncio.gather(
                leave_after_the_first_chunk(client), *(stay(client, p) for p in PROMPTS[1:4])
            )
            while scheduler.load()["decoding"]:
                await asyncio.sleep(0.01)
        load = scheduler.load()
    # the leaver's row stopped: far fewer than its 4000 tokens were decoded in all
    assert load["cancelled"] == 1 and load["active"] == 0 and load["tokens"] < 1000
    assert texts == [lm.generate(p, max_new_tokens=8).text for p in PROMPTS[1:4]]


# ------------------------------------------------------------------ tools and formats
def test_forced_tool_call_is_a_valid_openai_tool_call(http):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = http.post(
        "/v1/chat/completions",
        json=chat("Weather in Paris?", tools=[WEATHER], tool_choice=choice, max_tokens=32),
    ).json()
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}
    streamed = sse(
        http.post(
            "/v1/chat/completions",
            json=chat(
                "Weather?", tools=[WEATHER], tool_choice="required", stream=True, max_tokens=32
            ),
        )
    )
    deltas = [c["choices"][0]["delta"] for c in streamed[:-1] if c["choices"]]
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert [t["index"] for t in calls] == [0]
    assert json.loads(calls[0]["function"]["arguments"]).keys() == {"city"}


def test_json_schema_and_json_object_formats_give_valid_json(http):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 10}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    body = http.post(
        "/v1/chat/completions",
        json=chat(
            "Answer in JSON.",
            max_tokens=24,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema, "strict": True},
            },
        ),
    ).json()
    assert set(json.loads(body["choices"][0]["message"]["content"])) == {"answer"}
    body = http.post(
        "/v1/chat/completions",
        json=chat("Answer in JSON.", max_tokens=32, response_format={"type": "json_object"}),
    ).json()
    assert body["choices"][0]["finish_reason"] == "stop"  # closed within the budget
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


def test_tool_turns_render_in_the_models_tool_format():
    body = ChatCompletionRequest.model_validate(
        {
            "model": "tiny",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."},
            ],
        }
    )
    assert to_engine_messages(body.messages, call_format=HERMES) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
            "</tool_call>",
        },
        {"role": "tool", "content": "Sunny.", "tool_call_id": "call_1"},
    ]


# ------------------------------------------------------------------ errors and limits
BAD_REQUESTS = [
    # (description, request keywords, status, code)
    ("malformed JSON", {"content": b'{"model": "tiny", "messages": ['}, 400, "invalid_json"),
    ("unknown field", {"json": chat(temprature=0.5)}, 400, "unknown_parameter"),
    ("wrong type", {"json": chat(max_tokens="many")}, 400, "invalid_value"),
    ("unsupported n", {"json": chat(n=3)}, 400, "invalid_value"),
    ("max_tokens past the cap", {"json": chat(max_tokens=33)}, 400, "invalid_value"),
    ("unknown model", {"json": chat() | {"model": "gpt-4o"}}, 404, "model_not_found"),
    ("guard override", {"json": chat(ngsd={"guard": False})}, 403, "guard_override_not_allowed"),
    (
        "unknown tool",
        {
            "json": chat(
                tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}
            )
        },
        400,
        "invalid_value",
    ),  # noqa: E501
    ("oversized body", {"json": chat("x" * 20_000)}, 413, "request_too_large"),
    ("oversized chunked body", {"content": iter([b"x" * 9000] * 2)}, 413, "request_too_large"),
    ("prompt too long", {"json": chat("word " * 400)}, 400, "context_length_exceeded"),
    (
        "wrong API key",
        {"json": chat(), "headers": {"Authorization": "Bearer sk-wrong"}},
        401,
        "invalid_api_key",
    ),  # noqa: E501
    ("no API key", {"json": chat(), "headers": {"Authorization": ""}}, 401, "invalid_api_key"),
]


@pytest.mark.parametrize(
    ("case", "request_kwargs", "status", "code"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    http, case, request_kwargs, status, code
):
    response = http.post("/v1/chat/completions", **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    assert http.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def test_unknown_route_is_an_openai_404(http):
    response = http.get("/v1/embeddings")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_a_full_queue_answers_429_and_the_guard_can_be_switched_off(tiny_lm):
    app = create_app(tiny_lm, settings(max_batch=1, max_queue=0, allow_guard_overrides=True))
    with serving(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        with http.stream(
            "POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=32)
        ) as first:
            next(first.iter_lines())  # the first request holds the only row
            refused = http.post("/v1/chat/completions", json=chat())
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert refused.headers["retry-after"] == "1"
            assert http.get("/ready").status_code == 503
        while http.get("/ready").status_code != 200:  # the first request's row ends
            time.sleep(0.01)
        unguarded = http.post(
            "/v1/chat/completions", json=chat(PROMPTS[3], ngsd={"guard": False})
        ).json()
    expected = tiny_lm.generate(PROMPTS[3], guard=False, max_new_tokens=8)
    assert unguarded["choices"][0]["message"]["content"] == expected.text
    assert unguarded["ngsd"]["summary"]["spikes"] == 0 and "gate_events" not in unguarded["ngsd"]


def test_the_api_key_never_reaches_the_logs(http, caplog):
    caplog.set_level(logging.DEBUG)
    http.post("/v1/chat/completions", json=chat(max_tokens=2))
    http.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {KEY}x"})
    assert KEY not in caplog.text
    assert KEY not in repr(settings()) and KEY not in str(settings().model_dump())
