"""Choosing the next token from the final distribution: greedy, or seeded sampling, per row.

Sampling is inverse-CDF sampling with one uniform number per row and token index, drawn up
front from the row's own seeded generator. The same token index always uses the same number,
so windowed and step-by-step decoding choose the same tokens, and a row decoded in a batch
chooses what it chooses alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import DecodingConfig


@dataclass(frozen=True)
class SamplingParams:
    """Each row's sampling settings, as (B,) tensors: ``temperature`` (0: greedy), ``top_p``
    (1: off) and ``top_k`` (0: off)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor

    @classmethod
    def of(cls, decodings: Sequence[DecodingConfig]) -> SamplingParams:
        return cls(
            temperature=torch.tensor([d.temperature for d in decodings], dtype=torch.float32),
            top_p=torch.tensor([d.top_p for d in decodings], dtype=torch.float32),
            top_k=torch.tensor([d.top_k for d in decodings], dtype=torch.long),
        )

    def rows(self, index: torch.Tensor | Sequence[int]) -> SamplingParams:
        """The settings of the rows at ``index`` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return SamplingParams(self.temperature[index], self.top_p[index], self.top_k[index])

    def cat(self, other: SamplingParams) -> SamplingParams:
        """These rows followed by ``other``'s."""
        return SamplingParams(
            torch.cat([self.temperature, other.temperature]),
            torch.cat([self.top_p, other.top_p]),
            torch.cat([self.top_k, other.top_k]),
        )

    @property
    def greedy(self) -> torch.Tensor:
        """(B,) bool: the rows that decode greedily."""
        return self.temperature == 0.0


def uniforms(rows: int, steps: int, seed: int | None) -> torch.Tensor:
    """(rows, steps) fp32 uniforms in [0, 1) from ``seed`` (a fresh random seed if None)."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    return torch.rand(rows, steps, generator=generator)


def filter_distribution(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to probabilities (B, V) row by row, renormalised.

    ``q ∝ p^(1/T)`` (rows with ``T == 1`` untouched); keep the ``top_k`` largest; keep the
    smallest prefix of the sorted distribution whose mass reaches ``top_p``.
    """
    device = probs.device
    temperature = params.temperature.to(device).unsqueeze(-1)
    hot = (temperature != 1.0) & (temperature > 0.0)
    if bool(hot.any()):
        logq = probs.clamp_min(1e-30).log() / temperature.clamp_min(1e-6)
        tempered = torch.softmax(logq.masked_fill(probs <= 0, float("-inf")), dim=-1)
        probs = torch.where(hot, tempered, probs)
    top_k = params.top_k.to(device).unsqueeze(-1)
    top_p = params.top_p.to(device).unsqueeze(-1)
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        kth = sorted_probs.gather(-1, (top_k - 1).clamp(0, probs.shape[-1] - 1))
        probs = torch.where((top_k > 0) & (probs < kth), torch.zeros_like(probs), probs)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = (mass_before >= top_p) & (top_p < 1.0)
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


def choose(probs: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Per row: ``argmax p`` when its temperature is 0, else a filtered seeded sample. (B,)"""
    greedy = params.greedy.to(probs.device)
    chosen = probs.argmax(-1)
    if bool(greedy.all()):
        return chosen
    sampled = sample(filter_distribution(probs, params), u)
    return torch.where(greedy, chosen, sampled)
