"""A request placed in a context: what a framework sends to the model for it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Conversation:
    """A request in its context: chat messages ending with the user's turn as the engine
    renders them, the tools offered (rendered by ``GuardedLM.render(messages, tools=...)``, as
    the integrations do), the ``tool_choice`` and the ``response_format`` the answer is decoded
    under (:func:`ngsd_guard.tools.plan_tools`; a format's instruction is already in
    ``messages``)."""

    request: str
    messages: tuple[Mapping[str, str], ...]
    tools: tuple[Mapping[str, Any], ...] = ()
    context: str = "bare"
    variant: str = ""
    response_format: Mapping[str, Any] | None = None
    tool_choice: str | Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "request": self.request,
            "messages": [dict(m) for m in self.messages],
            "context": self.context,
            "variant": self.variant,
        }
        if self.tools:
            record["tools"] = [dict(t) for t in self.tools]
        if self.response_format is not None:
            record["response_format"] = dict(self.response_format)
        if self.tool_choice is not None:
            record["tool_choice"] = self.tool_choice
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Conversation:
        messages = record.get("messages")
        if messages is None:
            messages = [{"role": "user", "content": record["prompt"]}]
        request = record.get("request") or _last_user(messages)
        return cls(
            request=request,
            messages=tuple(dict(m) for m in messages),
            tools=tuple(dict(t) for t in record.get("tools") or ()),
            context=record.get("context", "bare"),
            variant=record.get("variant", ""),
            response_format=record.get("response_format"),
            tool_choice=record.get("tool_choice"),
        )


def _last_user(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""
