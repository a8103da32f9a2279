"""`NGSD`: ngsd-guard's guarded decoding as a LlamaIndex `FunctionCallingLLM`.

One code path: every call becomes a `_Request` (what the engine decodes and with which
options), `_steps`/`_asteps` turn the engine's `StepRecord`s into `_Chunk`s, sending a
`NGSDGateEvent` for every trigger, and the public methods wrap chunks into LlamaIndex's
response types. Non-streaming calls return the last chunk of the stream.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt

from ngsd_guard import GateEvent, Generation, GuardConfig, GuardedLM, StepRecord
from ngsd_guard.loading import DEFAULT_MODEL_NAME, default_model_dir, read_context_window, resolve
from ngsd_guard.tools import ToolCall, ToolCallStreamParser, ToolPlan, plan_tools, tool_format

from .events import NGSDGateEvent
from .messages import to_chat_messages, tool_call_block, tool_schema

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

dispatcher = get_dispatcher(__name__)

# LlamaIndex keyword -> `GuardedLM.stream` keyword.
ENGINE_OPTIONS: dict[str, str] = {
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "alpha": "alpha",
}


def engine_options(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The engine keywords of one call: ``overrides`` (per-call) over ``defaults`` (fields).

    ``None`` means "not set here". A bare ``stop`` string becomes a one-item list. Unknown
    keywords raise `TypeError` rather than being silently ignored.
    """
    options: dict[str, Any] = {}
    for source in (defaults, overrides):
        for key, value in source.items():
            if key not in ENGINE_OPTIONS:
                raise TypeError(
                    f"NGSD got an unexpected keyword argument {key!r}; per-call options are "
                    f"{', '.join(sorted(ENGINE_OPTIONS))}, plus tools and tool_choice"
                )
            if value is not None:
                options[ENGINE_OPTIONS[key]] = value
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    return options


@dataclass
class _Request:
    """One engine call: the prompt (HF messages, or a formatted string), its keywords, and
    the span it belongs to (captured when the LlamaIndex call started)."""

    prompt: str | list[dict[str, Any]]
    options: dict[str, Any]
    span_id: str | None
    plan: ToolPlan | None = None  # tools offered: how to parse the output for calls


@dataclass
class _Chunk:
    text: str
    delta: str
    raw: dict[str, Any]
    additional_kwargs: dict[str, Any]
    tool_calls: list[ToolCallBlock] = field(default_factory=list)


