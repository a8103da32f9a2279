"""``ChatNGSDOpenAI``: LangChain's ``ChatOpenAI`` against an ``ngsd-guard serve`` endpoint, with
the guard's records where ``ChatNGSD`` puts them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_openai import ChatOpenAI

from ngsd_guard import GateEvent

from .events import aemit_gate_event, emit_gate_event

__all__ = ["ChatNGSDOpenAI"]


def ngsd_metadata(ngsd: dict[str, Any] | None) -> dict[str, Any]:
    """The server's ``ngsd`` field as ``ChatNGSD``'s response metadata:
    ``ngsd_gate_events`` (a list, on the chunk of the token that spiked) and ``ngsd_summary``."""
    metadata: dict[str, Any] = {}
    if ngsd and ngsd.get("gate_events"):
        metadata["ngsd_gate_events"] = list(ngsd["gate_events"])
    if ngsd and ngsd.get("summary"):
        metadata["ngsd_summary"] = ngsd["summary"]
    return metadata


class ChatNGSDOpenAI(ChatOpenAI):
    """``ChatOpenAI`` for an ``ngsd-guard serve`` endpoint (or any server that sends the
    ``ngsd`` field): everything ``ChatOpenAI`` does, plus the gate's records as ``ChatNGSD``
    reports them.

    * ``response_metadata["ngsd_gate_events"]``: the spikes, on the chunk of their token when
      streaming (adding the chunks up collects them in order), all of them on an ``invoke``;
    * ``response_metadata["ngsd_summary"]``: spikes, intervened tokens, alpha, risk, ...;
    * an ``ngsd_gate`` custom event per spike (``astream_events``, ``GateEventHandler``,
      LangGraph's stream writer).

    Guard settings the operator allows go in ``extra_body={"ngsd": {"alpha": 0.9}}``.

    >>> llm = ChatNGSDOpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...",
    ...                      model="SmolLM2-135M-Instruct")              # doctest: +SKIP
    >>> llm.invoke("Hi").response_metadata["ngsd_summary"]["spikes"]     # doctest: +SKIP
    """

    def _convert_chunk_to_generation_chunk(
        self,
        chunk: dict,
        default_chunk_class: type,
        base_generation_info: dict | None,
    ) -> ChatGenerationChunk | None:
        generation = super()._convert_chunk_to_generation_chunk(
            chunk, default_chunk_class, base_generation_info
        )
        # ``beta.chat.completions.stream`` (structured output) wraps the chunk in "chunk".
        ngsd = chunk.get("ngsd") or (chunk.get("chunk") or {}).get("ngsd")
        if generation is not None:
            generation.message.response_metadata.update(ngsd_metadata(ngsd))
        return generation

    def _create_chat_result(
        self, response: dict | Any, generation_info: dict | None = None
    ) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        extra = response if isinstance(response, dict) else response.model_extra or {}
        for generation in result.generations:
            generation.message.response_metadata.update(ngsd_metadata(extra.get("ngsd")))
        return result

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in super()._stream(messages, stop, run_manager, **kwargs):
            for event in _events(chunk.message):
                emit_gate_event(event, run_manager)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in super()._astream(messages, stop, run_manager, **kwargs):
            for event in _events(chunk.message):
                await aemit_gate_event(event, run_manager)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = super()._generate(messages, stop, run_manager, **kwargs)
        for event in _events(result.generations[0].message):
            emit_gate_event(event, run_manager)
        return result

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = await super()._agenerate(messages, stop, run_manager, **kwargs)
        for event in _events(result.generations[0].message):
            await aemit_gate_event(event, run_manager)
        return result


def _events(message: BaseMessage) -> list[GateEvent]:
    return [
        GateEvent.model_validate(e) for e in message.response_metadata.get("ngsd_gate_events", [])
    ]
