"""Where alpha comes from: a policy reads each request before decoding starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from .features import PromptFeatures

if TYPE_CHECKING:
    from .guarded import GuardedLM


class Assessment(BaseModel):
    """A policy's reading of one request: alpha, the risk behind it, a primed potential, and
    how alpha escalates mid-answer when the expert keeps diverging (:func:`escalated_alpha`)."""

    model_config = ConfigDict(frozen=True)

    alpha: float = Field(ge=0, le=1)
    risk: float | None = None
    potential: float = 0.0
    escalate_after: int | None = Field(None, ge=1, description="dissents before alpha rises")
    escalated_alpha: float = Field(0.9, ge=0, le=1)
    dissent_confidence: float = Field(
        0.5, ge=0, le=1, description="the expert's least probability on its token for a dissent"
    )


def escalated_alpha(
    alpha: torch.Tensor, dissents: torch.Tensor, after: torch.Tensor, raised: torch.Tensor
) -> torch.Tensor:
    """In-flight escalation: a row's alpha once the expert has dissented ``after`` times.

    ``alpha_t = max(alpha, raised)`` if ``dissents_t >= after`` else ``alpha``, where
    ``dissents_t`` counts the row's spikes, up to and including step t, at which the expert's
    most likely token differs from the base's draft and holds at least ``dissent_confidence``
    of its probability (``after = inf``: never). A risk reading that missed is then not final:
    where the expert keeps confidently disagreeing, it gets its say.
    All arguments and the result are (B,) tensors.

    >>> escalated_alpha(torch.tensor([0.1, 0.1, 0.5]), torch.tensor([2.0, 3.0, 9.0]),
    ...                 torch.tensor([3.0, 3.0, float("inf")]), torch.tensor([0.9, 0.9, 0.9]))
    tensor([0.1000, 0.9000, 0.5000])
    """
    return torch.where(dissents >= after, torch.maximum(alpha, raised), alpha)


class AlphaPolicy(Protocol):
    """``assess(lm, requests, features) -> one Assessment per request``.

    ``requests`` are the last user messages; ``features`` are the prompt features the policy
    names in its ``features`` attribute (:class:`~ngsd_guard.features.PromptFeatures`), (B, F)
    fp32, pooled from the base's prefill at no extra forward; (B, 0) when it names none.
    """

    features: PromptFeatures | None

    def assess(
        self, lm: GuardedLM, requests: Sequence[str], features: torch.Tensor
    ) -> list[Assessment]: ...


class FixedAlpha:
    """The same alpha for every request."""

    def __init__(self, alpha: float) -> None:
        self.assessment = Assessment(alpha=alpha)

    features = None

    def assess(
        self, lm: GuardedLM, requests: Sequence[str], features: torch.Tensor
    ) -> list[Assessment]:
        return [self.assessment for _ in requests]
