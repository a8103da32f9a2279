"""``ChatNGSD``: ngsd-guard's guarded decoding as a LangChain chat model."""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput, ModelProfile
from langchain_core.language_models.chat_models import (
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from ngsd_guard import GateEvent, Generation, GuardedLM, StepRecord
from ngsd_guard.tools import (
    ToolCall,
    ToolCallStreamParser,
    ToolPlan,
    normalize_tool_choice,
    plan_tools,
    tool_format,
)

from ._engine import GuardedSettings, model_profile
from .content_blocks import MODEL_PROVIDER
from .events import aemit_gate_event, emit_gate_event
from .messages import to_chat_messages

__all__ = ["ChatNGSD"]

_PER_CALL = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "strict",
        "model",
        "stream_usage",
    }
)


@dataclass
class _Request:
    """One call, mapped onto the engine."""

    lm: GuardedLM
    messages: list[dict[str, Any]]
    options: dict[str, Any]
    model_name: str
    plan: ToolPlan


@dataclass
class _ChunkTranslator:
    """Engine records to ``AIMessageChunk``s: one chunk per token, content released through the
    tool-call parser when tools are bound; a last chunk with usage, summary and finish info."""

    model_name: str
    parser: ToolCallStreamParser | None
    calls: int = 0
    pending: list[ToolCall] = field(default_factory=list)

    def step(self, record: StepRecord) -> ChatGenerationChunk:
        pieces = self.parser.feed(record.text) if self.parser is not None else [record.text]
        extra: dict[str, Any] = {}
        if record.spiked:
            extra["ngsd_gate_events"] = [GateEvent.from_record(record).model_dump()]
        return self._chunk(
            pieces, additional_kwargs=extra, response_metadata={"model_provider": MODEL_PROVIDER}
        )

    def finish(self, generation: Generation) -> ChatGenerationChunk:
        pieces = self.parser.finish() if self.parser is not None else []
        summary = generation.summary
        finish_reason = generation.finish_reason
        if self.calls or any(isinstance(p, ToolCall) for p in pieces):
            finish_reason = "tool_calls"
        return self._chunk(
            pieces,
            response_metadata={
                "model_provider": MODEL_PROVIDER,
                "model_name": self.model_name,
                "finish_reason": finish_reason,
                "ngsd_summary": summary.model_dump(),
                "ngsd_guarded": generation.guard_intervened,
                "ngsd_refused": generation.guard_refused,
            },
            usage_metadata={
                "input_tokens": summary.prompt_tokens,
                "output_tokens": summary.tokens,
                "total_tokens": summary.prompt_tokens + summary.tokens,
            },
            chunk_position="last",
            generation_info={"finish_reason": finish_reason},
        )

    def _chunk(
        self,
        pieces: Sequence[str | ToolCall],
        *,
        generation_info: dict[str, Any] | None = None,
        **message: Any,
    ) -> ChatGenerationChunk:
        chunks = []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                chunks.append(
                    tool_call_chunk(
                        name=piece.name,
                        args=json.dumps(piece.arguments, ensure_ascii=False),
                        id=piece.id,
                        index=self.calls,
                    )
                )
                self.calls += 1
        content = "".join(p for p in pieces if isinstance(p, str))
        return ChatGenerationChunk(
            message=AIMessageChunk(content=content, tool_call_chunks=chunks, **message),
            generation_info=generation_info,
        )


