"""The gate replayed over a verified window: which drafted tokens survive, and what replaces
the first one that does not.

Every row of the window holds the base's drafts ``y_0 .. y_{m-1}`` (``m`` may differ per row:
positions past it are padding) with both models' logits at each position. Per position
``i``, in order: ``D_i = divergence(p_b, p_e)``; the gate steps on ``D_i``; where it spikes, the
token is chosen from ``s = p_b + alpha_i (p_e - p_b)`` on ``top-k(p_b) ∪ top-k(p_e)``, with
``alpha_i`` the row's alpha escalated by its dissents so far (spikes where the expert's most
likely token differs from the draft and holds at least ``dissent_confidence``;
:func:`ngsd_guard.alpha.escalated_alpha`), a count that carries over between windows. A row
keeps its drafts up to its first spike whose choice differs from the draft (that token
replaced) or its first EOS, whichever comes first; its gate state becomes the one after its
last kept token. This is exactly step-by-step NGSD over the kept tokens (NGSD, Sec. 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .alpha import AlphaSchedule
from .divergence import Divergence
from .gate import Gate, GateState
from .intervention import intervene
from .sampling import SamplingParams, choose

CHUNK_POSITIONS = 8
"""The logits and distributions of this many (row, position) pairs (or spikes) are formed at a
time: the replay never holds a (B, T, V) tensor, however wide the window or many its spikes."""


class WindowLogits(Protocol):
    """One model's (B, T, V) next-token logits over a window, formed a few positions at a time
    (:class:`ngsd_guard.verify.DraftLogits`, :class:`ngsd_guard.verify.ExpertLogits`)."""

    def at(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, V) fp32 logits at the (n,) ``rows`` and ``positions``."""
        ...


@dataclass(frozen=True)
class WindowResult:
    """What the replay decided, per row and window position: (B, T) tensors on the CPU."""

    kept: torch.Tensor  # bool: the token at this position stays in the output
    draft: torch.Tensor  # long: the base's draft there
    chosen: torch.Tensor  # long: the token there (the draft, or the expert-mixed choice)
    spiked: torch.Tensor  # bool: the neuron fired there
    intervened: torch.Tensor  # bool: it fired and the choice differs from the draft
    potential: torch.Tensor  # fp32: the gate's potential there, before any reset
    divergence: torch.Tensor  # fp32: D_i
    alpha: torch.Tensor  # fp32: the expert weight there (escalated or not)
    expert_token: torch.Tensor  # long: the expert's most likely token there
    dissent: torch.Tensor  # bool: it spiked and the expert confidently chose another token
    state: GateState  # (B,) tensors: each row's gate state after its last kept token
    dissents: torch.Tensor  # (B,) fp32, on the gate's device: each row's dissents after its
    # last kept token

    @property
    def kept_count(self) -> torch.Tensor:
        """(B,) long: how many positions each row keeps."""
        return self.kept.sum(1)


