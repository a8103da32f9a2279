"""Tool prompts, formats, parsing, the grammar constraints and the tool-choice rules (on the real
SmolLM2 tokenizer, and on it dressed as the Qwen, Llama 3 and Mistral families)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from family_tokenizers import FAMILIES, family_tokenizer
from pydantic import BaseModel
from tiny_models import tiny_llama

from ngsd_guard import ConfigError, GuardedLM
from ngsd_guard.tools import (
    HERMES,
    JsonConstraint,
    ToolCall,
    ToolCallConstraint,
    ToolCallStreamParser,
    normalize_tool,
    normalize_tool_choice,
    parse_tool_calls,
    plan_tools,
    response_schema,
    tool_format,
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


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    directory = tmp_path_factory.mktemp("families")
    return {family: family_tokenizer(family, directory) for family in FAMILIES}


# ------------------------------------------------------------------ prompt and schemas


def test_normalize_tool_accepts_both_formats() -> None:
    assert normalize_tool(ADD) == {"type": "function", "function": ADD}
    assert normalize_tool(WEATHER) == WEATHER
    with pytest.raises(TypeError, match="no function name"):
        normalize_tool({"description": "x"})


def test_tools_system_prompt_lists_every_schema_and_the_format() -> None:
    lines = tools_system_prompt([WEATHER, ADD]).splitlines()
    assert json.loads(lines[2]) == WEATHER
    assert json.loads(lines[3]) == {"type": "function", "function": ADD}
    assert '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>' in lines


class Person(BaseModel):
    name: str
    age: int | None = None


def test_response_schema_spellings() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    wrapper = {"name": "A", "schema": schema, "strict": True}
    assert response_schema({"type": "json_schema", "json_schema": wrapper}) == schema
    assert response_schema({"type": "json_schema", "json_schema": schema}) == schema
    assert response_schema({"type": "json_object"}) == {"type": "object"}
    assert response_schema({"type": "text"}) is None and response_schema(None) is None
    assert response_schema(schema) == schema
    assert response_schema(Person) == Person.model_json_schema()
    with pytest.raises(ConfigError, match="response_format"):
        response_schema({"type": "xml"})


def test_tool_choice_spellings() -> None:
    names = ["add", "get_weather"]
    for spelling, expected in [
        (None, "auto"),
        ("auto", "auto"),
        ("none", "none"),
        (False, "none"),
        ("any", "any"),
        ("required", "any"),
        (True, "any"),
        ("add", "add"),
        ({"type": "function", "function": {"name": "add"}}, "add"),
        ({"type": "tool", "name": "get_weather"}, "get_weather"),
    ]:
        assert normalize_tool_choice(spelling, names) == expected
    with pytest.raises(ConfigError, match="tool_choice"):
        normalize_tool_choice("nope", names)


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
    parser = ToolCallStreamParser()
    assert parser.feed("a <to") == ["a "]
    assert parser.feed("p> c") == ["<top> c"]


# ------------------------------------------------------------------ formats


def test_formats_are_read_from_the_chat_templates(families, tokenizer) -> None:
    assert tool_format(tokenizer) == HERMES  # SmolLM2's ChatML renders no tools
    qwen, llama, mistral = (tool_format(families[f]) for f in ("qwen", "llama3", "mistral"))
    assert (qwen.open_tag, qwen.close_tag, qwen.arguments_key, qwen.as_list) == (
        "<tool_call>",
        "</tool_call>",
        "arguments",
        False,
    )
    assert (llama.open_tag, llama.close_tag, llama.arguments_key, llama.as_list) == (
        "",
        "",
        "parameters",
        False,
    )
    tool_calls_id = families["mistral"].convert_tokens_to_ids("[TOOL_CALLS]")
    assert mistral.prefix == (tool_calls_id, " ") and mistral.as_list
    assert all(f.template_tools and f.template_calls for f in (qwen, llama, mistral))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_call_rendered_by_the_template_parses_back(families, family) -> None:
    """The template's own rendering of a call, decoded as the engine decodes, parses back."""
    tokenizer = families[family]
    fmt = tool_format(tokenizer)
    user = [{"role": "user", "content": "Weather in Oslo?"}]
    arguments = {"city": "Oslo", "days": 2}
    call = {"id": "abcdefghi", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": arguments}
    assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
    head = tokenizer.apply_chat_template(user, tools=[WEATHER], tokenize=False)
    head = tokenizer.apply_chat_template(
        user, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template([*user, assistant], tools=[WEATHER], tokenize=False)
    ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    content, calls = parse_tool_calls(text, ["get_weather"], fmt)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", arguments)]
    assert content == ""
    assert parse_tool_calls(fmt.call_text("get_weather", arguments), None, fmt)[1][0].arguments


# ------------------------------------------------------------------ constraints


def _walk(matcher, text: str, tokenizer) -> list[int]:
    """Feed the natural tokenisation of ``text``, checking each token is allowed."""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    for token in tokens:
        mask = matcher.allowed()
        assert mask.shape == (len(tokenizer),) and mask.dtype == torch.bool
        assert mask[token], f"{tokenizer.decode([token])!r} refused in {text!r}"
        assert not matcher.is_complete()
        matcher.accept(token)
    return tokens


def test_json_constraint_accepts_escapes_optionals_maps_and_refs(tokenizer) -> None:
    schema = {
        "$defs": {"P": {"type": "object", "properties": {"x": {"type": "number"}}}},
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "where": {"$ref": "#/$defs/P"},
            "kind": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        },
        "required": ["text"],
    }
    constraint = JsonConstraint(tokenizer, schema)
    for text in (
        '{"text": "a \\"quote\\",\\nnew line \\\\ and é\\t", "counts": {"x": 1, "y": -2}}',
        '{"text": "", "where": {}, "kind": null}',
        '{"text": "你好", "where": {"x": 0.25}, "kind": true}',
    ):
        matcher = constraint.matcher()
        _walk(matcher, text, tokenizer)
        assert matcher.is_complete()
        jsonschema.validate(json.loads(text), schema)


def test_tool_call_constraint_masks_exactly(tokenizer) -> None:
    constraint = ToolCallConstraint(tokenizer, [WEATHER, ADD], name="add")
    assert constraint.tool_names == ["add"]
    matcher = constraint.matcher()
    _walk(matcher, '<tool_call>{"name": "add", "arguments": {"a": ', tokenizer)
    texts = {tokenizer.decode([t]) for t in matcher.allowed().nonzero().flatten().tolist()}
    assert texts == {"-", *"0123456789"}
    matcher.accept(tokenizer.convert_tokens_to_ids("0"))
    texts = {tokenizer.decode([t]) for t in matcher.allowed().nonzero().flatten().tolist()}
    assert "," in texts and all(', "b": '.startswith(t) for t in texts)
    with pytest.raises(ValueError, match="not a tool"):
        ToolCallConstraint(tokenizer, [ADD], name="nope")


def test_rollback_returns_to_the_same_state(tokenizer) -> None:
    constraint = JsonConstraint(tokenizer, WEATHER["function"]["parameters"])
    matcher = constraint.matcher()
    tokens = _walk(matcher, '{"city": "Paris", "days": 3', tokenizer)
    expected = matcher.allowed()
    matcher.rollback(4)
    assert matcher.accepted == len(tokens) - 4
    for token in tokens[-4:]:
        matcher.accept(token)
    assert torch.equal(matcher.allowed(), expected)
    with pytest.raises(ValueError, match="not allowed"):
        matcher.accept(tokenizer.convert_tokens_to_ids("{"))


def _random_output(matcher, rng: random.Random, eos: int, limit: int) -> list[int]:
    """A path through the masks, chosen at random; EOS (when allowed) ends it."""
    tokens: list[int] = []
    while not matcher.is_complete():
        allowed = matcher.allowed().nonzero().flatten().tolist()
        token = rng.choice(allowed)
        if token == eos:
            break
        matcher.accept(token)
        tokens.append(token)
        assert len(tokens) <= limit
    return tokens


def test_random_walks_within_a_budget_always_close_validly(tokenizer) -> None:
    """Any path through the masks is a valid call, complete within ``max_tokens``."""
    rng = random.Random(0)
    for budget in (40, 64):
        constraint = ToolCallConstraint(tokenizer, [WEATHER, ADD], max_tokens=budget)
        for _ in range(3):
            tokens = _random_output(constraint.matcher(), rng, tokenizer.eos_token_id, budget)
            content, calls = parse_tool_calls(constraint.text(tokens))
            assert content == "" and len(calls) == 1
            tool = {"add": ADD, "get_weather": WEATHER["function"]}[calls[0].name]
            jsonschema.validate(calls[0].arguments, tool["parameters"])


def test_a_budget_below_the_shortest_output_fails_before_decoding(tokenizer) -> None:
    shortest = '<tool_call>{"name": "add", "arguments": {"a": 0, "b": 0}}</tool_call>'
    constraint = ToolCallConstraint(tokenizer, [ADD], max_tokens=64)
    assert constraint.min_tokens >= len(tokenizer.encode(shortest, add_special_tokens=False))
    with pytest.raises(ConfigError, match="`max_tokens` \\(=8\\) is too small"):
        ToolCallConstraint(tokenizer, [ADD], max_tokens=8)


# ------------------------------------------------------------------ the tool-choice rules


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    return GuardedLM.from_models(tiny_llama(0), tokenizer)


def test_plan_rules(tiny_lm) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "A", "schema": schema}}
    auto = plan_tools(tiny_lm, tools=[ADD])
    assert (auto.tools, auto.constraint, auto.tool_names) == ([normalize_tool(ADD)], None, ["add"])
    assert auto.parser() is not None and auto.inline_tool_calls
    none = plan_tools(tiny_lm, tools=[ADD], tool_choice="none", response_format=response_format)
    assert none.tools is None and none.tool_names is None
    assert isinstance(none.constraint, JsonConstraint) and none.constraint.schema == schema
    forced = plan_tools(tiny_lm, tools=[ADD, WEATHER], tool_choice={"name": "add"}, max_tokens=40)
    assert forced.forced and forced.constraint.tool_names == ["add"]
    assert forced.constraint.max_tokens == 40
    assert forced.messages([{"role": "user", "content": "x"}]) == [{"role": "user", "content": "x"}]
    both = plan_tools(tiny_lm, tools=[ADD], response_format=response_format)
    assert isinstance(both.constraint, ToolCallConstraint) and both.tool_names == ["add"]
    system = both.messages([{"role": "user", "content": "x"}])[0]
    assert system["role"] == "system" and json.dumps(schema) in system["content"]
    assert plan_tools(tiny_lm).options() == {}
    with pytest.raises(ConfigError, match="no tools"):
        plan_tools(tiny_lm, tool_choice="required")
    with pytest.raises(ConfigError, match="too small"):
        plan_tools(tiny_lm, tools=[ADD], tool_choice="any", max_tokens=5)


def test_tool_or_answer_grammar_allows_both(tokenizer, tiny_lm) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    plan = plan_tools(tiny_lm, tools=[ADD], response_format=schema)
    for text in ('{"n": 3}', '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'):
        matcher = plan.constraint.matcher()
        _walk(matcher, text, tokenizer)
    _walk(matcher, "</tool_call>", tokenizer)
    assert matcher.is_complete()
