"""Choosing the alpha escalation on held-out training requests (never on evaluation sets).

After training, the guarded model (trained expert, trained probe, no escalation) answers a
held-out slice of the planned requests in their contexts. For each answer whose alpha was not
already at the escalated level, count the expert's dissents (spikes where its most likely
token is not the base's). Escalating after ``m`` dissents can change an answer only once it
reaches ``m``, so the smallest ``m`` that at most ``max_benign_share`` of the benign answers
reach is chosen; the share of harmful answers it reaches is reported beside it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..records import Generation

HOLDOUT_PERCENT = 8
"""Share of planned requests (by a hash of the request) kept out of training for calibration."""


def is_holdout(request: str, percent: int = HOLDOUT_PERCENT) -> bool:
    """True for the requests held out for calibration (stable across runs and machines)."""
    return zlib.crc32(request.encode()) % 100 < percent


def dissents(generation: Generation) -> int:
    """Spikes at which the expert's most likely token was not the base's."""
    return sum(
        r.spiked and r.expert_token_id >= 0 and r.expert_token_id != r.base_token_id
        for r in generation.records
    )


@dataclass(frozen=True)
class EscalationChoice:
    """The chosen ``escalate_after`` and what it does on the held-out answers."""

    escalate_after: int | None
    benign_reached: float
    harmful_reached: float
    benign: int
    harmful: int
    counts: dict[str, list[int]]

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def choose_escalation(
    benign: Sequence[int],
    harmful: Sequence[int],
    *,
    max_benign_share: float = 0.02,
    candidates: Sequence[int] = tuple(range(2, 17)),
) -> EscalationChoice:
    """The smallest ``m`` in ``candidates`` reached by at most ``max_benign_share`` of the
    benign dissent counts (None when even the largest is reached more often).

    >>> choice = choose_escalation([0, 0, 1, 5] * 25, [9, 2, 12, 0], max_benign_share=0.0)
    >>> choice.escalate_after, choice.harmful_reached
    (6, 0.5)
    """

    def reached(counts: Sequence[int], m: int) -> float:
        return sum(c >= m for c in counts) / len(counts) if counts else 0.0

    chosen = next((m for m in candidates if reached(benign, m) <= max_benign_share), None)
    return EscalationChoice(
        escalate_after=chosen,
        benign_reached=reached(benign, chosen) if chosen else 0.0,
        harmful_reached=reached(harmful, chosen) if chosen else 0.0,
        benign=len(benign),
        harmful=len(harmful),
        counts={"benign": sorted(benign), "harmful": sorted(harmful)},
    )