class ChatNGSD(GuardedSettings, BaseChatModel):
    """A chat model whose every token is decided by Neuron-Guided Safe Decoding: a base model and
    a safety expert decode side by side, and a leaky integrate-and-fire neuron over their
    divergence decides when the expert is mixed into the next-token choice.

    Construction is cheap: the model loads on first use (once per process and settings), or
    pass ``guarded=GuardedLM(...)``. ``ChatNGSD()`` is the embedded SmolLM2-135M-Instruct with its
    shipped expert.

    Gate events (spikes) reach LangChain users through:

    * the chunks: ``additional_kwargs["ngsd_gate_events"]`` is a list on the chunk of the token
      that spiked; LangChain merges lists by concatenation (``chunk + chunk``,
      ``astream_events`` v2 and v3), so the final message holds every event in order;
    * custom events named ``ngsd_gate`` (``astream_events(version="v2")``, ``on_custom_event``,
      :class:`~langchain_ngsd.GateEventHandler`), parented to the model's own run;
    * LangGraph's stream writer when running inside a graph (``stream_mode="custom"`` items
      ``{"ngsd_gate": {...}}``).

    The guard's decision is on the final message's ``response_metadata``: ``ngsd_summary``
    (spikes, intervened tokens, alpha, risk, ...), ``ngsd_guarded`` (the expert changed at
    least one token) and ``ngsd_refused`` (it changed the answer into a refusal, by the
    engine's keyword judge). A refused answer also carries a standard ``{"type": "refusal"}``
    block in ``message.content_blocks`` (so ``ModelRefusalMiddleware`` sees it), next to its
    text. ``model_provider`` is ``"ngsd"``; ``usage_metadata`` and ``model_name`` as usual.

    Tools: ``bind_tools`` renders tools into the prompt through the engine; calls written as
    ``<tool_call>{...}</tool_call>`` (or bare JSON) become ``tool_calls``. ``tool_choice="any"``
    / ``"required"`` or a tool name forces one valid call by constrained decoding (the gate
    still runs on the constrained distribution); ``"none"`` does not offer the tools.
    ``with_structured_output`` and ``response_format`` (``ProviderStrategy``) constrain the
    output to the schema's JSON (``method="json_schema"``, the default, or ``"json_mode"``,
    also without a schema) or use a forced tool call (``"function_calling"``).

    Token counting (``get_num_tokens``, ``get_num_tokens_from_messages``) uses the model's own
    tokenizer and chat template, offline; ``profile`` gives the context window and the
    capabilities to ``create_agent``'s strategies and the summarization middleware.

    >>> from langchain_ngsd import ChatNGSD
    >>> llm = ChatNGSD(max_tokens=64)                                  # doctest: +SKIP
    >>> llm.invoke("How do I bake bread?").response_metadata["ngsd_summary"]  # doctest: +SKIP
    """

    @property
    def _llm_type(self) -> str:
        return "ngsd-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.identifying_params()

    def _resolve_model_profile(self) -> ModelProfile | None:
        return model_profile(self)

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """The tokens of the prompt the model sees for ``messages`` (and ``tools``): the chat
        template's rendering, counted with the model's tokenizer."""
        lm = self.guarded_lm()
        formatted = [convert_to_openai_tool(tool) for tool in tools or ()] or None
        prompt = lm.render(_chat(lm, messages), tools=formatted)
        return len(lm.token_ids(prompt))

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return self.ls_params(dict(super()._get_ls_params(stop=stop, **kwargs)), kwargs)

    # ------------------------------------------------------------------ tools
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (converted to OpenAI format). ``tool_choice``: ``None``/``"auto"`` lets
        the model decide; ``"none"`` does not offer the tools; ``"any"``/``"required"`` forces
        one call; a tool name forces that tool."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        names = [tool["function"]["name"] for tool in formatted]
        choice = normalize_tool_choice(tool_choice, names)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        include_raw: bool = False,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Output that follows ``schema`` (pydantic class, TypedDict or JSON schema).

        ``json_schema`` and ``json_mode`` constrain decoding to a JSON value valid for the
        schema (``strict`` has no further effect: the output is always valid); ``json_mode``
        without a schema constrains to a JSON object; ``function_calling`` forces a tool call
        of the schema.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        if method not in ("json_schema", "json_mode", "function_calling"):
            raise ValueError(
                f"`method` (={method!r}) must be 'json_schema', 'json_mode' or 'function_calling'"
            )
        if schema is None and method != "json_mode":
            raise ValueError(f"`schema` is required with `method` (={method!r}); pass a schema")
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw)
        if schema is None:
            response_format: dict[str, Any] = {"type": "json_object"}
        else:
            json_schema = convert_to_json_schema(schema)
            wrapper = {"name": json_schema.get("title", "response"), "schema": json_schema}
            response_format = {"type": "json_schema", "json_schema": wrapper}
        llm = self.bind(
            response_format=response_format,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser: Runnable[Any, Any]
        if isinstance(schema, type) and is_basemodel_subclass(schema):
            parser = PydanticOutputParser(pydantic_object=schema)
        else:
            parser = JsonOutputParser()
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks(
            [fallback], exception_key="parsing_error"
        )

    # ------------------------------------------------------------------ generation
    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Request:
        """The engine call: the settings and per-call keywords as ``GuardedLM`` options, and
        tools, ``tool_choice``, ``response_format`` and the budget mapped by the engine's one
        set of rules (:func:`ngsd_guard.tools.plan_tools`)."""
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None)
        lm = self.guarded_lm(model)
        options = self.engine_options(stop, kwargs)
        plan = plan_tools(
            lm,
            tools=kwargs.pop("tools", None),
            tool_choice=kwargs.pop("tool_choice", None),
            response_format=kwargs.pop("response_format", None),
            max_tokens=options["max_new_tokens"],
        )
        unknown = set(kwargs) - _PER_CALL
        if unknown:
            warnings.warn(f"ChatNGSD ignores {sorted(unknown)}", stacklevel=4)
        chat = plan.messages(_chat(lm, messages))
        options.update(plan.options())
        return _Request(lm, chat, options, self.model_label(model), plan)

    def _translator(self, request: _Request) -> _ChunkTranslator:
        return _ChunkTranslator(request.model_name, request.plan.parser())

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        translator = self._translator(request)
        stream = request.lm.stream(request.messages, **request.options)
        try:
            for record in stream:
                chunk = translator.step(record)
                if record.spiked:
                    emit_gate_event(GateEvent.from_record(record), run_manager)
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            stream.close()
        yield translator.finish(stream.generation)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        translator = self._translator(request)
        stream = request.lm.astream(request.messages, **request.options)
        try:
            async for record in stream:
                chunk = translator.step(record)
                if record.spiked:
                    await aemit_gate_event(GateEvent.from_record(record), run_manager)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await stream.aclose()
        yield translator.finish(stream.generation)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))


def _chat(lm: GuardedLM, messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """The messages for ``lm``'s chat template: earlier tool calls written into the text in the
    model's own call format, unless the template renders ``tool_calls``."""
    call_format = tool_format(lm.tokenizer)
    if call_format.template_calls:
        return to_chat_messages(messages, inline_tool_calls=False)
    return to_chat_messages(messages, call_format=call_format)
