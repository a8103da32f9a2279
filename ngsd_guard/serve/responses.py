"""Engine records onto OpenAI objects: ``chat.completion(.chunk)`` and ``text_completion``.

One path: a :class:`ChoiceTranslator` turns each StepRecord of a choice into a :class:`Delta`
(content released through the tool-call parser, tool calls, the record of a gate spike), and
:meth:`~ChoiceTranslator.finish` adds the rest, the finish reason and the summary. Streamed
responses send each delta as a chunk; the others add the deltas up.

The guard's records ride in a top-level ``ngsd`` field: ``{"gate_events": [...]}`` on the chunk
of the token that spiked, ``{"summary": {...}}`` on the chunk that carries the choice's
``finish_reason``; a non-streamed response has both (``summaries``, one per choice, when a
completion has several prompts). Each gate event's ``row`` is its choice's index.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from ..records import GateEvent, Generation, StepRecord
from ..tools import ToolCall, ToolCallStreamParser

ObjectKind = Literal["chat", "text"]


@dataclass
class Delta:
    """What one step adds to a choice."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    gate_events: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    summary: dict[str, Any] | None = None
    first_call: int = 0  # the number of the first tool call in this delta, within its choice

    @property
    def empty(self) -> bool:
        return not (self.content or self.tool_calls or self.gate_events or self.finish_reason)


class ChoiceTranslator:
    """The StepRecords of one choice as :class:`Delta`\\ s.

    ``parser``: splits the answer into content and tool calls (None: the text is passed on as
    it is).
    """

    def __init__(self, index: int, parser: ToolCallStreamParser | None) -> None:
        self.index = index
        self.parser = parser
        self.calls = 0

    def step(self, record: StepRecord) -> Delta:
        pieces = self.parser.feed(record.text) if self.parser is not None else [record.text]
        delta = self._delta(pieces)
        if record.spiked:
            event = GateEvent.from_record(record).model_dump()
            event["row"] = self.index  # the choice, not the engine's batch row
            delta.gate_events.append(event)
        return delta

    def finish(self, generation: Generation) -> Delta:
        delta = self._delta(self.parser.finish() if self.parser is not None else [])
        finish_reason = "tool_calls" if self.calls else generation.finish_reason
        delta.finish_reason = "stop" if finish_reason == "cancelled" else finish_reason
        delta.summary = generation.summary.model_dump()
        return delta

    def _delta(self, pieces: list[str | ToolCall]) -> Delta:
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        delta = Delta("".join(p for p in pieces if isinstance(p, str)), calls)
        delta.first_call, self.calls = self.calls, self.calls + len(calls)
        return delta


@dataclass
class ResponseHead:
    """The fields every object of one response shares."""

    kind: ObjectKind
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    def _object(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    # ------------------------------------------------------------ streamed
    def chunk(self, index: int, delta: Delta, *, first: bool = False) -> dict[str, Any]:
        """One ``chat.completion.chunk`` (or streamed ``text_completion``) for ``delta``."""
        if self.kind == "chat":
            body: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta.content:
                body["content"] = delta.content
            if delta.tool_calls:
                body["tool_calls"] = [
                    _tool_call(call, n) for n, call in enumerate(delta.tool_calls, delta.first_call)
                ]
            choice = {"index": index, "delta": body}
            name = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta.content}
            name = "text_completion"
        choice |= {"logprobs": None, "finish_reason": delta.finish_reason}
        return self._with_ngsd(self._object(name, [choice]), delta.gate_events, delta.summary)

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._object(name, []) | {"usage": usage}

    # ------------------------------------------------------------ whole
    def whole(self, choices: list[list[Delta]], usage: dict[str, int]) -> dict[str, Any]:
        """A ``chat.completion`` or ``text_completion``: each choice's deltas added up."""
        built, events, summaries = [], [], []
        for index, deltas in enumerate(choices):
            content = "".join(d.content for d in deltas)
            calls = [c for d in deltas for c in d.tool_calls]
            finish_reason = deltas[-1].finish_reason
            events += [e for d in deltas for e in d.gate_events]
            summaries += [d.summary for d in deltas if d.summary is not None]
            if self.kind == "chat":
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": content or (None if calls else ""),
                    "refusal": None,
                }
                if calls:
                    message["tool_calls"] = [_tool_call(c) for c in calls]
                choice = {"index": index, "message": message}
            else:
                choice = {"index": index, "text": content}
            built.append(choice | {"logprobs": None, "finish_reason": finish_reason})
        name = "chat.completion" if self.kind == "chat" else "text_completion"
        body = self._object(name, built) | {"usage": usage}
        if len(summaries) == 1:
            return self._with_ngsd(body, events, summaries[0])
        return self._with_ngsd(body, events, None, summaries)

    @staticmethod
    def _with_ngsd(
        body: dict[str, Any],
        events: list[dict[str, Any]],
        summary: dict[str, Any] | None,
        summaries: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        ngsd: dict[str, Any] = {}
        if events:
            ngsd["gate_events"] = events
        if summary is not None:
            ngsd["summary"] = summary
        if summaries:
            ngsd["summaries"] = summaries
        if ngsd:
            body["ngsd"] = ngsd
        return body


def usage_of(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(g.summary.prompt_tokens for g in generations)
    completion = sum(g.summary.tokens for g in generations)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {
            "name": call.name,
            "arguments": json.dumps(call.arguments, ensure_ascii=False),
        },
    }
    return item if index is None else {"index": index, **item}
