"""Where alpha comes from: a policy reads each request before decoding starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from .guarded import GuardedLM


class Assessment(BaseModel):
    """A policy's reading of one request: alpha, the risk behind it, and a primed potential."""

    model_config = ConfigDict(frozen=True)

    alpha: float = Field(ge=0, le=1)
    risk: float | None = None
    potential: float = 0.0


class AlphaPolicy(Protocol):
    """``assess(lm, requests, hidden) -> one Assessment per request``.

    ``requests`` are the last user messages; ``hidden`` is the base model's last-layer hidden
    state at the last prompt token, (B, H) fp32, taken from the prefill.
    """

    def assess(
        self, lm: GuardedLM, requests: Sequence[str], hidden: torch.Tensor
    ) -> list[Assessment]: ...


class FixedAlpha:
    """The same alpha for every request."""

    def __init__(self, alpha: float) -> None:
        self.assessment = Assessment(alpha=alpha)

    needs_hidden = False

    def assess(
        self, lm: GuardedLM, requests: Sequence[str], hidden: torch.Tensor
    ) -> list[Assessment]:
        return [self.assessment for _ in requests]
