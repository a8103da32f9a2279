"""Structured output and forced tool calls decoded by the default model (slow).

* The schema zoo: every schema decoded greedy and sampled, each output validated with
  ``jsonschema``, and the windowed loop equal to the step-by-step loop under the constraint.
* Forced calls in three families' own formats (Qwen/Hermes tags, Llama 3 JSON, Mistral
  ``[TOOL_CALLS]``), through their chat templates, parse back into the same ``ToolCall``.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from family_tokenizers import FAMILIES, family_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from ngsd_guard import GuardedLM
from ngsd_guard.loading import default_model_dir
from ngsd_guard.tools import JsonConstraint, parse_tool_calls, plan_tools

pytestmark = pytest.mark.slow

STRING = {"type": "string", "maxLength": 16}
ZOO: dict[str, tuple[str, dict]] = {
    "escapes": (
        'Quote Hamlet, with the quotes: "To be or not to be". Put a newline in it.',
        {"type": "object", "properties": {"quote": STRING}, "required": ["quote"]},
    ),
    "optional": (
        "Describe a cat.",
        {
            "type": "object",
            "properties": {"name": STRING, "age": {"type": "integer"}, "color": STRING},
            "required": ["name"],
        },
    ),
    "nested": (
        "Give a book with its author.",
        {
            "type": "object",
            "properties": {
                "title": STRING,
                "author": {
                    "type": "object",
                    "properties": {"first": STRING, "last": STRING},
                    "required": ["last"],
                },
            },
            "required": ["title", "author"],
        },
    ),
    "map": (
        "Count the fruit: two apples and three pears.",
        {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    ),
    "enum": (
        "Is the sky blue? Answer yes or no.",
        {
            "type": "object",
            "properties": {"answer": {"enum": ["yes", "no"]}},
            "required": ["answer"],
        },
    ),
    "array_bounds": (
        "List some colours.",
        {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 2,
            "maxItems": 3,
        },
    ),
    "defs": (
        "Give two points.",
        {
            "$defs": {
                "Point": {
                    "type": "object",
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                }
            },
            "type": "array",
            "items": {"$ref": "#/$defs/Point"},
            "minItems": 1,
            "maxItems": 2,
        },
    ),
    "any_of": (
        "Give an id.",
        {
            "type": "object",
            "properties": {
                "id": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 8}]}
            },
            "required": ["id"],
        },
    ),
    "one_of": (
        "Pick a shape.",
        {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"circle": {"type": "number"}},
                    "required": ["circle"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"square": {"type": "number"}},
                    "required": ["square"],
                    "additionalProperties": False,
                },
            ]
        },
    ),
    "numbers": (
        "Give a temperature and a count.",
        {
            "type": "object",
            "properties": {
                "celsius": {"type": "number", "minimum": -50, "maximum": 60},
                "count": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            "required": ["celsius", "count"],
        },
    ),
    "nulls": (
        "Give a middle name, or null.",
        {
            "type": "object",
            "properties": {"middle": {"type": ["string", "null"], "maxLength": 12}},
            "required": ["middle"],
        },
    ),
    "booleans": (
        "Is water wet?",
        {"type": "object", "properties": {"wet": {"type": "boolean"}}, "required": ["wet"]},
    ),
    "const": (
        "Say hello.",
        {
            "type": "object",
            "properties": {"kind": {"const": "greeting"}, "text": STRING},
            "required": ["kind", "text"],
        },
    ),
    "array_of_objects": (
        "List two people with ages.",
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "age": {"type": "integer"},
                },
                "required": ["name", "age"],
            },
            "maxItems": 2,
        },
    ),
    "json_object": ("Give any JSON object about the moon.", {"type": "object"}),
    "pattern": (
        "Give a date.",
        {
            "type": "object",
            "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
            "required": ["date"],
        },
    ),
}
BUDGET = 32


@pytest.fixture(scope="module")
def step_lm(default_lm: GuardedLM) -> GuardedLM:
    return default_lm.with_options(config=default_lm.config.model_copy(update={"window": 1}))


@pytest.mark.parametrize("name", list(ZOO))
def test_schema_zoo(default_lm: GuardedLM, step_lm: GuardedLM, name: str) -> None:
    prompt, schema = ZOO[name]
    constraint = JsonConstraint(default_lm.tokenizer, schema, max_tokens=BUDGET)
    for sampling in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 7}):
        windowed = default_lm.generate(
            prompt, constraint=constraint, max_new_tokens=BUDGET, **sampling
        )
        stepped = step_lm.generate(prompt, constraint=constraint, max_new_tokens=BUDGET, **sampling)
        assert windowed.token_ids == stepped.token_ids, (name, sampling)
        assert windowed.finish_reason == "stop", windowed.text
        jsonschema.validate(json.loads(windowed.text), schema)


CITY = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris"]}, "unit": {"enum": ["celsius"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


@pytest.fixture(scope="module")
def family_lms(tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir()).eval()
    directory = tmp_path_factory.mktemp("families")
    lms = {
        "smollm2": GuardedLM.from_models(model, AutoTokenizer.from_pretrained(default_model_dir()))
    }
    for family in FAMILIES:
        lms[family] = GuardedLM.from_models(model, family_tokenizer(family, directory))
    return lms


def test_forced_calls_in_each_family_format_parse_back_alike(family_lms) -> None:
    """SmolLM2's own ChatML (Hermes through a system prompt), Qwen, Llama 3 and Mistral."""
    calls = {}
    for family, lm in family_lms.items():
        plan = plan_tools(lm, tools=[CITY, ADD], tool_choice="get_weather", max_tokens=48)
        generation = lm.generate("Weather in Paris?", max_new_tokens=48, **plan.options())
        assert generation.finish_reason == "stop", (family, generation.text)
        content, parsed = parse_tool_calls(generation.text, plan.tool_names, plan.format)
        assert content == "" and len(parsed) == 1, (family, generation.text)
        calls[family] = (parsed[0].name, parsed[0].arguments)
        plan = plan_tools(lm, tools=[CITY, ADD], tool_choice="required", max_tokens=48)
        generation = lm.generate("What is 3 plus 5?", max_new_tokens=48, **plan.options())
        _, parsed = parse_tool_calls(generation.text, plan.tool_names, plan.format)
        assert len(parsed) == 1 and parsed[0].name in ("add", "get_weather"), generation.text
    expected = ("get_weather", {"city": "Paris", "unit": "celsius"})
    assert calls == dict.fromkeys(["smollm2", *FAMILIES], expected)
