"""What ChatNGSD and NGSDLLM share: settings, the lazy model, and the mapping of LangChain
parameters onto ``GuardedLM`` options."""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import Any, Self

from langchain_core.language_models import ModelProfile
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ngsd_guard import GuardConfig, GuardedLM
from ngsd_guard.loading import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    read_context_window,
    resolve,
)

_MODELS: dict[tuple[str, str | None, str | None, str | None], GuardedLM] = {}
_MODELS_LOCK = threading.Lock()
_INSTANCE_TOKENS: weakref.WeakKeyDictionary[GuardedLM, str] = weakref.WeakKeyDictionary()

DECODING_SETTINGS = (
    "temperature",
    "max_tokens",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "alpha",
    "guard",
)
"""The settings that a call may override with a keyword of the same name."""


def load_guarded(
    model: str,
    *,
    adapter: str | None = None,
    expert: str | None = None,
    guard_config: GuardConfig | None = None,
) -> GuardedLM:
    """The ``GuardedLM`` for these settings, loaded once per process and shared (it is
    thread-safe and keeps no per-call state). ``model`` is the default model's name (the
    embedded SmolLM2-135M-Instruct with its shipped expert) or a local path / hub id."""
    config_key = guard_config.model_dump_json() if guard_config is not None else None
    key = (model, adapter, expert, config_key)
    with _MODELS_LOCK:
        if key not in _MODELS:
            if model == DEFAULT_MODEL_NAME and adapter is None and expert is None:
                _MODELS[key] = GuardedLM.from_default(config=guard_config)
            else:
                _MODELS[key] = GuardedLM.from_pretrained(
                    model, adapter=adapter, expert=expert, config=guard_config
                )
        return _MODELS[key]


