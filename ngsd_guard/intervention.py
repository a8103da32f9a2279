"""The expert's intervention at a spike, batched over rows."""

from __future__ import annotations

import torch


def intervene(
    p_base: torch.Tensor, p_expert: torch.Tensor, alpha: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Mixed scores on the candidate set ``C = top-k(p_b) ∪ top-k(p_e)``.

    ``s(v) = p_b(v) + alpha (p_e(v) - p_b(v))`` for ``v in C`` and ``0`` outside ``C``, so
    that the choice is made over ``C`` (NGSD, Sec. 3.3), renormalised to sum to one.

    Args:
        p_base, p_expert: (B, V) fp32 probabilities.
        alpha: (B,) expert weight per row, in [0, 1].
        top_k: k of each top-k.
    Returns:
        (B, V) fp32 probabilities supported on C.
    """
    k = min(top_k, p_base.shape[-1])
    candidates = torch.zeros_like(p_base, dtype=torch.bool)
    candidates.scatter_(-1, p_base.topk(k, dim=-1).indices, True)
    candidates.scatter_(-1, p_expert.topk(k, dim=-1).indices, True)
    mixed = p_base + alpha.unsqueeze(-1) * (p_expert - p_base)
    scores = torch.where(candidates, mixed.clamp_min(0.0), torch.zeros_like(mixed))
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
