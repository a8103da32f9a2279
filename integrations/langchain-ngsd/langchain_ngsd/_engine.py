"""What ChatNGSD and NGSDLLM share: settings, the lazy model, and the mapping of LangChain
parameters onto ``GuardedLM`` options."""

from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ngsd_guard import GuardConfig, GuardedLM
from ngsd_guard.loading import DEFAULT_MODEL_NAME

_MODELS: dict[tuple[str, str | None, str | None, str | None], GuardedLM] = {}
_MODELS_LOCK = threading.Lock()


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
