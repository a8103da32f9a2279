"""Tools in the prompt: the Hermes system prompt for templates that know nothing of tools."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .formats import HERMES
from .schemas import normalize_tool

__all__ = ["tools_system_prompt"]


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
