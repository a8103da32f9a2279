"""Validated, frozen settings of guarded decoding."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

DivergenceName = Literal["tv", "kl", "jsd", "cosine"]
CacheDtype = Literal["auto", "float32", "float16", "bfloat16"]
GateKind = Literal["lif", "ema", "adam"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(_explain(type(self).__name__, error)) from None


def _explain(owner: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or owner
        lines.append(f"`{owner}.{where}` (={item.get('input')!r}): {item['msg']}")
    return "; ".join(lines)


class GateConfig(_Frozen):
    """The single neuron that decides when the expert may intervene.

    LIF (default): ``v_t = (1 - 1/tau) v_{t-1} + D_t``; spike when ``v_t >= threshold``;
    then ``v_t <- reset + soft_reset (v_t - reset)``. EMA: ``e_t = 0.5 e_{t-1} + 0.5 D_t``.
    Adam-style: ``m = 0.9m + 0.1D; s = 0.999s + 0.001D^2; u = m_hat / (sqrt(s_hat) + 1e-8);
    v = 0.5v + 0.5u``. EMA and Adam spike when their value reaches ``threshold``.
    ``threshold=inf`` never fires; ``threshold=0`` always fires.
    """

    kind: GateKind = Field("lif", description="lif, ema or adam")
    tau: float = Field(8.0, gt=0, description="LIF membrane time constant, in tokens")
    threshold: float = Field(1.0, ge=0, description="firing threshold v_th")
    reset: float = Field(0.0, description="reset potential v_reset")
    soft_reset: float = Field(0.6, ge=0, le=1, description="share of v - v_reset kept at a spike")

    @model_validator(mode="after")
    def _reset_below_threshold(self) -> GateConfig:
        if math.isfinite(self.threshold) and self.reset > self.threshold:
            raise ValueError(f"reset (={self.reset}) must not exceed threshold (={self.threshold})")
        return self


class InterventionConfig(_Frozen):
    """How a spike mixes the expert in: ``s = p_b + alpha (p_e - p_b)`` on the top-k union."""

    alpha: float = Field(0.9, ge=0, le=1, description="expert weight at a spike, in [0, 1]")
    top_k: int = Field(64, ge=1, description="k of top-k(p_b) ∪ top-k(p_e)")


class DecodingConfig(_Frozen):
    """Token budget, sampling and stopping. ``temperature=0`` is greedy."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering")
    seed: int | None = None
    stop: tuple[str, ...] = ()
    early_stop_after: int | None = Field(
        None, ge=1, description="end at the next sentence end once a refusal is established"
    )

    @model_validator(mode="after")
    def _no_empty_stop(self) -> DecodingConfig:
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self


class GuardConfig(_Frozen):
    """Everything that shapes one guarded decode.

    ``window`` is the most tokens a row's base drafts before the expert verifies them in one
    forward; ``window=1`` is step-by-step NGSD. ``quiet_window`` replaces it while the row's
    expert weight is 0 (a request the alpha policy read as benign, before any escalation):
    a greedy row's token cannot change then, so only a longer forward is at stake. A row's
    window starts at its cap (at most 4 when its alpha is above 0), doubles after a
    verification that kept every draft and halves after an intervention;
    ``max_stream_delay`` caps it in time: a row is verified before its oldest drafted token
    would wait longer than that to be streamed (the wait is predicted from the step times
    measured during the call). Every schedule gives the same tokens.
    """

    divergence: DivergenceName = "tv"
    gate: GateConfig = GateConfig()
    intervention: InterventionConfig = InterventionConfig()
    decoding: DecodingConfig = DecodingConfig()
    window: int = Field(16, ge=1, le=64, description="most tokens drafted per verification")
    quiet_window: int = Field(
        64, ge=1, le=256, description="most tokens drafted per verification while alpha is 0"
    )
    max_stream_delay: float | None = Field(
        0.3, gt=0, description="seconds a drafted token may wait to be streamed; None: no bound"
    )
    prefix_cache_tokens: int = Field(
        4096,
        ge=0,
        description="tokens of shared prompt headers (system prompts, tool schemas) kept per "
        "model between calls; 0 prefills every prompt whole",
    )
    expert_cache_dtype: CacheDtype = Field(
        "auto",
        description="dtype the expert's KV cache stores its states in: auto halves a float32 "
        "expert's (float16), else keeps the dtype it computes in",
    )
