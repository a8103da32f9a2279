"""What a guarded decode reports: one record per token, gate events, and a summary."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from .judge import is_refusal

FinishReason = Literal["stop", "length", "cancelled"]


class StepRecord(BaseModel):
    """One generated token of one row, and what the gate did there."""

    model_config = ConfigDict(frozen=True)

    row: int
    step: int
    token_id: int
    text: str
    divergence: float
    potential: float
    spiked: bool
    alpha: float
    base_token_id: int
    chosen_token_id: int
    expert_token_id: int = -1
    """The expert's most likely token here (-1 when no expert ran)."""
    dissent: bool = False
    """A spike at which the expert confidently preferred another token than the base's
    (what in-flight escalation counts; :func:`ngsd_guard.alpha.escalated_alpha`)."""
    intervened: bool
    finish_reason: FinishReason | None = None


class GateEvent(StepRecord):
    """The record of a step where the neuron spiked. ``intervened``: the choice changed."""

    @classmethod
    def from_record(cls, record: StepRecord) -> GateEvent:
        return cls(**record.model_dump())


class Summary(BaseModel):
    """Totals of one generation. ``alpha`` is the policy's reading before decoding;
    ``escalated``: the expert's sustained divergence raised it mid-answer."""

    model_config = ConfigDict(frozen=True)

    tokens: int
    prompt_tokens: int
    spikes: int
    intervened: int
    mean_divergence: float
    alpha: float
    risk: float | None = None
    escalated: bool = False
    seconds: float


class Generation(BaseModel):
    """The result of one prompt: text, token ids, per-token records and the summary."""

    model_config = ConfigDict(frozen=True)

    text: str
    token_ids: list[int]
    records: list[StepRecord]
    summary: Summary
    finish_reason: FinishReason

    @property
    def gate_events(self) -> list[GateEvent]:
        return [GateEvent.from_record(r) for r in self.records if r.spiked]

    @property
    def guard_intervened(self) -> bool:
        """The expert changed at least one token of this answer (``summary.intervened > 0``)."""
        return self.summary.intervened > 0

    @property
    def guard_refused(self) -> bool:
        """The expert changed this answer and it reads as a refusal (the keyword judge,
        :func:`ngsd_guard.judge.is_refusal`): the guard turned it into a refusal."""
        return self.guard_intervened and is_refusal(self.text)
