"""Choosing the risk map on held-out training requests (never on evaluation sets).

A slice of the planned requests (:func:`is_holdout`) trains neither the expert nor the probe.
With both trained, :func:`calibrate`:

1. reads every held-out request in its context: the probe's log-odds and the expert's first
   disagreement ``D_0`` (``tv@0``), and fits their blend
   (:class:`~ngsd_guard.reflection.FirstStepBlend`; ``blend=False``: the probe alone). It sets
   the high-risk threshold to the smallest value, at least the paper's 6, above which at most
   ``max_benign_high`` of the benign requests fall. A benign request read as high risk is
   decoded at alpha 0.9 with a primed neuron, which mostly turns it into a refusal, so a false
   "high" is expensive; a harmful request read low still has the escalation;
2. decodes the requests read below it at alpha 0 (the base's own answer: what the guard gives
   a request it reads as low risk until it escalates) and counts the expert's dissents
   (:attr:`ngsd_guard.records.StepRecord.dissent`) in each answer;
3. sets ``escalate_after`` to the smallest count that at most ``max_benign_escalated`` of the
   benign answers reach.

The result is the blend and a :class:`~ngsd_guard.reflection.RiskMap` with two bands (low =
high), alpha 0 below, 0.9 and a primed neuron above, written to the expert's ``policy.json``.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..records import Generation
from ..reflection import DEFAULT_RISK_MAP, POLICY_FILE, FirstStepBlend, ProbeReader, RiskMap
from .probe import auc, fit_blend, probe_features

if TYPE_CHECKING:
    from ..guarded import GuardedLM
    from .data import PlannedRequest

HOLDOUT_PERCENT = 8
"""Share of planned requests (by a hash of the request) kept out of training for calibration."""


def is_holdout(request: str, percent: int = HOLDOUT_PERCENT) -> bool:
    """True for the requests held out for calibration (stable across runs and machines)."""
    return zlib.crc32(request.encode()) % 100 < percent


def split_holdout(
    plan: Sequence[PlannedRequest],
) -> tuple[list[PlannedRequest], list[PlannedRequest]]:
    """``(train, holdout)``: the planned requests that train, and those held out."""
    train: list[PlannedRequest] = []
    holdout: list[PlannedRequest] = []
    for planned in plan:
        (holdout if is_holdout(planned.conversation.request) else train).append(planned)
    return train, holdout


def dissents(generation: Generation) -> int:
    """The expert's dissents in one answer (spikes where it confidently preferred another
    token than the base's)."""
    return sum(r.dissent for r in generation.records)


def choose_high(benign_risks: Sequence[float], *, max_share: float, floor: float = 6.0) -> float:
    """The smallest threshold with two decimals, at least ``floor``, above which at most
    ``max_share`` of ``benign_risks`` lie (rounded up, so that rounding lets none through).

    >>> choose_high([1.0] * 97 + [6.504, 7.25, 9.0], max_share=0.02)
    6.51
    """
    allowed = math.floor(max_share * len(benign_risks))
    ranked = sorted(benign_risks, reverse=True)
    high = max(floor, ranked[allowed]) if allowed < len(ranked) else floor
    return math.ceil(high * 100) / 100


def choose_escalation(
    benign: Sequence[int], *, max_share: float, candidates: Sequence[int] = tuple(range(1, 17))
) -> int | None:
    """The smallest dissent count in ``candidates`` that at most ``max_share`` of the benign
    answers reach (None when even the largest is reached more often).

    >>> choose_escalation([0, 0, 1, 5] * 25, max_share=0.0)
    6
    """
    for m in candidates:
        if sum(c >= m for c in benign) <= max_share * len(benign):
            return m
    return None


