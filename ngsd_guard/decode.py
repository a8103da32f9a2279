"""The guarded decode loop: both models cached, rows batched, the expert verifying windows.

Per window of ``k`` tokens:

1. *Draft*: the base decodes ``k`` tokens one forward at a time, as if the gate stayed quiet.
2. *Verify*: the expert scores the whole window in one forward of ``k`` tokens.
3. *Replay*: the gate runs over the window's divergences, row by row in tensors. At the first
   spike whose intervened token differs from the draft, the row keeps that token and drops the
   rest of its draft: the dropped positions are masked out of both KV caches, and the new token
   is fed to both models.

With ``k=1`` this is step-by-step NGSD; any ``k`` gives the same tokens, spikes included.
On text where the gate is quiet the expert's cost per token tends to ``1/k`` of a forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .alpha import escalated_alpha
from .config import GuardConfig
from .constraints import TokenConstraint
from .divergence import DIVERGENCES, Divergence
from .experts import Runner
from .features import PromptFeatures
from .gate import Gate, make_gate
from .intervention import intervene
from .judge import is_refusal
from .records import FinishReason, StepRecord
from .sampling import choose, is_greedy, uniforms

_SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass(frozen=True)
class Readings:
    """The alpha policy's reading of every row, each (B,): alpha, the neuron's initial
    potential, and the escalation (dissents before alpha rises, ``inf`` for never; the alpha
    it rises to; the expert's least probability on its token for a dissent)."""

    alpha: torch.Tensor
    potential: torch.Tensor
    escalate_after: torch.Tensor
    escalated_alpha: torch.Tensor
    dissent_confidence: torch.Tensor


Assess = Callable[[torch.Tensor], Readings]
"""(B, F) prompt features from the prefill (F = 0 when none were asked) -> :class:`Readings`."""


@dataclass
class RowResult:
    """What one row produced."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None


class _Side:
    """One model's decoding state: runner, KV cache, attention mask and next positions.

    The prompt is fed lazily, together with the first tokens given to :meth:`feed`: the expert
    never needs a forward of its own for the prompt.
    """

    def __init__(
        self,
        runner: Runner,
        prompts: Sequence[Sequence[int]],
        pad_id: int,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.runner = runner
        width = max(len(p) for p in prompts)
        # each row's last user message, in padded positions
        self.spans = torch.tensor(
            [
                (start + width - len(p), end + width - len(p))
                for p, (start, end) in zip(prompts, spans or [(0, 0)] * len(prompts), strict=True)
            ]
        )
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        self.cache = DynamicCache()
        self.mask = mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        self.next_position = positions[:, -1] + 1
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = (ids, positions)

    def feed(
        self, tokens: torch.Tensor, *, keep: int, features: PromptFeatures | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed (B, T) tokens (after the prompt, if it is still unfed); the logits of the last
        ``keep`` positions (B, keep, V), and the prompt's features if asked (first feed only)."""
        tokens = tokens.to(self.mask.device)  # the side's bookkeeping lives on the CPU
        count = tokens.shape[1]
        positions = self.next_position.unsqueeze(-1) + torch.arange(count)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], -1)
        if self.prompt is not None:
            prompt_ids, prompt_positions = self.prompt
            self.prompt = None
            tokens = torch.cat([prompt_ids, tokens], -1)
            positions = torch.cat([prompt_positions, positions], -1)
        logits, pooled = self.runner.forward(
            tokens, self.mask, positions, self.cache, features=features, spans=self.spans, keep=keep
        )
        self.next_position = self.next_position + count
        return logits, pooled

    def drop_tail(self, row: int, count: int) -> None:
        """Hide the last ``count`` fed tokens of ``row`` from every later query."""
        self.mask[row, self.mask.shape[1] - count :] = 0
        self.next_position[row] -= count


class _Text:
    """Incremental detokenisation of one row, with stop strings that may span tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.emitted = ""
        self.refusal_from: int | None = None

    def advance(self, ids: Sequence[int], final: bool) -> tuple[str, bool]:
        """(text delta, hit a stop string) after ``ids``; holds back partial stop strings."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._emit(text[:cut]), True
        if not final:
            text = text[: len(text) - self._held_back(text)]
        return self._emit(text), False

    def _held_back(self, text: str) -> int:
        if text.endswith("\ufffd"):
            return 1
        return max(
            (
                n
                for s in self.stop
                for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])
            ),
            default=0,
        )

    def _emit(self, text: str) -> str:
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta

    def early_stop_cut(self, tokens: int, after: int | None) -> int | None:
        """Where to end once a refusal is established past ``after`` tokens: a sentence end."""
        if after is None or tokens < after:
            return None
        if self.refusal_from is None:
            if is_refusal(self.emitted):
                self.refusal_from = len(self.emitted)
            return None
        tail = self.emitted[self.refusal_from :]
        ends = [tail.find(c) for c in _SENTENCE_ENDS if tail.find(c) >= 0]
        return self.refusal_from + min(ends) + 1 if ends else None


