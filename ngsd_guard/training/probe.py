"""The hidden-state probe: logistic regression on the base's last-layer hidden state at the
last prompt token (the state the engine already has after the prefill), harmful vs benign.

Features are standardised, ``z = (h - mean) / std``; the probe minimises the class-balanced
logistic loss plus ``l2 * |w|^2`` by L-BFGS. Its held-out AUC (k-fold) is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..reflection import ProbeReader


@torch.no_grad()
def prompt_hidden(
    model: PreTrainedModel,
    prompts_ids: Sequence[list[int]],
    *,
    pad_id: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N, H) fp32 last-layer hidden state at the last token of each prompt (token ids),
    left-padded like the engine's prefill; batches are grouped by length."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    rows = torch.empty(len(prompts_ids), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts_ids[i]) for i in chunk)
        ids = torch.tensor(
            [[pad_id] * (width - len(prompts_ids[i])) + prompts_ids[i] for i in chunk]
        )
        mask = torch.tensor(
            [[0] * (width - len(prompts_ids[i])) + [1] * len(prompts_ids[i]) for i in chunk]
        )
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            output_hidden_states=True,
        )
        rows[chunk] = out.hidden_states[-1][:, -1].float().cpu()
    return rows


def fit_probe(features: torch.Tensor, labels: torch.Tensor, *, l2: float = 1e-2) -> ProbeReader:
    """Class-balanced L2 logistic regression; ``labels`` 1 = harmful."""
    x = features.float()
    y = labels.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    positive = y.mean().clamp(1e-3, 1 - 1e-3)
    sample_weight = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive))
    weight = torch.zeros(x.shape[1], requires_grad=True)
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
    return ProbeReader(weight.detach(), bias.detach(), mean, std)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (probability a harmful row outscores a benign one)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def cross_validated_auc(
    features: torch.Tensor, labels: torch.Tensor, *, folds: int = 5, l2: float = 1e-2, seed: int = 0
) -> float:
    """Mean held-out AUC over ``folds`` deterministic folds."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    scores = torch.empty(len(labels))
    for k in range(folds):
        test = order[k::folds]
        train = torch.ones(len(labels), dtype=torch.bool)
        train[test] = False
        probe = fit_probe(features[train], labels[train], l2=l2)
        scores[test] = probe.logits(features[test])
    return auc(scores, labels)