@dataclass(frozen=True)
class Calibration:
    """The chosen blend and risk map, and what they do on the held-out requests."""

    risk_map: RiskMap
    blend: FirstStepBlend | None
    held_out: int
    auc_probe: float
    auc_read: float
    benign_read_high: float
    harmful_read_high: float
    benign_escalated: float
    harmful_escalated: float
    dissents_benign: list[int]
    dissents_harmful: list[int]

    def record(self) -> dict[str, object]:
        record = asdict(self)
        record["risk_map"] = self.risk_map.model_dump()
        record["blend"] = self.blend.model_dump() if self.blend is not None else None
        return record

    def summary(self) -> dict[str, object]:
        """:meth:`record` without the per-answer dissent counts."""
        return {k: v for k, v in self.record().items() if not k.startswith("dissents")}

    def save(self, directory: str | Path) -> None:
        """Write ``policy.json`` (read by :func:`~ngsd_guard.reflection.load_risk_map` and
        :func:`~ngsd_guard.reflection.load_blend`)."""
        record = self.record()
        policy = {
            "risk_map": record.pop("risk_map"),
            "blend": record.pop("blend"),
            "calibration": record,
        }
        (Path(directory) / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")


def calibrate(
    lm: GuardedLM,
    probe: ProbeReader,
    holdout: Sequence[PlannedRequest],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_benign_high: float = 0.01,
    max_benign_escalated: float = 0.05,
    blend: bool = True,
) -> Calibration:
    """Choose the blend and risk map of ``lm``'s trained expert and ``probe`` (module
    docstring)."""
    conversations = [p.conversation for p in holdout]
    probe = probe.blended(None)
    spec = probe.features.with_first_divergence() if blend else probe.features
    features = probe_features(lm, conversations, spec, batch_size=batch_size)
    labels = torch.tensor([float(p.label == "harmful") for p in holdout])
    log_odds = probe.logits(features[:, : probe.weight.shape[0]])
    chosen = fit_blend(log_odds, features[:, -1], labels) if blend else None
    reader = probe.blended(chosen)
    read = reader.read(lm, [c.request for c in conversations], features)
    risks = read.tolist()
    benign = [r for p, r in zip(holdout, risks, strict=True) if p.label == "benign"]
    harmful = [r for p, r in zip(holdout, risks, strict=True) if p.label == "harmful"]
    high = choose_high(benign, max_share=max_benign_high)

    below = [(p, r) for p, r in zip(holdout, risks, strict=True) if r <= high]
    counts: dict[str, list[int]] = {"benign": [], "harmful": []}
    groups: dict[str, list[PlannedRequest]] = {}
    for planned, _ in below:
        groups.setdefault(json.dumps(planned.conversation.tools, sort_keys=True), []).append(
            planned
        )
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            generations = lm.generate_batch(
                [list(p.conversation.messages) for p in chunk],
                tools=list(chunk[0].conversation.tools) or None,
                max_new_tokens=max_new_tokens,
                alpha=0.0,
            )
            for planned, generation in zip(chunk, generations, strict=True):
                counts[planned.label].append(dissents(generation))
    after = choose_escalation(counts["benign"], max_share=max_benign_escalated)
    risk_map = DEFAULT_RISK_MAP.model_copy(
        update={"high": high, "low": high, "alpha_low": 0.0, "escalate_after": after}
    )

    def share(values: Sequence[float], above: float) -> float:
        return round(sum(v >= above for v in values) / len(values), 4) if values else 0.0

    return Calibration(
        risk_map=RiskMap(**risk_map.model_dump()),
        blend=chosen,
        held_out=len(holdout),
        auc_probe=round(auc(log_odds, labels), 4),
        auc_read=round(auc(read, labels), 4),
        benign_read_high=share(benign, high + 1e-9),
        harmful_read_high=share(harmful, high + 1e-9),
        benign_escalated=share(counts["benign"], after) if after else 0.0,
        harmful_escalated=share(counts["harmful"], after) if after else 0.0,
        dissents_benign=sorted(counts["benign"]),
        dissents_harmful=sorted(counts["harmful"]),
    )