class GuardedSettings(BaseModel):
    """Settings shared by :class:`ChatNGSD` and :class:`NGSDLLM`.

    ``None`` leaves a decoding setting to the model's ``GuardConfig``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: str = Field(
        default=DEFAULT_MODEL_NAME,
        description="the default model's name, or a local path / hub id of a base model",
    )
    guarded: GuardedLM | None = Field(
        default=None, exclude=True, description="an already loaded GuardedLM to use"
    )
    adapter: str | None = Field(default=None, description="a LoRA safety expert (peft dir)")
    expert: str | None = Field(default=None, description="a separate safety expert model")
    guard_config: GuardConfig | None = Field(
        default=None, description="gate, divergence and intervention settings for loading"
    )
    temperature: float | None = Field(default=None, ge=0.0, description="0 or None: greedy")
    max_tokens: int | None = Field(default=None, gt=0, description="max new tokens")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, description="stop strings")
    alpha: float | None = Field(
        default=None, ge=0.0, le=1.0, description="fixed expert weight when the gate fires"
    )
    guard: bool = Field(default=True, description="False decodes the base model alone")

    _loaded: GuardedLM | None = PrivateAttr(default=None)

    def guarded_lm(self, model: str | None = None) -> GuardedLM:
        """The engine: ``guarded`` if given, else loaded on first use (``model`` overrides the
        configured model for one call)."""
        if model is None or model == self.model:
            if self.guarded is not None:
                return self.guarded
            if self._loaded is None:
                self._loaded = load_guarded(
                    self.model,
                    adapter=self.adapter,
                    expert=self.expert,
                    guard_config=self.guard_config,
                )
            return self._loaded
        return load_guarded(model, guard_config=self.guard_config)

    def engine_identity(self) -> dict[str, Any]:
        """What decides which weights and gate decode: the settings that load the engine, or,
        for a ``guarded`` instance passed in (whose weights the settings cannot name), a token
        unique to that object."""
        if self.guarded is None:
            return {
                "adapter": self.adapter,
                "expert": self.expert,
                "guard_config": (
                    self.guard_config.model_dump() if self.guard_config is not None else None
                ),
            }
        with _MODELS_LOCK:
            token = _INSTANCE_TOKENS.setdefault(self.guarded, uuid.uuid4().hex)
        return {"instance": token, "guard_config": self.guarded.config.model_dump()}

    def identifying_params(self) -> dict[str, Any]:
        """Every setting that changes the output: LangChain builds its LLM-cache key from
        these (with the per-call keywords), so two models share a cache entry only when they
        would decode the same way. A guarded and an unguarded model, two adapters, experts,
        gate configs or sampling settings never do."""
        params = {name: getattr(self, name) for name in DECODING_SETTINGS}
        # LangChain sets "stop" to the call's stop strings; the configured ones are kept apart
        params["configured_stop"] = params.pop("stop")
        return {"model": self.model_label(), **self.engine_identity(), **params}

    def with_call_settings(self, kwargs: dict[str, Any]) -> Self:
        """A copy with the per-call overrides in ``kwargs`` (which are removed) folded into the
        settings, or ``self`` when there are none. For ``BaseLLM``, whose cache key holds the
        model's settings but not the call's keywords."""
        overrides = {name: kwargs.pop(name) for name in DECODING_SETTINGS if name in kwargs}
        model = kwargs.pop("model", None)
        if model is not None and model != self.model_label():
            overrides |= {"model": model, "guarded": None, "adapter": None, "expert": None}
        if not overrides:
            return self
        copy = self.model_copy(update=overrides)
        if "model" in overrides:
            copy._loaded = None
        return copy

    def get_token_ids(self, text: str) -> list[int]:
        """The model's own token ids of ``text`` (LangChain's token counting; no network)."""
        custom = getattr(self, "custom_get_token_ids", None)
        if custom is not None:
            return custom(text)
        return self.guarded_lm().token_ids(text)

    def context_window(self) -> int | None:
        """The model's context window, from the loaded engine or else its config file (the
        weights are not loaded for this)."""
        if self.guarded is not None:
            return self.guarded.context_window
        if self._loaded is not None:
            return self._loaded.context_window
        path = default_model_dir() if self.model == DEFAULT_MODEL_NAME else resolve(self.model)
        return read_context_window(path)

    def model_label(self, model: str | None = None) -> str:
        """The name reported as ``model_name``."""
        if model is not None:
            return model
        return self.guarded.model_name if self.guarded is not None else self.model

    def engine_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``GuardedLM.stream`` keywords from the settings and per-call ``kwargs`` (which win);
        the keys used are removed from ``kwargs``."""

        def pick(name: str) -> Any:
            return kwargs.pop(name) if name in kwargs else getattr(self, name)

        return {
            "max_new_tokens": pick("max_tokens"),
            "temperature": pick("temperature"),
            "top_p": pick("top_p"),
            "top_k": pick("top_k"),
            "seed": pick("seed"),
            "alpha": pick("alpha"),
            "guard": pick("guard"),
            "stop": stop if stop is not None else self.stop,
        }

    def ls_params(self, params: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Fill LangSmith's standard params."""
        params["ls_provider"] = "ngsd"
        params["ls_model_name"] = self.model_label(kwargs.get("model"))
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if "ls_stop" not in params and self.stop:
            params["ls_stop"] = self.stop
        return params


def model_profile(settings: GuardedSettings) -> ModelProfile:
    """What ChatNGSD supports, for LangChain's model profile: text in and out, tool calling
    with forced choices, native structured output (constrained decoding), and the context
    window as ``max_input_tokens`` (left out when the model's config does not give one)."""
    profile = ModelProfile(
        name=settings.model_label(),
        open_weights=True,
        text_inputs=True,
        image_inputs=False,
        audio_inputs=False,
        video_inputs=False,
        pdf_inputs=False,
        text_outputs=True,
        image_outputs=False,
        audio_outputs=False,
        video_outputs=False,
        reasoning_output=False,
        tool_calling=True,
        tool_choice=True,
        tool_call_streaming=True,
        structured_output=True,
        temperature=True,
    )
    window = settings.context_window()
    if window is not None:
        profile["max_input_tokens"] = window
    return profile
