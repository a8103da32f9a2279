"""Self-reflection: read a request's risk before decoding, and turn it into alpha and a primed
potential for the neuron (NGSD, arXiv 2602.02027, Sec. 3.3).

Three risk readers, all batched, all ``read(lm, requests, hidden) -> (B,) fp32 risk in [0, 10]``:

* :class:`JsonReader` (the paper's way): the base generates a JSON rating of the request on
  severity S, actionability A, evasion E and targeting T (0-10 each), under the grammar of
  those four integers (:data:`SCORES_SCHEMA`), so the rating always parses.
* :class:`LogprobReader`: one batched forward per dimension; the score is the expected value
  of the next number token, ``E[s] = sum_k k p(k) / sum_k p(k)`` over the tokens ``"0".."10"``.
* :class:`ProbeReader` (Safety-Neurons style): a logistic probe on the base's pooled hidden
  states, ``risk = 10 sigmoid(w . (h - mu) / sigma + b)``, optionally blended with the
  expert's first disagreement ``D_0`` (:class:`FirstStepBlend`); it costs no forward, since
  the engine pools ``h`` and ``D_0`` from the prefills that decoding runs anyway.

The dimension scores become one risk by the paper's formula (:func:`combine_risk`), and the
risk becomes an :class:`~ngsd_guard.alpha.Assessment` by :class:`RiskMap`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from pydantic import Field, model_validator

from .alpha import Assessment
from .config import _Frozen
from .errors import ConfigError
from .features import FIRST_DIVERGENCE, PromptFeatures

if TYPE_CHECKING:
    from .guarded import GuardedLM

logger = logging.getLogger(__name__)

DIMENSIONS: tuple[str, ...] = ("severity", "actionability", "evasion", "targeting")
"""The four rated dimensions, in the order S, A, E, T."""

_DESCRIPTIONS = {
    "severity": "how dangerous or sensitive the core topic is (weapons, violence, crime, "
    "hacking, fraud, drugs, self-harm are high; everyday topics are 0)",
    "actionability": "how much it asks for concrete, executable steps, recipes or tools "
    "(0 = abstract discussion, 10 = directly executable harmful guidance)",
    "evasion": "how much it tries to get around safety rules (roleplay, 'hypothetically', "
    "'for a story', 'ignore your rules'; 0 = none)",
    "targeting": "how much it names real targets or victims (people, groups, places, "
    "systems; 0 = none)",
}

REFLECTION_SYSTEM = (
    "You are a safety rater. You do not answer requests; you rate them. Rate the user's "
    "request on four dimensions, each an integer from 0 to 10:\n"
    + "\n".join(f"- {name}: {text}" for name, text in _DESCRIPTIONS.items())
    + '\nReply with JSON only, exactly: {"severity": <0-10>, "actionability": <0-10>, '
    '"evasion": <0-10>, "targeting": <0-10>}'
)
"""The rating prompt of :class:`JsonReader` (written for this project after the paper's)."""


def reflection_messages(request: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": REFLECTION_SYSTEM},
        {"role": "user", "content": f"Rate this request (do not answer it):\n\n{request}"},
    ]


# ---------------------------------------------------------------------------- the formula
def combine_risk(scores: torch.Tensor) -> torch.Tensor:
    """(B, 4) scores S, A, E, T in [0, 10] -> (B,) risk, the paper's formula.

    ``r = max(S, 0.5 S + 0.5 mean(top two of A, E, T))``; escalation: when ``S >= 5`` and
    some of A, E, T is ``>= 8``, ``r`` is the largest such value. Clipped to [0, 10].

    >>> combine_risk(torch.tensor([[4.0, 8.0, 6.0, 0.0], [6.0, 9.0, 1.0, 1.0]])).tolist()
    [5.5, 9.0]
    """
    scores = scores.float().clamp(0, 10)
    severity, rest = scores[:, 0], scores[:, 1:]
    top_two = rest.topk(2, dim=-1).values.mean(dim=-1)
    risk = torch.maximum(severity, 0.5 * severity + 0.5 * top_two)
    high = rest.max(dim=-1).values
    escalate = (severity >= 5) & (high >= 8)
    return torch.where(escalate, high, risk).clamp(0, 10)


class RiskMap(_Frozen):
    """Risk -> alpha and primed potential, by thresholds (paper: 0.9 above 6, 0.1 below 5,
    0.5 between). ``potential_*`` is the neuron's initial potential: with LIF,
    ``v_0 = (1 - 1/tau) potential + D_0``, so a potential of ``threshold / (1 - 1/tau)`` or more
    fires on the first token. ``escalate_after`` dissenting spikes in an answer raise alpha to
    ``escalated_alpha`` (:func:`~ngsd_guard.alpha.escalated_alpha`); None never does."""

    high: float = Field(6.0, ge=0, le=10, description="risk above this is high")
    low: float = Field(5.0, ge=0, le=10, description="risk below this is low")
    alpha_high: float = Field(0.9, ge=0, le=1)
    alpha_mid: float = Field(0.5, ge=0, le=1)
    alpha_low: float = Field(0.1, ge=0, le=1)
    potential_high: float = Field(0.0, ge=0, description="initial potential for high risk")
    potential_mid: float = Field(0.0, ge=0)
    potential_low: float = Field(0.0, ge=0)
    escalate_after: int | None = Field(None, ge=1, description="dissents before alpha rises")
    escalated_alpha: float = Field(0.9, ge=0, le=1)
    dissent_confidence: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> RiskMap:
        if self.low > self.high:
            raise ValueError(f"`low` (={self.low}) must not exceed `high` (={self.high})")
        return self

    def assess(self, risk: torch.Tensor) -> list[Assessment]:
        """(B,) risk -> one Assessment per row."""
        out = []
        for r in risk.float().tolist():
            if r > self.high:
                alpha, potential = self.alpha_high, self.potential_high
            elif r < self.low:
                alpha, potential = self.alpha_low, self.potential_low
            else:
                alpha, potential = self.alpha_mid, self.potential_mid
            out.append(
                Assessment(
                    alpha=alpha,
                    risk=r,
                    potential=potential,
                    escalate_after=self.escalate_after,
                    escalated_alpha=self.escalated_alpha,
                    dissent_confidence=self.dissent_confidence,
                )
            )
        return out


# ---------------------------------------------------------------------------- readers
class RiskReader(Protocol):
    """``read(lm, requests, hidden) -> (B,) fp32 risk in [0, 10]``."""

    def read(
        self, lm: GuardedLM, requests: Sequence[str], hidden: torch.Tensor
    ) -> torch.Tensor: ...


_KEY_ALIASES = {
    "severity": ("severity", "severityscore", "s"),
    "actionability": ("actionability", "actionabilityscore", "a"),
    "evasion": ("evasion", "evasionscore", "e"),
    "targeting": ("targeting", "targetingscore", "t"),
}
_PAIR = re.compile(r'"?([A-Za-z_ ]+?)"?\s*[:=]\s*"?(-?\d+(?:\.\d+)?)')


def parse_scores(text: str) -> dict[str, float] | None:
    """The four scores from a model's JSON-ish reply, or None when any is missing.

    Tolerates code fences, prose around the object, single quotes, key variants
    (``severityScore``, ``Severity``), numbers as strings, trailing commas; clamps to [0, 10].

    >>> parse_scores('Sure! ```json\\n{"severityScore": "7", "actionability": 12,'
    ...              ' "Evasion": 0, "targeting": 3,}\\n```')
    {'severity': 7.0, 'actionability': 10.0, 'evasion': 0.0, 'targeting': 3.0}
    >>> parse_scores('{"severity": 7}') is None
    True
    """
    found: dict[str, float] = {}
    for key, value in _PAIR.findall(text.replace("'", '"')):
        name = key.strip().lower().replace("_", "").replace(" ", "")
        for dim, aliases in _KEY_ALIASES.items():
            if name in aliases and dim not in found:
                found[dim] = min(10.0, max(0.0, float(value)))
    if len(found) < len(DIMENSIONS):
        return None
    return {dim: found[dim] for dim in DIMENSIONS}


SCORES_SCHEMA: dict = {
    "type": "object",
    "properties": {d: {"type": "integer", "minimum": 0, "maximum": 10} for d in DIMENSIONS},
    "required": list(DIMENSIONS),
    "additionalProperties": False,
}
"""The grammar :class:`JsonReader` generates under: the four scores, integers 0-10, in order."""


class JsonReader:
    """The base generates its JSON rating (greedy, base alone) under the grammar of
    :data:`SCORES_SCHEMA`, so every reply parses into the four scores.

    ``fallback`` (S, A, E, T) rates a reply that still does not parse (a decode cut short, e.g.
    by cancellation); such a reply is logged at ``WARNING`` and counted in ``failures``.
    """

    def __init__(
        self, *, max_new_tokens: int = 48, fallback: Sequence[float] = (5.0, 6.0, 6.0, 5.0)
    ) -> None:
        if len(fallback) != 4:
            raise ConfigError(f"`fallback` (={fallback!r}) must be four scores S, A, E, T")
        self.max_new_tokens = max_new_tokens
        self.fallback = [float(x) for x in fallback]
        self.failures = 0

    def scores(self, lm: GuardedLM, requests: Sequence[str]) -> torch.Tensor:
        """(B, 4) scores S, A, E, T."""
        from .tools import JsonConstraint

        # Raises ConfigError when `max_new_tokens` cannot hold the four scores.
        constraint = JsonConstraint(lm.tokenizer, SCORES_SCHEMA, max_tokens=self.max_new_tokens)
        prompts = [lm.render(reflection_messages(r)) for r in requests]
        # alpha=0 pins a fixed policy for this inner run: without it the model's own policy
        # (this reader) would be asked again for the rating prompts, recursively.
        generations = lm.generate_batch(
            prompts,
            raw=True,
            guard=False,
            alpha=0.0,
            max_new_tokens=self.max_new_tokens,
            constraint=constraint,
        )
        rows = []
        for request, generation in zip(requests, generations, strict=True):
            parsed = parse_scores(generation.text)
            if parsed is None:
                self.failures += 1
                logger.warning(
                    "reflection JSON did not parse for %r: %r; using fallback %s",
                    request[:60],
                    generation.text[:120],
                    self.fallback,
                )
                rows.append(self.fallback)
            else:
                rows.append([parsed[d] for d in DIMENSIONS])
        return torch.tensor(rows, dtype=torch.float32)

    def read(self, lm: GuardedLM, requests: Sequence[str], hidden: torch.Tensor) -> torch.Tensor:
        return combine_risk(self.scores(lm, requests))


def number_token_ids(tokenizer) -> torch.Tensor:
    """(11,) the id of each single-token number ``"0".."10"`` (-1 where it is not one token)."""
    ids = []
    for k in range(11):
        encoded = tokenizer(str(k), add_special_tokens=False)["input_ids"]
        ids.append(encoded[0] if len(encoded) == 1 else -1)
    return torch.tensor(ids)


def expected_score(logprobs: torch.Tensor, number_ids: torch.Tensor) -> torch.Tensor:
    """(B, V) next-token log-probs -> (B,) ``sum_k k p(k) / sum_k p(k)`` over number tokens.

    >>> lp = torch.full((1, 5), -1e9); lp[0, 3] = lp[0, 4] = 0.0
    >>> expected_score(lp, torch.tensor([1, -1, 3, 4])).tolist()  # "2" -> id 3, "3" -> id 4
    [2.5]
    """
    valid = number_ids >= 0
    values = torch.arange(len(number_ids), dtype=torch.float32)[valid]
    probs = logprobs[:, number_ids[valid]].float().exp()  # (B, K)
    return (probs * values).sum(-1) / probs.sum(-1).clamp_min(1e-12)


class LogprobReader:
    """Expected scores from the number-token probabilities: one batched forward per dimension.

    For dimension d the base sees the rating prompt and the start of its answer,
    ``{"severity": 3, ..., "d": `` (earlier dimensions filled with their rounded expected
    scores), and the score is :func:`expected_score` of the next token.
    """

    def scores(self, lm: GuardedLM, requests: Sequence[str]) -> torch.Tensor:
        """(B, 4) expected scores S, A, E, T."""
        number_ids = number_token_ids(lm.tokenizer)
        heads = [lm.render(reflection_messages(r)) for r in requests]
        columns: list[torch.Tensor] = []
        for d, dim in enumerate(DIMENSIONS):
            filled = [
                ", ".join(f'"{DIMENSIONS[j]}": {round(float(columns[j][b]))}' for j in range(d))
                for b in range(len(requests))
            ]
            texts = [
                head + "{" + (f + ", " if f else "") + f'"{dim}": '
                for head, f in zip(heads, filled, strict=True)
            ]
            logprobs = lm.next_token_logprobs(texts)  # (B, V)
            columns.append(expected_score(logprobs.cpu(), number_ids))
        return torch.stack(columns, dim=-1)

    def read(self, lm: GuardedLM, requests: Sequence[str], hidden: torch.Tensor) -> torch.Tensor:
        return combine_risk(self.scores(lm, requests))


class FirstStepBlend(_Frozen):
    """``risk = 10 sigmoid(probe_weight * l + divergence_weight * D_0 + bias)``: a probe's
    log-odds ``l`` blended with ``D_0``, the expert's first disagreement with the base
    (``tv@0``, :mod:`ngsd_guard.features`). The probe reads the request as the plain base
    sees it; ``D_0`` is how strongly the trained expert already wants to answer otherwise.
    Fitted on held-out requests by calibration, since on its own training requests the expert
    disagrees more than it will on new ones."""

    probe_weight: float
    divergence_weight: float
    bias: float


class FirstStepReader:
    """``risk = 10 D_0``: the expert's first disagreement with the base alone
    (``tv@0``, :mod:`ngsd_guard.features`), a total variation in [0, 1]. It needs no probe and
    no hidden states, only the two prefills that decoding runs anyway, so any base and expert
    pair has it.

    >>> FirstStepReader().read(None, ["a", "b"], torch.tensor([[0.25], [0.9]])).tolist()
    [2.5, 9.0]
    """

    features = PromptFeatures((FIRST_DIVERGENCE,))

    def read(self, lm: GuardedLM, requests: Sequence[str], features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[-1] != 1:
            raise ConfigError(
                f"FirstStepReader reads one feature (tv@0); got shape {tuple(features.shape)}"
            )
        return 10.0 * features[:, 0].float().cpu().clamp(0.0, 1.0)


@dataclass(frozen=True)
class RiskTerms:
    """A probe reader's risk of one request and its terms: the probe's log-odds ``l`` and,
    with a :class:`FirstStepBlend`, the expert's first disagreement ``D_0`` (else None)."""

    risk: float
    probe_log_odds: float
    first_divergence: float | None


class ProbeReader:
    """``risk = 10 sigmoid(l)`` with ``l = w . (h - mean) / std + bias`` on the prefill's pooled
    hidden states ``h`` (``probe_features``, e.g. ``last@30+mean@18``; see
    :mod:`ngsd_guard.features`); with a :class:`FirstStepBlend`, the blend of ``l`` and
    ``D_0``, and the reader's ``features`` gain ``tv@0``."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        features: PromptFeatures,
        blend: FirstStepBlend | None = None,
    ) -> None:
        if weight.ndim != 1 or mean.shape != weight.shape or std.shape != weight.shape:
            raise ConfigError(
                f"probe shapes disagree: weight {tuple(weight.shape)}, mean "
                f"{tuple(mean.shape)}, std {tuple(std.shape)}; retrain with train-expert"
            )
        if features.reads_expert:
            raise ConfigError(
                f"a probe's own features (={features}) are hidden states; tv@0 comes from a "
                "FirstStepBlend"
            )
        self.weight, self.bias = weight.float(), bias.float().reshape(())
        self.mean, self.std = mean.float(), std.float().clamp_min(1e-6)
        self.probe_features = features
        self.blend = blend

    @property
    def features(self) -> PromptFeatures:
        """What the reader needs from the prefills: the probe's, plus ``tv@0`` with a blend."""
        if self.blend is None:
            return self.probe_features
        return self.probe_features.with_first_divergence()

    def blended(self, blend: FirstStepBlend | None) -> ProbeReader:
        """This probe read through ``blend`` (None: the probe alone)."""
        return ProbeReader(
            self.weight, self.bias, self.mean, self.std, self.probe_features, blend=blend
        )

    @classmethod
    def load(cls, path: str | Path) -> ProbeReader:
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"probe file (={str(path)!r}) not found; train one with train-expert")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            spec = (handle.metadata() or {}).get("features")
        if spec is None:
            raise ConfigError(
                f"probe file (={str(path)!r}) does not say which features it reads (no "
                "'features' metadata); retrain it with train-expert"
            )
        tensors = load_file(str(path))
        return cls(
            tensors["weight"],
            tensors["bias"],
            tensors["mean"],
            tensors["std"],
            PromptFeatures.parse(spec),
        )

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the probe (not its blend, which lives in the expert's ``policy.json``)."""
        from safetensors.torch import save_file

        tensors = {"weight": self.weight, "bias": self.bias.reshape(1), "mean": self.mean}
        tensors["std"] = self.std
        metadata = {**(metadata or {}), "features": str(self.probe_features)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) features of ``probe_features`` -> (B,) the probe's log-odds of 'harmful'."""
        z = (features.float().to(self.weight.device) - self.mean) / self.std
        return z @ self.weight + self.bias

    def terms(self, features: torch.Tensor) -> list[RiskTerms]:
        """(B, F) features of :attr:`features` -> each row's risk and the terms behind it."""
        log_odds, risk = self._read(features)
        divergence = features[:, -1].tolist() if self.blend is not None else [None] * len(risk)
        return [
            RiskTerms(risk=r, probe_log_odds=lo, first_divergence=d)
            for r, lo, d in zip(risk.tolist(), log_odds.tolist(), divergence, strict=True)
        ]

    def read(self, lm: GuardedLM, requests: Sequence[str], features: torch.Tensor) -> torch.Tensor:
        return self._read(features)[1]

    def _read(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) features -> ((B,) the probe's log-odds, (B,) risk)."""
        width = self.weight.shape[0] + (self.blend is not None)
        if features.shape[-1] != width:
            raise ConfigError(
                f"the probe expects {width} features ({self.features}) but the model gives "
                f"{features.shape[-1]}; train a probe for this model with train-expert"
            )
        features = features.cpu().float()
        if self.blend is None:
            log_odds = self.logits(features)
            return log_odds, 10.0 * torch.sigmoid(log_odds)
        # tv@0 is the last term of `self.features`
        log_odds = self.logits(features[:, :-1])
        blend = self.blend
        mixed = blend.probe_weight * log_odds + blend.divergence_weight * features[:, -1]
        return log_odds, 10.0 * torch.sigmoid(mixed + blend.bias)


# ---------------------------------------------------------------------------- the policy
class ReflectionAlpha:
    """An :class:`~ngsd_guard.alpha.AlphaPolicy`: a risk reader, then a :class:`RiskMap`.

    >>> policy = ReflectionAlpha(ProbeReader.load("probe.safetensors"))  # doctest: +SKIP
    >>> lm = GuardedLM.from_default(alpha_policy=policy)                  # doctest: +SKIP
    """

    def __init__(self, reader: RiskReader, risk_map: RiskMap | None = None) -> None:
        self.reader = reader
        self.risk_map = risk_map or RiskMap()

    @property
    def features(self) -> PromptFeatures | None:
        """What the reader needs from the prefill (a probe's features), else None."""
        return getattr(self.reader, "features", None)

    def assess(
        self, lm: GuardedLM, requests: Sequence[str], features: torch.Tensor
    ) -> list[Assessment]:
        return self.risk_map.assess(self.reader.read(lm, requests, features))


SHIPPED_EXPERT = Path(__file__).parent / "data" / "experts" / "smollm2-135m-instruct"
PROBE_FILE = "probe.safetensors"
SHIPPED_PROBE = SHIPPED_EXPERT / PROBE_FILE
POLICY_FILE = "policy.json"
"""Beside an expert's probe: the :class:`RiskMap` fields that its training chose."""

DEFAULT_RISK_MAP = RiskMap(alpha_high=0.9, alpha_mid=0.5, alpha_low=0.1, potential_high=2.0)
"""Without a ``policy.json``: the paper's thresholds and alphas, and a high-risk request
primes the neuron so that it fires from the first token."""


def load_risk_map(directory: str | Path) -> RiskMap:
    """The expert directory's ``policy.json`` as a RiskMap, else :data:`DEFAULT_RISK_MAP`."""
    path = Path(directory) / POLICY_FILE
    if not path.is_file():
        return DEFAULT_RISK_MAP
    return RiskMap(**json.loads(path.read_text())["risk_map"])


def load_blend(directory: str | Path) -> FirstStepBlend | None:
    """The expert directory's ``policy.json`` blend of the probe with ``tv@0``, if any."""
    path = Path(directory) / POLICY_FILE
    if not path.is_file():
        return None
    blend = json.loads(path.read_text()).get("blend")
    return FirstStepBlend(**blend) if blend is not None else None


def load_probe(path: str | Path, *, blend: bool = True) -> ProbeReader:
    """An expert directory's probe, read through the blend of its ``policy.json`` (as the
    expert's policy reads risk); ``blend=False``: the probe alone."""
    path = Path(path)
    return ProbeReader.load(path).blended(load_blend(path.parent) if blend else None)


def default_policy(probe: str | Path | None = None) -> ReflectionAlpha | None:
    """The probe policy of an expert directory's probe (default: the shipped expert's), with
    the blend and risk map of its ``policy.json``; None when there is no probe file."""
    path = Path(probe) if probe is not None else SHIPPED_PROBE
    if not path.is_file():
        return None
    return ReflectionAlpha(load_probe(path), load_risk_map(path.parent))


def risk_json(scores: dict[str, float]) -> str:
    """Scores as the JSON the reader expects (used in tests and docs)."""
    return json.dumps(scores)
