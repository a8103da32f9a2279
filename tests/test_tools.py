"""Tool prompts, tool-call parsing and the JSON/tool-call constraints (on the real tokenizer)."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from ngsd_guard.tools import (
    JsonConstraint,
    ToolCall,
    ToolCallConstraint,
    ToolCallStreamParser,
    normalize_tool,
    parse_tool_calls,
    tools_system_prompt,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"enum": ["c", "f"]},
                "scores": {"type": "array", "items": {"type": "number"}},
                "verbose": {"type": "boolean"},
                "note": {"type": "string"},
            },
            "required": ["city", "days", "unit", "scores", "verbose"],
        },
    },
}
ADD = {
    "name": "add",
    "description": "Add two integers",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
}


# ------------------------------------------------------------------ prompt


def test_normalize_tool_accepts_both_formats() -> None:
    assert normalize_tool(ADD) == {"type": "function", "function": ADD}
    assert normalize_tool(WEATHER) == WEATHER
    with pytest.raises(TypeError, match="no function name"):
        normalize_tool({"description": "x"})


def test_tools_system_prompt_lists_every_schema_and_the_format() -> None:
    prompt = tools_system_prompt([WEATHER, ADD])
    lines = prompt.splitlines()
    assert json.loads(lines[2]) == WEATHER
    assert json.loads(lines[3]) == {"type": "function", "function": ADD}
    assert '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>' in lines


# ------------------------------------------------------------------ parsing


def test_parse_tagged_calls_and_content() -> None:
    text = (
        'Let me check. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [
        ("add", {"a": 1, "b": 2}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    assert calls[0].id != calls[1].id


def test_parse_bare_json_list_fence_and_parameters_key() -> None:
    _, calls = parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    fenced = '```json\n[{"name": "add", "arguments": {}}, {"name": "f", "arguments": {}}]\n```'
    content, calls = parse_tool_calls(fenced)
    assert (content, [c.name for c in calls]) == ("", ["add", "f"])


def test_parse_malformed_and_unknown_stay_in_content() -> None:
    broken = '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>'
    assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls("plain answer") == ("plain answer", [])
    unknown = '{"name": "rm_rf", "arguments": {}}'
    assert parse_tool_calls(unknown, tool_names=["add"]) == (unknown, [])
    assert parse_tool_calls('{"a": 1}') == ('{"a": 1}', [])
    # an unclosed tag at the very end still parses
    _, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 5}}')
    assert calls[0].arguments == {"a": 5}


def test_stream_parser_releases_text_early_and_holds_tags() -> None:
    parser = ToolCallStreamParser()
    assert parser.feed("Hello <tool") == ["Hello "]
    assert parser.feed("_ca") == []
    assert parser.feed('ll>{"name": "add", "arguments": {"a": 1}}</tool_') == []
    pieces = parser.feed("call> done")
    assert isinstance(pieces[0], ToolCall) and pieces[0].arguments == {"a": 1}
    assert pieces[1:] == [" done"]
    assert parser.finish() == []
    # "<" that does not open a tag is released once that is certain
    parser = ToolCallStreamParser()
    assert parser.feed("a <to") == ["a "]
    assert parser.feed("p> c") == ["<top> c"]


# ------------------------------------------------------------------ constraints


def _walk(constraint, text: str, tokenizer) -> list[int]:
    """Feed the natural tokenisation of ``text``, checking each token is allowed."""
    generated: list[int] = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        mask = constraint.allowed_tokens(generated)
        assert mask.shape == (len(tokenizer),) and mask.dtype == torch.bool
        assert mask[token], (
            f"{tokenizer.decode([token])!r} refused after {constraint.text(generated)!r}"
        )
        assert not constraint.is_complete(generated)
        generated.append(token)
    return generated


def test_tool_call_constraint_accepts_the_natural_tokenisation(tokenizer) -> None:
    constraint = ToolCallConstraint(tokenizer, [WEATHER, ADD])
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 12, '
        '"unit": "c", "scores": [1.5, -2e3, 0], "verbose": false}}</tool_call>'
    )
    generated = _walk(constraint, text, tokenizer)
    assert constraint.is_complete(generated)
    assert constraint.text(generated) == text


def test_tool_call_constraint_masks_exactly(tokenizer) -> None:
    constraint = ToolCallConstraint(tokenizer, [WEATHER, ADD], name="add")
    prefix = tokenizer.encode(
        '<tool_call>{"name": "add", "arguments": {"a": ', add_special_tokens=False
    )
    allowed = constraint.allowed_tokens(prefix).nonzero().flatten().tolist()
    texts = {tokenizer.decode([t]) for t in allowed}
    assert texts == {"-", *"0123456789"}
    assert constraint.tool_names == ["add"]
    after_zero = constraint.allowed_tokens([*prefix, tokenizer.convert_tokens_to_ids("0")])
    texts = {tokenizer.decode([t]) for t in after_zero.nonzero().flatten().tolist()}
    assert "," in texts and all(', "b": '.startswith(t) for t in texts)
    with pytest.raises(ValueError, match="not a tool"):
        ToolCallConstraint(tokenizer, [ADD], name="nope")


def test_random_walks_always_parse(tokenizer) -> None:
    """Any path through the mask ends in a call that parses and fits the schema."""
    constraint = ToolCallConstraint(tokenizer, [WEATHER, ADD])
    rng = random.Random(0)
    for _ in range(3):
        generated: list[int] = []
        while not constraint.is_complete(generated):
            allowed = constraint.allowed_tokens(generated).nonzero().flatten().tolist()
            generated.append(rng.choice(allowed))
            assert len(generated) < 400
        content, calls = parse_tool_calls(constraint.text(generated))
        assert content == "" and len(calls) == 1
        call = calls[0]
        if call.name == "add":
            assert set(call.arguments) == {"a", "b"}
            assert all(isinstance(v, int) for v in call.arguments.values())
        else:
            args = call.arguments
            assert list(args) == ["city", "days", "unit", "scores", "verbose"]
            assert isinstance(args["city"], str) and len(args["city"]) <= 256
            assert isinstance(args["days"], int) and args["unit"] in ("c", "f")
            assert all(isinstance(v, int | float) for v in args["scores"])
            assert isinstance(args["verbose"], bool)


def test_json_constraint_nested_refs_and_step_cost(tokenizer) -> None:
    schema = {
        "type": "object",
        "$defs": {
            "Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
        },
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "where": {"$ref": "#/$defs/Point"},
            "kind": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        },
        "required": ["name", "where", "kind"],
    }
    constraint = JsonConstraint(tokenizer, schema)
    text = '{"name": "Ann", "where": {"x": 0.25}, "kind": null}'
    started = time.perf_counter()
    generated = _walk(constraint, text, tokenizer)
    assert (time.perf_counter() - started) / len(generated) < 0.1  # seconds per step, on CPU
    assert constraint.is_complete(generated)
    # maxLength: after 5 characters only the closing quote may follow
    five = tokenizer.encode('{"name": "abcde', add_special_tokens=False)
    texts = {tokenizer.decode([t]) for t in constraint.allowed_tokens(five).nonzero().flatten()}
    assert texts and all(t.startswith('"') for t in texts)


def test_forced_call_with_the_default_model(default_lm) -> None:
    constraint = ToolCallConstraint(default_lm.tokenizer, [WEATHER, ADD], name="add")
    generation = default_lm.generate(
        "What is 3 plus 5?", tools=[WEATHER, ADD], constraint=constraint, max_new_tokens=40
    )
    assert generation.finish_reason == "stop"
    content, calls = parse_tool_calls(generation.text)
    assert content == "" and calls[0].name == "add"
    assert set(calls[0].arguments) == {"a", "b"}


def test_budget_closes_the_output_in_time(tokenizer) -> None:
    """With ``max_tokens``, every path is complete within the budget."""
    rng = random.Random(1)
    for budget in (36, 48):
        constraint = ToolCallConstraint(tokenizer, [WEATHER, ADD], max_tokens=budget)
        generated: list[int] = []
        while not constraint.is_complete(generated):
            allowed = constraint.allowed_tokens(generated).nonzero().flatten().tolist()
            generated.append(rng.choice(allowed))
        assert len(generated) <= budget
        assert len(parse_tool_calls(constraint.text(generated))[1]) == 1


def test_multibyte_characters_only_inside_strings(tokenizer) -> None:
    constraint = JsonConstraint(tokenizer, {"type": "array", "items": {"type": "string"}})
    text = '["你好啊集团", "こんにちは"]'
    generated = _walk(constraint, text, tokenizer)
    assert constraint.is_complete(generated)
    assert tokenizer.decode(generated) == text
    partial = [t for t in range(len(tokenizer)) if tokenizer.decode([t]) == "\ufffd"]
    assert partial and not constraint.allowed_tokens([])[partial].any()


def test_min_tokens_bounds_the_shortest_output(tokenizer) -> None:
    constraint = ToolCallConstraint(tokenizer, [ADD], max_tokens=64)
    shortest = '<tool_call>{"name": "add", "arguments": {"a": 0, "b": 0}}</tool_call>'
    assert constraint.min_tokens >= len(tokenizer.encode(shortest, add_special_tokens=False))
    assert constraint.min_tokens <= len(shortest)
