"""The gate's replay over a verified window (:func:`ngsd_guard.replay.replay`)."""

from __future__ import annotations

import pytest
import torch

from ngsd_guard import GateConfig
from ngsd_guard.alpha import AlphaSchedule, Assessment
from ngsd_guard.config import DecodingConfig
from ngsd_guard.divergence import total_variation
from ngsd_guard.gate import make_gate
from ngsd_guard.intervention import intervene
from ngsd_guard.replay import replay
from ngsd_guard.sampling import SamplingParams, choose
from ngsd_guard.verify import DraftLogits


class Dense:
    """(B, T, V) logits held whole."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def take(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.logits[rows, positions]


def _window(chunk: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("ngsd_guard.replay.CHUNK_POSITIONS", chunk)
    monkeypatch.setattr("ngsd_guard.replay.BLOCK_PAIRS", chunk)
    monkeypatch.setattr("ngsd_guard.replay.BLOCK_POSITIONS", chunk)
    generator = torch.Generator().manual_seed(0)
    rows, width, vocab = 3, 12, 50
    base = torch.randn(rows, width, vocab, generator=generator) * 3
    expert = torch.randn(rows, width, vocab, generator=generator) * 3
    gate = make_gate(GateConfig(tau=2.0, threshold=0.05))  # fires at nearly every position
    decodings = [DecodingConfig(temperature=t, seed=1) for t in (0.0, 0.8, 0.0)]
    result = replay(
        base=Dense(base),
        expert=Dense(expert),
        draft=base.argmax(-1),
        valid=torch.ones(rows, width, dtype=torch.bool),
        state=gate.initial_state(rows, torch.device("cpu")),
        gate=gate,
        divergence=total_variation,
        schedule=AlphaSchedule.of([Assessment(alpha=a) for a in (0.7, 0.3, 1.0)]),
        dissents=torch.zeros(rows),
        u=torch.rand(rows, width, generator=generator),
        sampling=SamplingParams.of(decodings),
        top_k=8,
        eos=torch.tensor([vocab + 1]),
    )
    return base, expert, decodings, result


def test_spikes_are_chosen_block_by_block_as_all_at_once(monkeypatch):
    """However many positions spike, forming the logits one window position at a time and
    their distributions one pair at a time chooses the tokens that one pass over the whole
    window chooses: ``s = p_b + alpha (p_e - p_b)`` on the top-k union, argmax or a seeded
    sample per row."""
    base, expert, decodings, one = _window(1, monkeypatch)
    _, _, _, every = _window(1000, monkeypatch)
    assert int(one.spiked.sum()) > 8
    for name in ("chosen", "spiked", "intervened", "kept", "divergence", "expert_token"):
        assert torch.equal(getattr(one, name), getattr(every, name)), name
    r, j = 0, int(one.spiked[0].nonzero()[0])  # a greedy row's first spike, by the formula
    p_b, p_e = torch.softmax(base[r, j], -1), torch.softmax(expert[r, j], -1)
    mixed = intervene(p_b[None], p_e[None], torch.tensor([0.7]), 8)
    want = choose(mixed, torch.zeros(1), SamplingParams.of(decodings[:1]))
    assert int(one.chosen[r, j]) == int(want)


def test_draft_logits_are_released_as_they_are_taken():
    """A window's drafts and their stacked copy are not held twice: taking a pair stacks its
    logits and drops the draft's own tensor, and a pair cannot be taken twice."""
    logits = [[torch.full((5,), float(10 * r + j)) for j in range(3)] for r in range(2)]
    draft = DraftLogits(logits)
    taken = draft.take(torch.tensor([1, 0]), torch.tensor([2, 0]))
    assert taken[:, 0].tolist() == [12.0, 0.0]
    assert logits[1][2] is None and logits[0][0] is None and logits[0][1] is not None
    with pytest.raises(RuntimeError, match="already taken"):
        draft.take(torch.tensor([0]), torch.tensor([0]))
