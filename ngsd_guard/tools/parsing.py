"""Model text back into tool calls, in the model's own format, all at once or delta by delta.

>>> text = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
>>> content, calls = parse_tool_calls(text)
>>> content, calls[0].name, calls[0].arguments
('', 'add', {'a': 1})
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from .formats import HERMES, ToolFormat

__all__ = ["ToolCall", "ToolCallStreamParser", "parse_tool_calls"]

logger = logging.getLogger(__name__)


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(BaseModel):
    """One parsed tool call."""

    id: str = Field(default_factory=_new_call_id, description="unique id, `call_<hex>`")
    name: str = Field(description="the tool's name")
    arguments: dict[str, Any] = Field(default_factory=dict, description="the call's arguments")


def _calls_from_json(value: Any) -> list[ToolCall] | None:
    """Calls encoded by ``value`` (one ``{"name", "arguments" | "parameters"}`` object or a list
    of them; arguments may be a JSON string), or None when ``value`` is not a call."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(name=item["name"], arguments=arguments))
    return calls or None


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _bare_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Calls written as bare JSON (optionally in a code fence), anywhere in ``text``."""
    fenced = _FENCE.match(text.strip())
    body = fenced.group(1) if fenced else text
    decoder = json.JSONDecoder()
    content, calls, position = [], [], 0
    while True:
        start = min(
            (i for i in (body.find("{", position), body.find("[", position)) if i >= 0), default=-1
        )
        if start < 0:
            break
        try:
            value, end = decoder.raw_decode(body, start)
        except json.JSONDecodeError:
            content.append(body[position : start + 1])
            position = start + 1
            continue
        found = _calls_from_json(value)
        content.append(body[position:start] if found else body[position:end])
        calls.extend(found or [])
        position = end
    content.append(body[position:])
    if not calls:
        return text, []
    return "".join(content).strip(), calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ToolCallStreamParser:
    """Split streamed text into content and tool calls, one delta at a time.

    Calls are read in ``format`` (default: Hermes ``<tool_call>...</tool_call>``): content
    outside the format's visible open tag is released as soon as it cannot be the start of
    one; a call is released when its close tag arrives (at the end, for formats whose close tag
    does not show). Output that *starts* with ``{``, ``[`` or a code fence is held to the end and
    parsed as bare JSON calls (Llama 3's format, and Mistral's once ``[TOOL_CALLS]`` is skipped
    as a special token). Malformed calls, and calls to tools not in ``tool_names``, are returned
    as content, never raised.

    >>> parser = ToolCallStreamParser()
    >>> parser.feed('Sure. <tool_call>{"name": "f", "argu')
    ['Sure. ']
    >>> [type(x).__name__ for x in parser.feed('ments": {}}</tool_call>') + parser.finish()]
    ['ToolCall']
    """

    def __init__(
        self, tool_names: Iterable[str] | None = None, format: ToolFormat = HERMES
    ) -> None:
        self._names = set(tool_names) if tool_names is not None else None
        self._open, self._close = format.open_tag, format.close_tag
        self._buffer = ""
        self._mode = "start"  # start | text | call | bare

    def _known(self, calls: list[ToolCall] | None) -> bool:
        return bool(calls) and (self._names is None or all(c.name in self._names for c in calls))

    def feed(self, delta: str) -> list[str | ToolCall]:
        """Add ``delta``; return the content strings and :class:`ToolCall`\\ s now certain."""
        self._buffer += delta
        out: list[str | ToolCall] = []
        while True:
            if self._mode == "start":
                stripped = self._buffer.lstrip()
                if not stripped:
                    return out
                self._mode = "bare" if stripped[0] in "{[`" else "text"
            if self._mode == "bare":
                return out
            if self._mode == "text":
                index = self._buffer.find(self._open) if self._open else -1
                if index < 0:
                    hold = _partial_suffix(self._buffer, self._open) if self._open else 0
                    release = self._buffer[: len(self._buffer) - hold]
                    self._buffer = self._buffer[len(release) :]
                    if release:
                        out.append(release)
                    return out
                if index:
                    out.append(self._buffer[:index])
                self._buffer = self._buffer[index:]
                self._mode = "call"
            if self._mode == "call":
                end = self._buffer.find(self._close) if self._close else -1
                if end < 0:
                    return out
                block = self._buffer[: end + len(self._close)]
                self._buffer = self._buffer[len(block) :]
                self._mode = "text"
                out.extend(self._parse_block(block))

    def _parse_block(self, block: str) -> list[str | ToolCall]:
        body = block[len(self._open) :]
        if self._close and body.endswith(self._close):
            body = body[: -len(self._close)]
        try:
            calls = _calls_from_json(json.loads(body))
        except json.JSONDecodeError:
            calls = None
        if self._known(calls):
            return list(calls or [])
        logger.debug("malformed tool call kept as text: %r", block)
        return [block]

    def finish(self) -> list[str | ToolCall]:
        """Flush what is held at the end of the output."""
        buffer, mode = self._buffer, self._mode
        self._buffer, self._mode = "", "start"
        if not buffer:
            return []
        if mode == "call":
            return self._parse_block(buffer)
        if mode == "bare":
            content, calls = _bare_calls(buffer)
            if not self._known(calls):
                return [buffer]
            return ([content] if content else []) + list(calls)
        return [buffer]


def parse_tool_calls(
    text: str, tool_names: Iterable[str] | None = None, format: ToolFormat = HERMES
) -> tuple[str, list[ToolCall]]:
    """Split a model answer into its content and its tool calls.

    Recognises calls in ``format`` (several, or a JSON list in one; a missing close tag at the
    very end is tolerated) and an answer that is bare JSON, optionally fenced. ``arguments`` may
    also be called ``parameters`` or be a JSON string. Malformed JSON and, when ``tool_names`` is
    given, calls to unknown tools stay in the content.

    Returns:
        ``(content, calls)``: the text without the calls (stripped), and the calls in order.
    """
    parser = ToolCallStreamParser(tool_names, format)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    return (content.strip() if calls else content), calls
