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

BLOCK_PAIRS = 64
"""The replay forms both models' logits for at most this many (row, position) pairs at a time,
in blocks of window positions (all rows), and chooses the block's spikes from them: it never
holds a (B, T, V) tensor, however wide the window or large the batch, and the expert's output
layer is applied to blocks wide enough to amortise reading its weights."""
BLOCK_POSITIONS = 32
"""At most this many window positions per block: a single row's 64-token window takes two
blocks, half the memory, for one more read of the output layer's weights per window."""
CHUNK_POSITIONS = 8
"""Within a block, the distributions of this many pairs (or spikes) are formed at a time."""


class WindowLogits(Protocol):
    """One model's (B, T, V) next-token logits over a window, formed a few positions at a time
    (:class:`ngsd_guard.verify.DraftLogits`, :class:`ngsd_guard.verify.ExpertLogits`). The
    replay takes each (row, position) once, so an implementation may release what it took."""

    def take(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
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
    valid, draft, u = valid.to(device), draft.to(device), u.to(device)
    d = torch.zeros((rows, width), device=device)
    expert_p = torch.zeros((rows, width), device=device)
    expert_token = torch.zeros((rows, width), dtype=torch.long, device=device)
    chosen = draft.clone()
    threshold = schedule.dissent_confidence.unsqueeze(1)  # (B, 1)
    states, potentials, spikes, alphas, counts = [], [], [], [], []
    current, tally = state, dissents.to(device)
    span = max(1, min(BLOCK_POSITIONS, BLOCK_PAIRS // max(rows, 1)))  # positions per block
    for begin in range(0, width, span):
        block = slice(begin, min(begin + span, width))
        pairs = valid[:, block].nonzero(as_tuple=True)  # (n,) each: rows, block positions
        where = (pairs[0], pairs[1] + begin)
        base_logits, expert_logits = base.take(*where), expert.take(*where)  # (n, V) each
        d[where], expert_p[where], expert_token[where] = _stats(
            base_logits, expert_logits, divergence, device
        )
        confident = (expert_token[:, block] != draft[:, block]) & (expert_p[:, block] >= threshold)
        for i in range(block.start, block.stop):
            current, potential, spiked = gate.step(current, d[:, i])
            spiked = spiked & valid[:, i]
            tally = tally + (spiked & confident[:, i - begin]).float()
            alphas.append(schedule.at(tally))
            states.append(current)
            potentials.append(potential)
            spikes.append(spiked)
            counts.append(tally)
        # the block's spikes, as indices into its pairs, choose from the logits formed above
        hits = torch.stack(spikes[block], 1)[pairs].nonzero().flatten()  # (S,)
        block_alpha = torch.stack(alphas[block], 1)[pairs]  # (n,)
        for start in range(0, len(hits), CHUNK_POSITIONS):
            k = hits[start : start + CHUNK_POSITIONS]
            on = k.to(base_logits.device)
            p_base = torch.softmax(base_logits[on].to(device), -1)  # (chunk, V)
            p_expert = torch.softmax(expert_logits[on].to(device), -1)
            mixed = intervene(p_base, p_expert, block_alpha[k], top_k)
            r, j = where[0][k], where[1][k]
            chosen[r, j] = choose(mixed, u[r, j], sampling.rows(r.cpu()))
        del base_logits, expert_logits
    spiked = torch.stack(spikes, 1)  # (B, T)
    alpha = torch.stack(alphas, 1)  # (B, T)
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
        dissent=(spiked & (expert_token != draft) & (expert_p >= threshold)).cpu(),
        state=new_state,
        dissents=torch.where(count > 0, kept_dissents, dissents.to(device)),
    )


def _stats(
    base_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    divergence: Divergence,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n,) each: ``D(p_b, p_e)``, the expert's top probability and its token, from (n, V)
    logits, the distributions formed :data:`CHUNK_POSITIONS` rows at a time."""
    n = base_logits.shape[0]
    d = torch.empty(n, device=device)
    expert_p = torch.empty(n, device=device)
    expert_token = torch.empty(n, dtype=torch.long, device=device)
    for start in range(0, n, CHUNK_POSITIONS):
        part = slice(start, start + CHUNK_POSITIONS)
        p_base = torch.softmax(base_logits[part].to(device), -1)
        p_expert = torch.softmax(expert_logits[part].to(device), -1)
        d[part] = divergence(p_base, p_expert).to(d.dtype)
        expert_p[part], expert_token[part] = p_expert.max(-1)
    return d, expert_p, expert_token
