"""Standard content blocks of ChatNGSD's messages, with the guard's refusals made explicit.

LangChain derives ``message.content_blocks`` through a translator registered for the
message's ``response_metadata["model_provider"]`` (as Anthropic's and Gemini's packages turn a
refusal stop reason into a block). ChatNGSD's messages say ``model_provider="ngsd"``; this
translator gives LangChain's own best-effort blocks (text, tool calls) and, when the guard
turned the answer into a refusal (``response_metadata["ngsd_refused"]``), appends a standard
``{"type": "refusal"}`` block, so ``ModelRefusalMiddleware`` and any code that looks for
refusal blocks sees the guard's decision without knowing about ngsd-guard.
"""

from __future__ import annotations

from typing import Any, TypeVar

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages import content as types
from langchain_core.messages.block_translators import register_translator

__all__ = ["MODEL_PROVIDER", "refusal_block"]

MODEL_PROVIDER = "ngsd"
"""``response_metadata["model_provider"]`` of every ChatNGSD message."""

_Message = TypeVar("_Message", AIMessage, AIMessageChunk)


def refusal_block(response_metadata: dict[str, Any]) -> types.RefusalContentBlock | None:
    """The refusal block of a message whose answer the guard turned into a refusal, else None."""
    if not response_metadata.get("ngsd_refused"):
        return None
    summary = response_metadata.get("ngsd_summary") or {}
    intervened, tokens = summary.get("intervened", 0), summary.get("tokens", 0)
    return {
        "type": "refusal",
        "refusal": (
            f"ngsd-guard: the safety expert turned this answer into a refusal (it changed "
            f"{intervened} of {tokens} tokens)"
        ),
        "extras": {"ngsd_summary": summary},
    }


def _blocks(message: _Message) -> list[types.ContentBlock]:
    metadata = dict(message.response_metadata)
    metadata.pop("model_provider", None)
    # LangChain's own best-effort parsing: the same message without a provider
    blocks = list(message.model_copy(update={"response_metadata": metadata}).content_blocks)
    refusal = refusal_block(metadata)
    if refusal is not None:
        blocks.append(refusal)
    return blocks


register_translator(MODEL_PROVIDER, _blocks, _blocks)
