"""LangChain messages to the chat messages a Hugging Face chat template renders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from ngsd_guard.tools import HERMES, ToolFormat

__all__ = ["to_chat_messages"]


def to_chat_messages(
    messages: Sequence[BaseMessage],
    *,
    inline_tool_calls: bool = True,
    call_format: ToolFormat = HERMES,
) -> list[dict[str, Any]]:
    """Convert LangChain messages to ``{"role", "content"}`` dicts for a chat template.

    Text blocks are joined; other content blocks (e.g. Anthropic ``tool_use``) are dropped, as
    the message's ``tool_calls`` carry the calls. An ``AIMessage``'s tool calls are written into
    its content in ``call_format`` (``inline_tool_calls=True``, for templates that do not render
    ``tool_calls``: the model's own call format, by default Hermes
    ``<tool_call>{...}</tool_call>``) or passed as OpenAI-style ``tool_calls`` for templates
    that render them. A ``ToolMessage`` becomes role ``tool``.

    Raises:
        TypeError: a message type with no chat role (e.g. a ``FunctionMessage``).
    """
    converted = []
    for message in messages:
        if isinstance(message, SystemMessage):
            converted.append({"role": "system", "content": message.text})
        elif isinstance(message, HumanMessage):
            converted.append({"role": "user", "content": message.text})
        elif isinstance(message, AIMessage):
            entry: dict[str, Any] = {"role": "assistant", "content": message.text}
            if message.tool_calls and inline_tool_calls:
                calls = [call_format.call_text(c["name"], c["args"]) for c in message.tool_calls]
                entry["content"] = "\n".join(filter(None, [message.text, *calls]))
            elif message.tool_calls:
                entry["tool_calls"] = [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": call["args"]},
                    }
                    for call in message.tool_calls
                ]
            converted.append(entry)
        elif isinstance(message, ToolMessage):
            converted.append(
                {"role": "tool", "content": message.text, "tool_call_id": message.tool_call_id}
            )
        elif isinstance(message, ChatMessage):
            converted.append({"role": message.role, "content": message.text})
        else:
            raise TypeError(
                f"cannot convert a {type(message).__name__} to a chat message; use System, "
                "Human, AI, Tool or ChatMessage"
            )
    return converted
