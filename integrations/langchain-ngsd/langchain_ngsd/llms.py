"""``NGSDLLM``: guarded decoding as a LangChain completion model (string in, string out)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import GenerationChunk, LLMResult
from pydantic import Field

from ngsd_guard import GateEvent, Generation, StepRecord

from ._engine import GuardedSettings
from .events import aemit_gate_event, emit_gate_event

__all__ = ["NGSDLLM"]


def _chunk(record: StepRecord) -> GenerationChunk:
    info = {"ngsd_gate_events": [GateEvent.from_record(record).model_dump()]}
    return GenerationChunk(text=record.text, generation_info=info if record.spiked else None)


def _last_chunk(generation: Generation, model_name: str) -> GenerationChunk:
    summary = generation.summary
    return GenerationChunk(
        text="",
        generation_info={
            "finish_reason": generation.finish_reason,
            "model_name": model_name,
            "model_provider": "ngsd",
            "ngsd_summary": summary.model_dump(),
            "ngsd_guarded": generation.guard_intervened,
            "ngsd_refused": generation.guard_refused,
            "usage": {
                "input_tokens": summary.prompt_tokens,
                "output_tokens": summary.tokens,
                "total_tokens": summary.prompt_tokens + summary.tokens,
            },
        },
    )


class NGSDLLM(GuardedSettings, BaseLLM):
    """A completion model on ngsd-guard. The prompt is one user message rendered through the
    chat template, or, with ``raw=True``, text the model continues as it is.

    Each token is a ``GenerationChunk``; a spike adds ``generation_info["ngsd_gate_events"]``
    (a list, so chunks add up) and is sent as custom event ``ngsd_gate`` and to LangGraph's
    stream writer, as in :class:`~langchain_ngsd.ChatNGSD`. The final ``generation_info`` has
    ``ngsd_summary``, ``ngsd_guarded``, ``ngsd_refused``, ``usage``, ``finish_reason``,
    ``model_name`` and ``model_provider``.

    Per-call settings (``llm.invoke(text, guard=False)``, ``temperature=...``) are folded
    into the model's settings before LangChain looks up its LLM cache, whose key for a
    completion model holds the settings only: a call never reuses an answer decoded with
    other settings.
    """

    raw: bool = Field(default=False, description="tokenise the prompt as is (no chat template)")

    @property
    def _llm_type(self) -> str:
        return "ngsd"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**self.identifying_params(), "raw": self.raw}

    def generate(  # type: ignore[override]
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks = None,
        **kwargs: Any,
    ) -> LLMResult:
        llm = self._with_call_settings(kwargs)
        if llm is not self:
            return llm.generate(prompts, stop, callbacks, **kwargs)
        return super().generate(prompts, stop, callbacks, **kwargs)

    async def agenerate(  # type: ignore[override]
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks = None,
        **kwargs: Any,
    ) -> LLMResult:
        llm = self._with_call_settings(kwargs)
        if llm is not self:
            return await llm.agenerate(prompts, stop, callbacks, **kwargs)
        return await super().agenerate(prompts, stop, callbacks, **kwargs)

    def _with_call_settings(self, kwargs: dict[str, Any]) -> NGSDLLM:
        llm = self.with_call_settings(kwargs)
        if "raw" in kwargs:
            llm = llm.model_copy(update={"raw": kwargs.pop("raw")})
        return llm

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return self.ls_params(dict(super()._get_ls_params(stop=stop, **kwargs)), kwargs)

    def _call_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        kwargs.pop("model", None)
        return {**self.engine_options(stop, kwargs), "raw": kwargs.pop("raw", self.raw)}

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        lm = self.guarded_lm(kwargs.get("model"))
        stream = lm.stream(prompt, **self._call_options(stop, kwargs))
        try:
            for record in stream:
                chunk = _chunk(record)
                if record.spiked:
                    emit_gate_event(GateEvent.from_record(record), run_manager)
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            stream.close()
        yield _last_chunk(stream.generation, self.model_label(kwargs.get("model")))

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        lm = self.guarded_lm(kwargs.get("model"))
        stream = lm.astream(prompt, **self._call_options(stop, kwargs))
        try:
            async for record in stream:
                chunk = _chunk(record)
                if record.spiked:
                    await aemit_gate_event(GateEvent.from_record(record), run_manager)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await stream.aclose()
        yield _last_chunk(stream.generation, self.model_label(kwargs.get("model")))

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            final: GenerationChunk | None = None
            for chunk in self._stream(prompt, stop, run_manager, **kwargs):
                final = chunk if final is None else final + chunk
            assert final is not None
            generations.append([final])
        return LLMResult(generations=generations)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            final: GenerationChunk | None = None
            async for chunk in self._astream(prompt, stop, run_manager, **kwargs):
                final = chunk if final is None else final + chunk
            assert final is not None
            generations.append([final])
        return LLMResult(generations=generations)
