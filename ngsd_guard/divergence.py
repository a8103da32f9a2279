"""Divergences between the base and expert next-token distributions, batched over rows."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import DivergenceName

_EPS = 1e-12

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def total_variation(p_base: torch.Tensor, p_expert: torch.Tensor) -> torch.Tensor:
    """``D = 1/2 sum_v |p_b(v) - p_e(v)|`` in [0, 1]. Shapes (B, V), (B, V) -> (B,)."""
    return 0.5 * (p_base - p_expert).abs().sum(-1)


def kl(p_base: torch.Tensor, p_expert: torch.Tensor) -> torch.Tensor:
    """``D = KL(p_b || p_e) = sum_v p_b log(p_b / p_e)``, clamped at 1e-12. (B, V) -> (B,)."""
    p = p_base.clamp_min(_EPS)
    q = p_expert.clamp_min(_EPS)
    return (p_base * (p.log() - q.log())).sum(-1).clamp_min(0.0)


def jsd(p_base: torch.Tensor, p_expert: torch.Tensor) -> torch.Tensor:
    """``D = 1/2 KL(p_b || m) + 1/2 KL(p_e || m)``, ``m = (p_b + p_e)/2``, in [0, ln 2]."""
    mixture = 0.5 * (p_base + p_expert)
    return 0.5 * kl(p_base, mixture) + 0.5 * kl(p_expert, mixture)


def cosine(p_base: torch.Tensor, p_expert: torch.Tensor) -> torch.Tensor:
    """``D = 1 - <p_b, p_e> / (|p_b| |p_e|)`` in [0, 1] for distributions. (B, V) -> (B,)."""
    return 1.0 - torch.nn.functional.cosine_similarity(p_base, p_expert, dim=-1, eps=_EPS)


DIVERGENCES: dict[DivergenceName, Divergence] = {
    "tv": total_variation,
    "kl": kl,
    "jsd": jsd,
    "cosine": cosine,
}
