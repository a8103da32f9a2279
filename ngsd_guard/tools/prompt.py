"""Tools and answer schemas in the prompt: the Hermes system prompt for templates that know
nothing of tools, and the system instruction of a structured answer."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .formats import HERMES
from .schemas import normalize_tool

__all__ = ["structured_answer_messages", "tools_system_prompt"]


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """Text for the system message that lists ``tools`` and the Hermes call format.

    Args:
        tools: OpenAI-format tool schemas (see :func:`normalize_tool`).

    Returns:
        A prompt naming every tool with its JSON schema inside ``<tools></tools>``, and asking for
        calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
    """
    example = '{"name": "<tool name>", "arguments": {<arguments>}}'
    lines = [
        "You can call the following tools. Each tool is described by a JSON schema:",
        "<tools>",
        *(json.dumps(normalize_tool(tool), ensure_ascii=False) for tool in tools),
        "</tools>",
        "To call a tool, answer with one JSON object per call inside tool_call tags:",
        f"{HERMES.open_tag}{example}{HERMES.close_tag}",
        "Call a tool only when it helps; otherwise answer the user directly.",
    ]
    return "\n".join(lines)


def structured_answer_messages(
    messages: Sequence[Mapping[str, Any]], schema: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """``messages`` with the instruction to answer in ``schema``'s JSON appended to the system
    message (one is added first when there is none). This is the prompt of every structured
    answer: ``response_format`` on the server, ``ChatNGSD.with_structured_output``.

    >>> user = {"role": "user", "content": "Hi"}
    >>> system, _ = structured_answer_messages([user], {"type": "object"})
    >>> system["content"].splitlines()
    ['Answer with one JSON object that follows this JSON schema:', '{"type": "object"}']
    """
    out = [dict(m) for m in messages]
    text = "Answer with one JSON object that follows this JSON schema:\n" + json.dumps(
        dict(schema), ensure_ascii=False
    )
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0].get('content') or ''}\n\n{text}".strip()
        return out
    return [{"role": "system", "content": text}, *out]
