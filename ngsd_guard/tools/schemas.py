"""JSON schemas as callers spell them: tools, response formats, and a bound on closing costs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["JSON_LAYOUT", "closing_bound", "json_rule", "normalize_tool", "response_schema"]

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""``json.dumps``'s default layout: the one models see most, and one spelling per value."""


def json_rule(schema: Mapping[str, Any]) -> str:
    """A Lark ``%json`` body for ``schema`` in :data:`JSON_LAYOUT`."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT}, ensure_ascii=False)


def normalize_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``tool`` in OpenAI format: ``{"type": "function", "function": {name, description,
    parameters}}``. Accepts that format or a bare ``{"name", "description", "parameters"}`` dict.

    Raises:
        TypeError: ``tool`` is not a mapping with a function name.
    """
    if not isinstance(tool, Mapping):
        raise TypeError(f"`tool` (={tool!r}) must be a dict in OpenAI function format")
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise TypeError(
            f"`tool` (={dict(tool)!r}) has no function name; pass "
            '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
        )
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": function.get("description", ""),
            "parameters": dict(parameters),
        },
    }


_JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SCHEMA_KEYS = frozenset(
    {"type", "properties", "$defs", "definitions", "$ref", "anyOf", "oneOf", "allOf", "enum"}
)


def response_schema(response_format: Mapping[str, Any] | type | None) -> dict[str, Any] | None:
    """The JSON schema that a ``response_format`` asks the answer to follow, or None for text.

    Accepted spellings:

    * OpenAI's ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
      (and LangChain's ``{"type": "json_schema", "json_schema": <schema>}``);
    * ``{"type": "json_object"}``: any JSON object;
    * ``{"type": "text"}`` or None: free text;
    * a bare JSON schema, or a pydantic model class.

    Raises:
        ConfigError: anything else.

    >>> response_schema({"type": "json_schema", "json_schema": {"name": "A", "schema": {"type":
    ...     "integer"}, "strict": True}})
    {'type': 'integer'}
    >>> response_schema({"type": "json_object"})
    {'type': 'object'}
    """
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return response_format.model_json_schema()
    if not isinstance(response_format, Mapping):
        raise ConfigError(
            f"`response_format` (={response_format!r}) must be a dict or a pydantic model class"
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema" and "json_schema" in response_format:
        wrapper = response_format["json_schema"]
        if not isinstance(wrapper, Mapping):
            raise ConfigError(
                f"`response_format['json_schema']` (={wrapper!r}) must be a dict: "
                '{"name": ..., "schema": {...}, "strict": true}'
            )
        schema = wrapper.get("schema", wrapper)
        return dict(schema)
    schema_type = kind in _JSON_TYPES or isinstance(kind, list) or kind is None
    if schema_type and _SCHEMA_KEYS & set(response_format):
        return dict(response_format)
    raise ConfigError(
        f"`response_format` (={dict(response_format)!r}) is not a JSON schema; pass "
        '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, '
        '{"type": "json_object"} or a schema'
    )


def closing_bound(schema: Mapping[str, Any]) -> int:
    """An upper bound, in bytes, on what closing any prefix of a JSON value valid for
    ``schema`` can cost: every property once, one entry of a map, ``max(minItems, 1)`` items of
    an array, the longest ``enum``/``const`` value, the longest ``anyOf``/``oneOf`` branch.

    A prefix's closing only completes what is open along one path from the root, so it takes
    at most this many bytes (and so at most this many tokens).

    >>> closing_bound({"type": "object", "properties": {"a": {"type": "integer"}}})
    73
    """
    return _bound(schema, schema, 0)


_MAX_DEPTH = 6  # recursion through $ref is cut here; deeper parts count as a flat value
_SCALAR_BYTES = {"integer": 24, "number": 24, "boolean": 5, "null": 4}


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    while isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        target: Any = root
        for part in schema["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _bound(schema: Any, root: Mapping[str, Any], depth: int) -> int:
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return 32
    schema = _resolve(schema, root)
    if "const" in schema:
        return len(json.dumps(schema["const"]))
    if "enum" in schema:
        return max((len(json.dumps(v)) for v in schema["enum"]), default=4)
    branches = [*schema.get("anyOf", ()), *schema.get("oneOf", ())]
    if branches:
        return max(_bound(b, root, depth + 1) for b in branches)
    if schema.get("allOf"):
        return sum(_bound(b, root, depth + 1) for b in schema["allOf"])
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    sizes = []
    for kind in kinds:
        if kind == "object" or (kind is None and "properties" in schema):
            extra = schema.get("additionalProperties", True)
            size = 2 + sum(
                len(json.dumps(key)) + 4 + _bound(value, root, depth + 1)
                for key, value in schema.get("properties", {}).items()
            )
            size += 0 if extra is False else 8 + _bound(extra, root, depth + 1)
        elif kind == "array":
            items = max(int(schema.get("minItems", 0)), 1)
            size = 2 + items * (2 + _bound(schema.get("items", {}), root, depth + 1))
        elif kind == "string":
            size = 2 + 6 * int(schema.get("minLength", 0)) + 8
            size += 64 if "pattern" in schema or "format" in schema else 0
        elif kind in _SCALAR_BYTES:
            size = _SCALAR_BYTES[kind]
        else:  # any JSON value
            size = 32
        sizes.append(size)
    return max(sizes)
