"""Where alpha comes from: a policy reads each request before decoding starts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class AlphaSchedule:
    """The rows' expert weights and their escalation, each (B,) fp32: ``alpha``, the dissents
    before it rises (``escalate_after``, ``inf``: never), the alpha it rises to, and the
    expert's least probability on its token for a dissent."""

    alpha: torch.Tensor
    escalate_after: torch.Tensor
    escalated_alpha: torch.Tensor
    dissent_confidence: torch.Tensor

    @classmethod
    def of(cls, assessments: Sequence[Assessment]) -> AlphaSchedule:
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32)

        return cls(
            alpha=column([a.alpha for a in assessments]),
            escalate_after=column([a.escalate_after or float("inf") for a in assessments]),
            escalated_alpha=column([a.escalated_alpha for a in assessments]),
            dissent_confidence=column([a.dissent_confidence for a in assessments]),
        )

    def at(self, dissents: torch.Tensor) -> torch.Tensor:
        """(B,) each row's alpha after ``dissents`` (B,) dissents."""
        return escalated_alpha(self.alpha, dissents, self.escalate_after, self.escalated_alpha)

    def to(self, device: torch.device | str) -> AlphaSchedule:
        return AlphaSchedule(*(t.to(device) for t in self._columns()))

    def rows(self, index: torch.Tensor) -> AlphaSchedule:
        return AlphaSchedule(*(t[index] for t in self._columns()))

    def cat(self, other: AlphaSchedule) -> AlphaSchedule:
        pairs = zip(self._columns(), other._columns(), strict=True)
        return AlphaSchedule(*(torch.cat(pair) for pair in pairs))

    def _columns(self) -> tuple[torch.Tensor, ...]:
        return (self.alpha, self.escalate_after, self.escalated_alpha, self.dissent_confidence)


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