@torch.no_grad()
def decode(
    *,
    base: Runner,
    expert: Runner | None,
    base_prompts: Sequence[Sequence[int]],
    expert_prompts: Sequence[Sequence[int]],
    config: GuardConfig,
    tokenizer: PreTrainedTokenizerBase,
    eos_ids: Sequence[int],
    assess: Assess,
    constraints: Sequence[TokenConstraint | None],
    cancel: threading.Event,
    features: PromptFeatures | None,
    spans: Sequence[tuple[int, int]],
) -> Generator[StepRecord, None, list[RowResult]]:
    """Yield one StepRecord per generated token (per row, in order); return the rows."""
    decoding = config.decoding
    rows = len(base_prompts)
    device = base.out_device
    pad_id = eos_ids[0]
    eos = torch.tensor(list(eos_ids), device=device)

    base_side = _Side(base, base_prompts, pad_id, spans)
    empty = torch.zeros((rows, 0), dtype=torch.long)
    first_logits, pooled = base_side.feed(empty, keep=1, features=features)
    readings = assess(pooled if pooled is not None else torch.zeros(rows, 0))
    alpha = readings.alpha.to(device, torch.float32)
    escalation = (
        readings.escalate_after.to(device, torch.float32),
        readings.escalated_alpha.to(device, torch.float32),
    )
    confidence = readings.dissent_confidence.to(device, torch.float32)
    spikes = torch.zeros(rows, dtype=torch.float32, device=device)
    potential = readings.potential
    expert_side = _Side(expert, expert_prompts, pad_id) if expert is not None else None
    divergence_fn = DIVERGENCES[config.divergence]
    gate = make_gate(config.gate)
    state = gate.initial_state(rows, device, potential.to(device))
    max_window = config.window if expert is not None else 1
    window = max_window
    u = uniforms(rows, decoding.max_new_tokens + max_window, decoding.seed)

    results = [RowResult() for _ in range(rows)]
    texts = [_Text(tokenizer, decoding.stop) for _ in range(rows)]
    finished = [False] * rows
    # The last kept token of each row, fed to neither model yet (None before the first).
    pending: torch.Tensor | None = None
    while not all(finished):
        if cancel.is_set():
            for row in range(rows):
                if not finished[row]:
                    finished[row] = True
                    results[row].finish_reason = "cancelled"
            break
        counts = torch.tensor([len(r.token_ids) for r in results])
        left = max(
            decoding.max_new_tokens - len(r.token_ids)
            for r, f in zip(results, finished, strict=True)
            if not f
        )
        k = min(window, left)
        done = torch.tensor(finished, device=device)

        # 1. Draft: k base steps, as if the gate stayed quiet. Each step feeds the previous
        #    token; the last draft token stays unfed, so a replaced token costs no forward.
        drafts, base_logits, allowed = [], [], []
        drafting = ~done
        for i in range(k):
            previous = drafts[-1] if drafts else pending
            if previous is None:
                logits = first_logits[:, -1]
            else:
                logits = base_side.feed(previous.unsqueeze(-1), keep=1)[0][:, -1]
            masks = _allowed(constraints, results, drafts, drafting, eos_ids, logits.shape[-1])
            if masks is not None:
                logits = logits.masked_fill(~masks, float("-inf"))
            if is_greedy(decoding):
                token = logits.argmax(-1)
            else:
                token = choose(torch.softmax(logits, -1), _at(u, counts + i), decoding)
            token = torch.where(drafting, token, torch.full_like(token, pad_id))
            drafts.append(token)
            base_logits.append(logits)
            allowed.append(masks)
            drafting = drafting & ~torch.isin(token, eos)
            if not bool(drafting.any()):
                k = i + 1
                break
        draft = torch.stack(drafts, dim=1)  # (B, k)

        # 2. Verify: the expert scores the window in one forward of the same tokens.
        if expert_side is None:
            table = _quiet_window(draft, state, alpha)
        else:
            fed = (
                draft[:, :-1]
                if pending is None
                else torch.cat([pending[:, None], draft[:, :-1]], 1)
            )
            expert_logits = expert_side.feed(fed, keep=k)[0]  # (B, k, V)
            if allowed[0] is not None:
                masks = torch.stack(allowed, 1)
                expert_logits = expert_logits.masked_fill(~masks, float("-inf"))

            # 3. Replay the gate over the window.
            p_base = torch.softmax(torch.stack(base_logits, 1), -1)  # (B, k, V)
            p_expert = torch.softmax(expert_logits, -1)
            state, spikes, table = _replay(
                p_base,
                p_expert,
                draft,
                done,
                state,
                spikes,
                gate,
                divergence_fn,
                alpha,
                escalation,
                confidence,
                u.gather(1, (counts.unsqueeze(1) + torch.arange(k)).clamp_max(u.shape[1] - 1)),
                config,
                eos,
            )
        acc_t, draft_t, chosen_t, div_t, spike_t, pot_t, d_t, alpha_t, expert_t, dissent_t = table
        last_kept = draft[:, -1].clone()
        replaced = False
        for row in range(rows):
            for i in range(k):
                if not acc_t[row][i] or finished[row]:
                    break
                token = chosen_t[row][i]
                last_kept[row] = token
                result = results[row]
                result.token_ids.append(token)
                n = len(result.token_ids)
                reason: FinishReason | None = None
                constraint = constraints[row]
                if token in eos_ids or (
                    constraint is not None and constraint.is_complete(result.token_ids)
                ):
                    reason = "stop"
                elif n >= decoding.max_new_tokens:
                    reason = "length"
                delta, hit_stop = texts[row].advance(result.token_ids, final=reason is not None)
                if hit_stop:
                    reason = "stop"
                cut = texts[row].early_stop_cut(n, decoding.early_stop_after)
                if cut is not None and reason is None:
                    delta = delta[: max(0, len(delta) - (len(texts[row].emitted) - cut))]
                    texts[row].emitted = texts[row].emitted[:cut]
                    reason = "stop"
                if reason is not None:
                    finished[row] = True
                    result.finish_reason = reason
                    result.text = texts[row].emitted
                if div_t[row][i] and reason is None:
                    # Drop the draft tokens fed after position i; y_i becomes pending.
                    replaced = True
                    for side in (base_side, expert_side):
                        if side is not None and k - 1 - i > 0:
                            side.drop_tail(row, k - 1 - i)
                yield StepRecord(
                    row=row,
                    step=n - 1,
                    token_id=token,
                    text=delta,
                    divergence=d_t[row][i],
                    potential=pot_t[row][i],
                    spiked=spike_t[row][i],
                    alpha=alpha_t[row][i],
                    base_token_id=draft_t[row][i],
                    chosen_token_id=token,
                    expert_token_id=expert_t[row][i],
                    dissent=dissent_t[row][i],
                    intervened=bool(div_t[row][i]),
                    finish_reason=reason,
                )
        pending = last_kept
        # Shorter windows while the expert keeps intervening, longer while it is quiet.
        window = max(1, window // 2) if replaced else min(max_window, window * 2)

    for row, result in enumerate(results):
        if result.finish_reason is None:
            result.finish_reason = "length"
        result.text = texts[row].emitted
    return results


def _quiet_window(
    draft: torch.Tensor, state: dict[str, torch.Tensor], alpha: torch.Tensor
) -> list[list]:
    """The table of a window decoded by the base alone: every draft token kept."""
    zeros = torch.zeros(draft.shape, dtype=torch.float32).tolist()
    flags = torch.zeros(draft.shape, dtype=torch.bool)
    potential = next(iter(state.values())).unsqueeze(1).expand(draft.shape).tolist()
    return [
        torch.ones_like(flags).tolist(),
        draft.tolist(),
        draft.tolist(),
        flags.tolist(),
        flags.tolist(),
        potential,
        zeros,
        alpha.float().cpu().unsqueeze(1).expand(draft.shape).tolist(),
        torch.full(draft.shape, -1).tolist(),
        flags.tolist(),
    ]


def _replay(
    p_base: torch.Tensor,
    p_expert: torch.Tensor,
    draft: torch.Tensor,
    done: torch.Tensor,
    state: dict[str, torch.Tensor],
    spikes: torch.Tensor,
    gate: Gate,
    divergence_fn: Divergence,
    alpha: torch.Tensor,
    escalation: tuple[torch.Tensor, torch.Tensor],
    confidence: torch.Tensor,
    window_u: torch.Tensor,
    config: GuardConfig,
    eos: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[list]]:
    """Run the gate over a verified window and decide which draft tokens survive.

    All positions are scored at once; the intervention runs only where the neuron spiked.
    A row keeps its draft up to its first spike whose choice differs (that token replaced),
    or up to EOS; its gate state is the one after the last kept token.

    Alpha escalates per position (:func:`~ngsd_guard.alpha.escalated_alpha`) with the row's
    count of dissents (spikes where the expert's most likely token is not the draft's and has
    at least ``confidence`` of its probability), which carries over between windows like the
    gate state.

    Returns the new gate state, the new dissent counts and a table of Python lists, each
    (B, k): accepted, draft, chosen, intervened, spiked, potential, divergence, alpha, expert's
    most likely token.
    """
    rows, k, vocab = p_base.shape
    divergence = divergence_fn(p_base.reshape(-1, vocab), p_expert.reshape(-1, vocab))
    divergence = divergence.view(rows, k)
    expert_top_p, expert_top = p_expert.max(-1)  # (B, k) each
    dissents = (expert_top != draft) & (expert_top_p >= confidence.unsqueeze(1))
    states, potentials, spiked_at, counts, alphas = [], [], [], [], []
    current, count = state, spikes
    for i in range(k):
        current, potential, spiked = gate.step(current, divergence[:, i])
        count = count + (spiked & dissents[:, i]).float()
        states.append(current)
        potentials.append(potential)
        spiked_at.append(spiked)
        counts.append(count)
        alphas.append(escalated_alpha(alpha, count, *escalation))
    spiked = torch.stack(spiked_at, 1) & ~done.unsqueeze(1)  # (B, k)
    alpha_at = torch.stack(alphas, 1)  # (B, k)
    chosen = draft.clone()
    if bool(spiked.any()):
        where = spiked.nonzero(as_tuple=True)
        mixed = intervene(
            p_base[where], p_expert[where], alpha_at[where], config.intervention.top_k
        )
        chosen[where] = choose(mixed, window_u.to(draft.device)[where], config.decoding)
    intervened = spiked & (chosen != draft)
    # A row stops keeping tokens after its first intervention or its EOS.
    ends = intervened | torch.isin(chosen, eos)
    before_end = (ends.cumsum(1) - ends.long()) == 0
    accepted = before_end & ~done.unsqueeze(1)
    last = (accepted.long().sum(1) - 1).clamp_min(0)  # (B,) index of the last kept token
    stacked = {key: torch.stack([s[key] for s in states], 1) for key in state}
    new_state = {
        key: torch.where(done, state[key], value.gather(1, last.unsqueeze(1)).squeeze(1))
        for key, value in stacked.items()
    }
    kept_count = torch.stack(counts, 1).gather(1, last.unsqueeze(1)).squeeze(1)
    new_spikes = torch.where(done, spikes, kept_count)
    table = [
        t.tolist()
        for t in (
            accepted,
            draft,
            chosen,
            intervened & accepted,
            spiked & accepted,
            torch.stack(potentials, 1).float(),
            divergence.float(),
            alpha_at.float(),
            expert_top,
            spiked & dissents & accepted,
        )
    ]
    return new_state, new_spikes, table


def _at(u: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each row's uniform at its own token index: (B, N), (B,) -> (B,)."""
    return u.gather(1, index.clamp_max(u.shape[1] - 1).unsqueeze(-1)).squeeze(-1)


def _allowed(
    constraints: Sequence[TokenConstraint | None],
    results: Sequence[RowResult],
    drafts: Sequence[torch.Tensor],
    drafting: torch.Tensor,
    eos_ids: Sequence[int],
    vocab: int,
) -> torch.Tensor | None:
    """(B, V) bool mask of the tokens each row's constraint allows next, or None.

    A row whose constraint is complete may only end (EOS).
    """
    if all(c is None for c in constraints):
        return None
    device = drafting.device
    masks = torch.ones((len(constraints), vocab), dtype=torch.bool, device=device)
    drafted = torch.stack(drafts, 1).tolist() if drafts else [[] for _ in constraints]
    active = drafting.tolist()
    for row, constraint in enumerate(constraints):
        if constraint is None or not active[row]:
            continue
        prefix = [*results[row].token_ids, *drafted[row]]
        if constraint.is_complete(prefix):
            masks[row] = False
            masks[row, list(eos_ids)] = True
            continue
        allowed = constraint.allowed_tokens(prefix)
        if allowed is not None:
            masks[row] = allowed[:vocab].to(device)
    return masks
