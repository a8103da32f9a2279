"""The risk probe: logistic regression on pooled hidden states of the base's prefill
(:mod:`ngsd_guard.features`: the states the engine already computes), harmful vs benign.

Features are standardised, ``z = (h - mean) / std``; the probe minimises the class-balanced
logistic loss plus ``l2 * |w|^2`` by L-BFGS. Its held-out AUC (k-fold) is recorded.
:func:`fit_blend` fits the same loss on two columns, the probe's log-odds and the expert's
``D_0`` (a :class:`~ngsd_guard.reflection.FirstStepBlend`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..contexts import Conversation
from ..features import PromptFeatures
from ..reflection import FirstStepBlend, ProbeReader

if TYPE_CHECKING:
    from ..guarded import GuardedLM


def probe_features(
    lm: GuardedLM,
    conversations: Sequence[Conversation],
    features: PromptFeatures,
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N, F) prompt features of each conversation, read by the engine exactly as decoding
    reads them (:meth:`GuardedLM.read_features`); batches group equal tools and similar
    lengths."""
    groups: dict[str, list[int]] = {}
    for index, conversation in enumerate(conversations):
        groups.setdefault(json.dumps(conversation.tools, sort_keys=True), []).append(index)
    rows: dict[int, torch.Tensor] = {}
    for indices in groups.values():
        indices = sorted(
            indices, key=lambda i: sum(len(m["content"]) for m in conversations[i].messages)
        )
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            tools = list(conversations[chunk[0]].tools) or None
            prompts = [list(conversations[i].messages) for i in chunk]
            rows.update(
                zip(chunk, lm.read_features(prompts, features, tools=tools).cpu(), strict=True)
            )
    return torch.stack([rows[i] for i in range(len(conversations))])


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    spec: PromptFeatures,
    *,
    l2: float = 1e-2,
) -> ProbeReader:
    """Class-balanced L2 logistic regression on features named by ``spec``; ``labels`` 1 =
    harmful."""
    x = features.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    weight, bias = _logistic((x - mean) / std, labels, l2=l2)
    return ProbeReader(weight, bias, mean, std, spec)


def fit_blend(
    log_odds: torch.Tensor, divergence: torch.Tensor, labels: torch.Tensor, *, l2: float = 1e-3
) -> FirstStepBlend:
    """The :class:`~ngsd_guard.reflection.FirstStepBlend` of (N,) probe log-odds and (N,)
    ``D_0`` that best separates ``labels`` (1 = harmful), class-balanced."""
    weight, bias = _logistic(torch.stack([log_odds, divergence], -1).float(), labels, l2=l2)
    return FirstStepBlend(
        probe_weight=float(weight[0]), divergence_weight=float(weight[1]), bias=float(bias)
    )


def _logistic(
    z: torch.Tensor, labels: torch.Tensor, *, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (F,), bias ()) minimising the class-balanced logistic loss on (N, F) ``z`` plus
    ``l2 * |weight|^2``, by L-BFGS."""
    y = labels.float()
    positive = y.mean().clamp(1e-3, 1 - 1e-3)
    sample_weight = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive))
    weight = torch.zeros(z.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ weight + bias
        loss = (
            F.binary_cross_entropy_with_logits(logits, y, reduction="none") * sample_weight
        ).mean()
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (probability a harmful row outscores a benign one)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def cross_validated_auc(
    features: torch.Tensor,
    labels: torch.Tensor,
    spec: PromptFeatures,
    *,
    groups: Sequence[str] | None = None,
    folds: int = 5,
    l2: float = 1e-2,
) -> float:
    """Mean held-out AUC over ``folds`` deterministic folds. Rows that share a group (the same
    request in several contexts) fall in the same fold, so no request is scored by a probe
    that trained on it; ``groups`` None: every row is its own group."""
    keys = groups if groups is not None else [str(i) for i in range(len(labels))]
    fold = torch.tensor([zlib.crc32(key.encode()) % folds for key in keys])
    scores = torch.empty(len(labels))
    for k in range(folds):
        test = fold == k
        probe = fit_probe(features[~test], labels[~test], spec, l2=l2)
        scores[test] = probe.logits(features[test])
    return auc(scores, labels)
