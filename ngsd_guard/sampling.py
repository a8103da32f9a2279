"""Choosing the next token from the final distribution: greedy, or seeded sampling.

Sampling is inverse-CDF sampling with one uniform number per row and position, drawn up front
from a seeded generator. The same position always uses the same number, so windowed and
step-by-step decoding choose the same tokens.
"""

from __future__ import annotations

import torch

from .config import DecodingConfig


def is_greedy(decoding: DecodingConfig) -> bool:
    return decoding.temperature == 0.0


def uniforms(rows: int, steps: int, seed: int | None) -> torch.Tensor:
    """(rows, steps) fp32 uniforms in [0, 1) from ``seed`` (a fresh random seed if None)."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    return torch.rand(rows, steps, generator=generator)


def filter_distribution(probs: torch.Tensor, decoding: DecodingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p applied to probabilities (B, V), renormalised.

    ``q ∝ p^(1/T)``; keep the ``top_k`` largest; keep the smallest prefix of the sorted
    distribution whose mass reaches ``top_p``.
    """
    if decoding.temperature != 1.0:
        logq = probs.clamp_min(1e-30).log() / decoding.temperature
        probs = torch.softmax(logq.masked_fill(probs <= 0, float("-inf")), dim=-1)
    if decoding.top_k:
        kth = probs.topk(min(decoding.top_k, probs.shape[-1]), dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if decoding.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= decoding.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the first token (by descending probability) whose cumulative mass > ``u``.

    Args:
        probs: (B, V) probabilities. u: (B,) uniforms in [0, 1).
    Returns: (B,) token ids.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cdf = sorted_probs.cumsum(-1)
    total = cdf[..., -1:]
    index = torch.searchsorted(
        cdf, (u.to(cdf.device).unsqueeze(-1) * total).contiguous(), right=True
    )
    index = index.clamp_max(probs.shape[-1] - 1)
    return order.gather(-1, index).squeeze(-1)


def choose(probs: torch.Tensor, u: torch.Tensor, decoding: DecodingConfig) -> torch.Tensor:
    """Greedy ``argmax p`` when ``temperature == 0``, else a filtered seeded sample. (B,)"""
    if is_greedy(decoding):
        return probs.argmax(-1)
    return sample(filter_distribution(probs, decoding), u)
