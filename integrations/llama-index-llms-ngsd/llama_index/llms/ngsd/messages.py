"""LlamaIndex messages and tools to the Hugging Face chat form that `GuardedLM.render` takes.

Pure functions, no model: a `ChatMessage` becomes ``{"role", "content", "tool_calls"?,
"tool_call_id"?}``; a LlamaIndex tool becomes an OpenAI-style JSON-schema dict; an engine
`ToolCall` (parsed by `ngsd_guard.tools`) becomes a `ToolCallBlock`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)

from ngsd_guard.tools import HERMES, ToolCall, ToolFormat

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

# Chat-template roles: system, user, assistant, tool. LlamaIndex's provider-specific
# aliases map onto them.
ROLES: dict[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def to_chat_messages(
    messages: Sequence[ChatMessage],
    *,
    inline_tool_calls: bool = False,
    call_format: ToolFormat = HERMES,
) -> list[dict[str, Any]]:
    """LlamaIndex messages as Hugging Face chat messages, in order."""
    return [
        to_chat_message(m, inline_tool_calls=inline_tool_calls, call_format=call_format)
        for m in messages
    ]


def to_chat_message(
    message: ChatMessage, *, inline_tool_calls: bool = False, call_format: ToolFormat = HERMES
) -> dict[str, Any]:
    """One `ChatMessage` as ``{"role", "content", "tool_calls"?, "tool_call_id"?}``.

    Text blocks are joined with newlines (as `ChatMessage.content` does); `ToolCallBlock`s
    and OpenAI-style ``additional_kwargs["tool_calls"]`` become ``tool_calls``; thinking and
    cache-point blocks are dropped. Images, audio, video and documents raise `TypeError`:
    the model reads text only.

    ``inline_tool_calls=True`` is for chat templates that ignore ``tool_calls`` (SmolLM2's
    ChatML): the calls are written into the content in the model's own call format
    (``call_format``; by default the Hermes form the model is prompted to emit,
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), so the model sees the calls
    it made.
    """
    role = ROLES.get(message.role)
    if role is None:
        raise ValueError(f"message role {message.role!r} has no chat-template role")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            if block.text:
                texts.append(block.text)
        elif isinstance(block, ToolCallBlock):
            tool_calls.append(_tool_call(block.tool_call_id, block.tool_name, block.tool_kwargs))
        elif isinstance(block, ThinkingBlock | CachePoint):
            continue
        else:
            raise TypeError(
                f"NGSD reads text only; a {role} message holds a {type(block).__name__}. "
                "Describe the content in a TextBlock instead."
            )
    for call in message.additional_kwargs.get("tool_calls") or []:
        function = call.get("function", call)
        tool_calls.append(_tool_call(call.get("id"), function["name"], function["arguments"]))
    if inline_tool_calls:
        texts.extend(
            call_format.call_text(call["function"]["name"], call["function"]["arguments"])
            for call in tool_calls
        )
        tool_calls = []
    chat_message: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
    if tool_calls:
        chat_message["tool_calls"] = tool_calls
    if role == "tool" and "tool_call_id" in message.additional_kwargs:
        chat_message["tool_call_id"] = message.additional_kwargs["tool_call_id"]
    return chat_message


def _tool_call(call_id: str | None, name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        call["id"] = call_id
    return call


def tool_schema(tool: BaseTool) -> dict[str, Any]:
    """A LlamaIndex tool as the OpenAI-style schema chat templates take."""
    return tool.metadata.to_openai_tool(skip_length_check=True)


def tool_call_block(call: ToolCall) -> ToolCallBlock:
    """A call the model made, as the block LlamaIndex agents read."""
    return ToolCallBlock(tool_call_id=call.id, tool_name=call.name, tool_kwargs=call.arguments)
