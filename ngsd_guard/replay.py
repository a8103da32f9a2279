"""The gate replayed over a verified window: which drafted tokens survive, and what replaces
the first one that does not.

Every row of the window holds the base's drafts ``y_0 .. y_{m-1}`` (``m`` may differ per row:
positions past it are padding) with both models' distributions at each position. Per position
``i``, in order: ``D_i = divergence(p_b, p_e)``; the gate steps on ``D_i``; where it spikes, the
token is chosen from ``s = p_b + alpha_i (p_e - p_b)`` on ``top-k(p_b) ∪ top-k(p_e)``. A row
keeps its drafts up to its first spike whose choice differs from the draft (that token
replaced) or its first EOS, whichever comes first; its gate state becomes the one after its
last kept token. This is exactly step-by-step NGSD over the kept tokens (NGSD, Sec. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .divergence import Divergence
from .gate import Gate, GateState
from .intervention import intervene
from .sampling import SamplingParams, choose


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
    state: GateState  # (B,) tensors: each row's gate state after its last kept token

    @property
    def kept_count(self) -> torch.Tensor:
        """(B,) long: how many positions each row keeps."""
        return self.kept.sum(1)


@torch.no_grad()
def replay(
    *,
    p_base: torch.Tensor,
    p_expert: torch.Tensor,
    draft: torch.Tensor,
    valid: torch.Tensor,
    state: GateState,
    gate: Gate,
    divergence: Divergence,
    alpha: torch.Tensor,
    u: torch.Tensor,
    sampling: SamplingParams,
    top_k: int,
    eos: torch.Tensor,
) -> WindowResult:
    """Run the gate over a window and decide which drafts survive.

    Args:
        p_base, p_expert: (B, T, V) fp32 next-token distributions at each window position.
        draft: (B, T) the base's drafted tokens. valid: (B, T) bool, False on padding.
        state: the gate state before the window, (B,) tensors.
        alpha: (B,) each row's expert weight. u: (B, T) the uniforms of those token indices.
        sampling: each row's sampling settings. top_k: k of the candidate union.
        eos: (E,) the token ids that end a row.
    """
    rows, width, vocab = p_base.shape
    device = p_base.device
    d = divergence(p_base.reshape(-1, vocab), p_expert.reshape(-1, vocab)).view(rows, width)
    states, potentials, spikes, alphas = [], [], [], []
    current = state
    for i in range(width):
        # The expert weight at position i; a per-row, per-position alpha computed from the
        # gate state (e.g. an escalation after earlier spikes) belongs here.
        alphas.append(alpha)
        current, potential, spiked = gate.step(current, d[:, i])
        states.append(current)
        potentials.append(potential)
        spikes.append(spiked)
    valid = valid.to(device)
    spiked = torch.stack(spikes, 1) & valid  # (B, T)
    chosen = draft.to(device).clone()
    if bool(spiked.any()):
        where = spiked.nonzero(as_tuple=True)
        mixed = intervene(p_base[where], p_expert[where], torch.stack(alphas, 1)[where], top_k)
        picks = choose(mixed, u.to(device)[where], sampling.rows(where[0].cpu()))
        chosen[where] = picks
    intervened = spiked & (chosen != draft.to(device))
    # A row stops keeping tokens after its first intervention or its first EOS.
    ends = intervened | torch.isin(chosen, eos.to(device))
    kept = ((ends.cumsum(1) - ends.long()) == 0) & valid
    last = (kept.long().sum(1) - 1).clamp_min(0).unsqueeze(1)  # (B, 1)
    new_state = {
        key: torch.stack([s[key] for s in states], 1).gather(1, last).squeeze(1) for key in state
    }
    return WindowResult(
        kept=kept.cpu(),
        draft=draft.cpu(),
        chosen=chosen.cpu(),
        spiked=spiked.cpu(),
        intervened=intervened.cpu(),
        potential=torch.stack(potentials, 1).float().cpu(),
        divergence=d.float().cpu(),
        state=new_state,
    )