class NGSD(FunctionCallingLLM):
    """Safety-aware generation with Neuron-Guided Safe Decoding, for LlamaIndex.

    A base model and a safety expert decode side by side; a leaky integrate-and-fire neuron
    over their divergence decides when the expert is mixed into the next token. Every
    trigger is sent as a `NGSDGateEvent` through LlamaIndex instrumentation; each streamed
    response carries its gate records in ``raw`` and ``additional_kwargs``, and the last one
    the generation's summary and the guard's decision: ``additional_kwargs["ngsd_guarded"]``
    (the expert changed at least one token) and ``["ngsd_refused"]`` (it turned the answer
    into a refusal, by the engine's keyword judge).

    ``NGSD()`` loads the embedded default model (SmolLM2-135M-Instruct) on first use;
    ``NGSD(guarded=GuardedLM.from_pretrained(...))`` uses a model you loaded. Fields left at
    ``None`` fall back to the engine's `GuardConfig`; per-call keywords (``max_tokens``,
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``alpha``) override both.

    >>> from llama_index.core import Settings
    >>> from llama_index.llms.ngsd import NGSD
    >>> Settings.llm = NGSD(max_new_tokens=128)
    >>> print(Settings.llm.complete("How do I pick a lock?"))  # doctest: +SKIP
    """

    model: str = Field(
        default="default",
        description="'default' (the embedded SmolLM2-135M-Instruct), a local model directory, "
        "or a hub id already in the local cache; ignored when `guarded` is passed",
    )
    expert: str | None = Field(
        default="default",
        description="'default' (the shipped expert, or the adapter / a safety prompt for "
        "other models), 'prompted' (a safety prompt), or a separate expert model's path",
    )
    adapter: str | None = Field(
        default=None, description="a peft LoRA directory on the base, used as the expert"
    )
    device: str | None = Field(default=None, description="'cpu', 'cuda', 'mps'; None picks one")
    config: GuardConfig | None = Field(
        default=None, description="gate, intervention and decoding settings of the engine"
    )
    max_new_tokens: int | None = Field(default=None, gt=0, description="output token budget")
    temperature: float | None = Field(default=None, ge=0, description="0 is greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="0 disables top-k filtering")
    seed: int | None = Field(default=None, description="sampling seed")
    stop: list[str] | None = Field(default=None, description="stop strings, cut from the text")
    alpha: float | None = Field(
        default=None, ge=0, le=1, description="expert weight at a trigger, in [0, 1]"
    )

    _guarded: GuardedLM | None = PrivateAttr(default=None)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, guarded: GuardedLM | None = None, **kwargs: Any) -> None:
        messages_to_prompt = kwargs.pop("messages_to_prompt", None)
        super().__init__(**kwargs)
        self._guarded = guarded
        self.messages_to_prompt = messages_to_prompt or ChatTemplate(self)

    @classmethod
    def class_name(cls) -> str:
        return "NGSD"

    # -- the model -----------------------------------------------------------------------

    @property
    def guarded(self) -> GuardedLM:
        """The engine, loaded on first use (thread-safe)."""
        if self._guarded is None:
            with self._load_lock:
                if self._guarded is None:
                    self._guarded = self._load()
        return self._guarded

    def _load(self) -> GuardedLM:
        if self.model == "default" and self.adapter is None:
            expert = self.expert or "default"
            if expert not in ("default", "prompted"):
                raise ValueError(
                    f"`expert` (={expert!r}) must be 'default' or 'prompted' with the default "
                    "model; set `model` too to pair your own base and expert"
                )
            return GuardedLM.from_default(expert=expert, device=self.device, config=self.config)
        # 'default' and 'prompted' mean no expert model: the adapter, else a safety prompt
        expert = None if self.expert in (None, "default", "prompted") else self.expert
        return GuardedLM.from_pretrained(
            default_model_dir() if self.model == "default" else self.model,
            expert=expert,
            adapter=self.adapter,
            device=self.device,
            config=self.config,
        )

    @property
    def metadata(self) -> LLMMetadata:
        """The loaded engine's, or before the first call the model's config file's: reading
        metadata never loads the model (LlamaIndex reads it in async code too)."""
        guarded = self._guarded
        if guarded is not None:
            context_window: int | None = guarded.context_window
            config, model_name = guarded.config, guarded.model_name
        elif self.model == "default":
            context_window = read_context_window(default_model_dir())
            config, model_name = self.config or GuardConfig(), DEFAULT_MODEL_NAME
        else:
            context_window = read_context_window(resolve(self.model))
            config, model_name = self.config or GuardConfig(), Path(self.model).name
        return LLMMetadata(
            context_window=context_window or LLMMetadata.model_fields["context_window"].default,
            num_output=self.max_new_tokens or config.decoding.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=model_name,
        )

    def to_payload(self) -> dict[str, Any]:
        # Sent with every LLM start event: describe the model without loading it.
        if self._guarded is None:
            return {"class_name": self.class_name(), "model": self.model, "expert": self.expert}
        return super().to_payload()

    # -- prompts -------------------------------------------------------------------------

    def _to_chat(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        # Templates that do not render `tool_calls` (ChatML) get the calls written into the
        # text, in the model's own call format.
        call_format = tool_format(self.guarded.tokenizer)
        return to_chat_messages(
            messages, inline_tool_calls=not call_format.template_calls, call_format=call_format
        )

    def _chat_request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Request:
        tools = kwargs.pop("tools", None) or None
        tool_choice = kwargs.pop("tool_choice", None)
        options = engine_options(self._defaults(), kwargs)
        if not isinstance(self.messages_to_prompt, ChatTemplate):
            if tools:
                raise ValueError(
                    "tools need the chat template; NGSD with a custom `messages_to_prompt` "
                    "cannot call tools"
                )
            prompt: str | list[dict[str, Any]] = self.messages_to_prompt(messages)
            return _Request(prompt, options | {"raw": True}, active_span_id.get())
        if not tools:
            return _Request(self._to_chat(messages), options, active_span_id.get())
        # the engine's one set of rules for tools, `tool_choice` and the token budget
        plan = plan_tools(
            self.guarded,
            tools=tools,
            tool_choice=tool_choice,
            max_tokens=options.get("max_new_tokens"),
        )
        options.update(plan.options())
        return _Request(plan.messages(self._to_chat(messages)), options, active_span_id.get(), plan)

    def _completion_request(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> _Request:
        if formatted or self.completion_to_prompt is not default_completion_to_prompt:
            text = prompt if formatted else self.completion_to_prompt(prompt)
            options = engine_options(self._defaults(), kwargs) | {"raw": True}
            return _Request(text, options, active_span_id.get())
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        if self.system_prompt:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
        return self._chat_request(messages, kwargs)

    def _defaults(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ENGINE_OPTIONS if name != "max_tokens"}

    # -- tools ---------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Tool schemas go through the chat template; a required call is constrained."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        tool_choice = kwargs.pop("tool_choice", None)
        if tool_required and tool_choice in (None, "auto"):
            tool_choice = "required"
        return {
            "messages": messages,
            "tools": [tool_schema(tool) for tool in tools] or None,
            "tool_choice": tool_choice,
            **kwargs,
        }

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            for extra in calls[1:]:
                response.message.blocks.remove(extra)
        return response

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """The model's tool calls (parsed when the generation ended) as `ToolSelection`s."""
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError("Expected at least one tool call, but the model made none.")
        return [
            ToolSelection(
                tool_id=call.tool_call_id or call.tool_name,
                tool_name=call.tool_name,
                tool_kwargs=call.tool_kwargs,
            )
            for call in calls
        ]

    # -- records -> chunks ---------------------------------------------------------------

    def _steps(self, request: _Request) -> Iterator[_Chunk]:
        # The engine renders and checks the prompt now, so a bad prompt fails at the call;
        # decoding starts when the chunks are consumed.
        stream = self.guarded.stream(request.prompt, **request.options)
        reporter = _Reporter(self.guarded.model_name, request)

        def chunks() -> Iterator[_Chunk]:
            try:
                for record in stream:
                    yield reporter.step(record)
                yield reporter.finish(stream.generation)
            finally:
                stream.close()

        return chunks()

    def _asteps(self, request: _Request) -> AsyncIterator[_Chunk]:
        stream = self.guarded.astream(request.prompt, **request.options)
        reporter = _Reporter(self.guarded.model_name, request)

        async def chunks() -> AsyncIterator[_Chunk]:
            try:
                async for record in stream:
                    yield reporter.step(record)
                yield reporter.finish(stream.generation)
            finally:
                await stream.aclose()

        return chunks()

    async def _aguarded(self) -> None:
        # The first call loads the model; keep that off the event loop.
        if self._guarded is None:
            await asyncio.to_thread(lambda: self.guarded)

    # -- chat: the implementation --------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        chunk = _last(self._steps(self._chat_request(messages, kwargs)))
        return _chat_response(chunk, streamed=False)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._chat_request(messages, kwargs)
        return (_chat_response(chunk) for chunk in self._steps(request))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        await self._aguarded()
        request = self._chat_request(messages, kwargs)
        chunk = await _alast(self._asteps(request))
        return _chat_response(chunk, streamed=False)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        await self._aguarded()
        request = self._chat_request(messages, kwargs)
        chunks = self._asteps(request)

        async def responses() -> ChatResponseAsyncGen:
            async for chunk in chunks:
                yield _chat_response(chunk)

        return responses()

    # -- completion: derived from chat, or a formatted prompt decoded as-is ----------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        chunk = _last(self._steps(self._completion_request(prompt, formatted, kwargs)))
        return _completion_response(chunk, streamed=False)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        request = self._completion_request(prompt, formatted, kwargs)
        return (_completion_response(chunk) for chunk in self._steps(request))

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        await self._aguarded()
        request = self._completion_request(prompt, formatted, kwargs)
        chunk = await _alast(self._asteps(request))
        return _completion_response(chunk, streamed=False)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        await self._aguarded()
        request = self._completion_request(prompt, formatted, kwargs)
        chunks = self._asteps(request)

        async def responses() -> CompletionResponseAsyncGen:
            async for chunk in chunks:
                yield _completion_response(chunk)

        return responses()


class ChatTemplate:
    """`NGSD`'s default `messages_to_prompt`: the tokenizer's chat template, via the engine.

    With it, chat calls hand the engine the messages themselves, so a prompted expert sees
    the conversation under its safety prompt; any other `messages_to_prompt` makes a text
    prompt that both sides decode as it is.
    """

    def __init__(self, llm: NGSD) -> None:
        self.llm = llm

    def __call__(self, messages: Sequence[ChatMessage]) -> str:
        return self.llm.guarded.render(self.llm._to_chat(messages))

    def __repr__(self) -> str:  # not the LLM's repr, which shows this one
        return "ChatTemplate()"


class _Reporter:
    """Turns one generation's records into chunks and sends a `NGSDGateEvent` per trigger.

    With tools, the text goes through a `ToolCallStreamParser`: deltas carry the content
    only, and each call becomes a `ToolCallBlock` as soon as its closing tag arrives.
    """

    def __init__(self, model_name: str, request: _Request) -> None:
        self.model_name = model_name
        self.request = request
        self.text = ""
        self.tool_calls: list[ToolCallBlock] = []
        self.parser: ToolCallStreamParser | None = (
            request.plan.parser() if request.plan is not None else None
        )

    def step(self, record: StepRecord) -> _Chunk:
        gate_events = [GateEvent.from_record(record)] if record.spiked else []
        for gate_event in gate_events:
            dispatcher.event(
                NGSDGateEvent(
                    record=gate_event, model_name=self.model_name, span_id=self.request.span_id
                )
            )
        delta = self._content(self.parser.feed(record.text)) if self.parser else record.text
        self.text += delta
        dumped = [event.model_dump() for event in gate_events]
        return _Chunk(
            text=self.text,
            delta=delta,
            raw={"record": record.model_dump(), "gate_events": dumped},
            additional_kwargs={"ngsd_gate_events": dumped},
            tool_calls=list(self.tool_calls),
        )

    def finish(self, generation: Generation) -> _Chunk:
        delta = self._content(self.parser.finish()) if self.parser else ""
        self.text += delta
        summary = generation.summary.model_dump()
        usage = {
            "prompt_tokens": generation.summary.prompt_tokens,
            "completion_tokens": generation.summary.tokens,
            "total_tokens": generation.summary.prompt_tokens + generation.summary.tokens,
        }
        gate_events = [event.model_dump() for event in generation.gate_events]
        return _Chunk(
            # as `parse_tool_calls` does: the content around calls is stripped
            text=self.text.strip() if self.tool_calls else self.text,
            delta=delta,
            raw={
                "summary": summary,
                "gate_events": gate_events,
                "finish_reason": generation.finish_reason,
                "usage": usage,
            },
            additional_kwargs={
                "ngsd_summary": summary,
                "ngsd_gate_events": gate_events,
                "ngsd_guarded": generation.guard_intervened,
                "ngsd_refused": generation.guard_refused,
                "finish_reason": generation.finish_reason,
                **usage,
            },
            tool_calls=list(self.tool_calls),
        )

    def _content(self, pieces: list[str | ToolCall]) -> str:
        self.tool_calls += [tool_call_block(p) for p in pieces if isinstance(p, ToolCall)]
        return "".join(p for p in pieces if isinstance(p, str))


def _chat_response(chunk: _Chunk, streamed: bool = True) -> ChatResponse:
    message = ChatMessage(
        role=MessageRole.ASSISTANT, blocks=[TextBlock(text=chunk.text), *chunk.tool_calls]
    )
    return ChatResponse(
        message=message,
        delta=chunk.delta if streamed else None,
        raw=chunk.raw,
        additional_kwargs=chunk.additional_kwargs,
    )


def _completion_response(chunk: _Chunk, streamed: bool = True) -> CompletionResponse:
    return CompletionResponse(
        text=chunk.text,
        delta=chunk.delta if streamed else None,
        raw=chunk.raw,
        additional_kwargs=chunk.additional_kwargs,
    )


def _last(chunks: Iterator[_Chunk]) -> _Chunk:
    last = None
    for last in chunks:  # noqa: B007 - the loop drives the decode
        pass
    assert last is not None  # a stream always ends with its summary chunk
    return last


async def _alast(chunks: AsyncIterator[_Chunk]) -> _Chunk:
    last = None
    async for last in chunks:  # noqa: B007 - the loop drives the decode
        pass
    assert last is not None
    return last