@torch.no_grad()
def replay(
    *,
    base: WindowLogits,
    expert: WindowLogits,
    draft: torch.Tensor,
    valid: torch.Tensor,
    state: GateState,
    gate: Gate,
    divergence: Divergence,
    schedule: AlphaSchedule,
    dissents: torch.Tensor,
    u: torch.Tensor,
    sampling: SamplingParams,
    top_k: int,
    eos: torch.Tensor,
) -> WindowResult:
    """Run the gate over a window and decide which drafts survive.

    Args:
        base, expert: each model's fp32 next-token logits at every valid window position
            (``-inf`` where a constraint forbids a token); ``p = softmax(logits)``.
        draft: (B, T) the base's drafted tokens. valid: (B, T) bool, False on padding (a
            row may have no valid position: it keeps nothing and its state).
        state: the gate state before the window, (B,) tensors.
        schedule: each row's alpha and escalation. dissents: (B,) each row's dissents so far,
            on the gate's device, where the replay runs.
        u: (B, T) the uniforms of those token indices.
        sampling: each row's sampling settings. top_k: k of the candidate union.
        eos: (E,) the token ids that end a row.
    """
    rows, width = draft.shape
    device = dissents.device
    valid = valid.to(device)
    draft = draft.to(device)
    d, expert_p, expert_token = _position_stats(base, expert, valid, divergence)
    confident = (expert_token != draft) & (expert_p >= schedule.dissent_confidence.unsqueeze(1))
    states, potentials, spikes, alphas, counts = [], [], [], [], []
    current, tally = state, dissents.to(device)
    for i in range(width):
        current, potential, spiked = gate.step(current, d[:, i])
        tally = tally + (spiked & confident[:, i] & valid[:, i]).float()
        alphas.append(schedule.at(tally))
        states.append(current)
        potentials.append(potential)
        spikes.append(spiked)
        counts.append(tally)
    spiked = torch.stack(spikes, 1) & valid  # (B, T)
    alpha = torch.stack(alphas, 1)  # (B, T)
    chosen = draft.clone()
    spike_rows, spike_positions = spiked.nonzero(as_tuple=True)  # (S,) each
    u = u.to(device)
    for start in range(0, len(spike_rows), CHUNK_POSITIONS):
        where = (
            spike_rows[start : start + CHUNK_POSITIONS],
            spike_positions[start : start + CHUNK_POSITIONS],
        )
        p_base = torch.softmax(base.at(*where).to(device), -1)  # (chunk, V)
        p_expert = torch.softmax(expert.at(*where).to(device), -1)
        mixed = intervene(p_base, p_expert, alpha[where], top_k)
        chosen[where] = choose(mixed, u[where], sampling.rows(where[0].cpu()))
    intervened = spiked & (chosen != draft)
    # A row stops keeping tokens after its first intervention or its first EOS.
    ends = intervened | torch.isin(chosen, eos.to(device))
    kept = ((ends.cumsum(1) - ends.long()) == 0) & valid
    count = kept.long().sum(1)
    last = (count - 1).clamp_min(0).unsqueeze(1)  # (B, 1)
    new_state = {  # a row that verified nothing keeps its state
        key: torch.where(
            count > 0, torch.stack([s[key] for s in states], 1).gather(1, last).squeeze(1), value
        )
        for key, value in state.items()
    }
    kept_dissents = torch.stack(counts, 1).gather(1, last).squeeze(1)
    return WindowResult(
        kept=kept.cpu(),
        draft=draft.cpu(),
        chosen=chosen.cpu(),
        spiked=spiked.cpu(),
        intervened=intervened.cpu(),
        potential=torch.stack(potentials, 1).float().cpu(),
        divergence=d.float().cpu(),
        alpha=alpha.float().cpu(),
        expert_token=expert_token.cpu(),
        dissent=(spiked & confident).cpu(),
        state=new_state,
        dissents=torch.where(count > 0, kept_dissents, dissents.to(device)),
    )


def _position_stats(
    base: WindowLogits, expert: WindowLogits, valid: torch.Tensor, divergence: Divergence
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) each: ``D(p_b, p_e)``, the expert's top probability and its token at every valid
    position (0 elsewhere), the distributions formed :data:`CHUNK_POSITIONS` at a time."""
    d = torch.zeros(valid.shape, device=valid.device)
    expert_p = torch.zeros(valid.shape, device=valid.device)
    expert_token = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
    rows, positions = valid.nonzero(as_tuple=True)  # (n,) each
    for start in range(0, len(rows), CHUNK_POSITIONS):
        where = (rows[start : start + CHUNK_POSITIONS], positions[start : start + CHUNK_POSITIONS])
        p_base = torch.softmax(base.at(*where).to(valid.device), -1)
        p_expert = torch.softmax(expert.at(*where).to(valid.device), -1)
        d[where] = divergence(p_base, p_expert).to(d.dtype)
        expert_p[where], expert_token[where] = p_expert.max(-1)
    return d, expert_p, expert_token
