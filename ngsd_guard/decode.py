"""The guarded decode loop: both models cached, rows batched, each row verified on its own
schedule.

Every iteration, for all active rows at once:

1. *Draft*: each row takes one token from the base's logits, as if the gate stayed quiet
   (constrained rows mask the logits with their matcher's ``allowed()`` and ``accept`` it).
2. *Verify* (when some row is due): the expert scores every row's oldest drafts in one
   forward, and the gate replays over them (:func:`ngsd_guard.replay.replay`). A row keeps its
   drafts up to the first one the gate replaces; the replaced token is kept, the later drafts
   are dropped from both caches (and rewound in the matcher).
3. *Step*: the base is fed each row's newest token, one forward for the batch.

A row is due when it holds ``window`` drafts (its own window: 1 at first, doubled after a
quiet verification up to ``config.window``, halved after an intervention), when it cannot
draft further (EOS, a complete constraint, the token budget), or when its oldest draft would
otherwise wait longer than ``config.max_stream_delay`` to be streamed, predicted from the
step and verification times measured so far in the call. At a verification every row
verifies its oldest drafts, up to as many as the most-loaded due row (the forward is paid
anyway), so one busy row never cuts the others' drafts.

The prompts are fed to both models at admission (in one forward for a LoRA expert), so the
first token needs no expert forward of its own. Whatever the schedule, the tokens are those
of step-by-step NGSD (``window=1``). Rows can join (:meth:`Decoder.add`) and be cancelled
(:meth:`Decoder.cancel`) between iterations; a finished row leaves the batch at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .alpha import Assessment
from .config import DecodingConfig, GuardConfig
from .constraints import ConstraintMatcher
from .detokenize import RowText
from .divergence import DIVERGENCES
from .experts import Expert, Runner
from .gate import GateState, make_gate
from .records import FinishReason, StepRecord
from .replay import WindowResult, replay
from .sampling import SamplingParams, choose, uniforms
from .sides import ModelSide, Prefill, prefill, split
from .stopping import StoppingRule

Assess = Callable[[Sequence[str], torch.Tensor], Sequence[Assessment]]
"""The alpha policy: (requests, (N, H) fp32 hidden state at each prompt's last token, or
(N, 0) when the policy does not need it) -> one Assessment (alpha, risk, potential) each."""


@dataclass(frozen=True)
class RowSpec:
    """One request as the loop decodes it (built by the facade)."""

    row: int  # the row's index in its stream
    base_ids: list[int]
    expert_ids: list[int]
    request: str  # the last user message, for the alpha policy
    decoding: DecodingConfig  # this row's budget, sampling, seed and stop strings
    alpha: float | None = None  # a fixed expert weight; None: the alpha policy decides
    matcher: ConstraintMatcher | None = None
    stopping: tuple[StoppingRule, ...] = ()


@dataclass
class RowResult:
    """What one row produced."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    risk: float | None
    seconds: float


@dataclass
class _Draft:
    """A token the base drafted and the expert has not verified yet."""

    token: int
    logits: torch.Tensor  # (V,) the base's logits it was chosen from (masked if constrained)
    allowed: torch.Tensor | None  # (V,) bool: the constraint's mask there
    accepted: bool  # the matcher took it (every draft but EOS on a constrained row)
    complete: bool  # the matcher was complete after it
    at: float  # when its logits were ready (perf_counter seconds)


@dataclass
class _Row:
    spec: RowSpec
    text: RowText
    u: torch.Tensor  # (max_new_tokens,) this row's uniforms, by token index
    alpha: float
    risk: float | None
    started: float
    next_logits: torch.Tensor  # (V,) the base's logits for the row's next draft
    logits_at: float
    expert_logits: torch.Tensor | None  # (V,) the expert's, for the first draft (prefill)
    window: int = 1
    tokens: list[int] = field(default_factory=list)
    pending: list[_Draft] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def newest(self) -> int:
        """The last token of the row's sequence (kept or drafted): fed to the base next."""
        return self.pending[-1].token if self.pending else self.tokens[-1]

    def blocked(self, eos: set[int]) -> bool:
        """True when the row may not draft further before a verification."""
        if not self.pending:
            return False
        last = self.pending[-1]
        budget = self.spec.decoding.max_new_tokens
        return last.token in eos or last.complete or len(self.tokens) + len(self.pending) >= budget


class _Timing:
    """Moving averages of the seconds a base step and an expert verification take."""

    def __init__(self) -> None:
        self.step: float | None = None
        self.verify: float | None = None

    def observe(self, name: str, seconds: float) -> None:
        previous = getattr(self, name)
        setattr(self, name, seconds if previous is None else 0.7 * previous + 0.3 * seconds)

    def wait_added(self) -> float:
        """How much longer a draft waits if its verification is put off by one step."""
        step = self.step or 0.0
        return step + (self.verify if self.verify is not None else 2.0 * step)


class Decoder:
    """One call's decode. Iterate :meth:`records`; add and cancel rows from any thread."""

    def __init__(
        self,
        *,
        base: Runner,
        expert: Expert | None,
        config: GuardConfig,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: Sequence[int],
        assess: Assess,
        policy_needs_hidden: bool,
    ) -> None:
        self.base, self.expert, self.config = base, expert, config
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.eos = set(self.eos_ids)
        self.assess, self.policy_needs_hidden = assess, policy_needs_hidden
        self.gate = make_gate(config.gate)
        self.divergence = DIVERGENCES[config.divergence]
        self.max_window = config.window if expert is not None else 1
        self.results: dict[int, RowResult] = {}
        self._timing = _Timing()
        self._lock = threading.Lock()
        self._queued: list[RowSpec] = []
        self._cancelled: set[int] = set()
        self._cancel_all = False
        self._closed = False
        self._rows: list[_Row] = []
        self._base_side: ModelSide | None = None
        self._expert_side: ModelSide | None = None
        self._state: GateState = {}
        self._alpha = torch.zeros(0)
        self._sampling = SamplingParams.of([])

    # ------------------------------------------------------------------ inbox (any thread)
    def add(self, specs: Sequence[RowSpec]) -> None:
        """Queue rows; they join the batch at the start of the next iteration."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this decode has finished; start a new stream")
            self._queued.extend(specs)

    def cancel(self, row: int | None = None) -> None:
        """End ``row`` (every row when None) with finish reason "cancelled"."""
        with self._lock:
            if row is None:
                self._cancel_all = True
            else:
                self._cancelled.add(row)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def records(self) -> Generator[StepRecord, None, dict[int, RowResult]]:
        """Yield one StepRecord per kept token, row by row as rows are verified; return each
        row's result by row index."""
        while True:
            with self._lock:
                specs, self._queued = self._queued, []
                every, cancelled = self._cancel_all, set(self._cancelled)
                if not specs and not self._rows:
                    self._closed = True
                    break
            self._cancel_rows(specs, cancelled, every)
            specs = [s for s in specs if not every and s.row not in cancelled]
            if specs:
                self._admit(specs)
            self._leave()
            if not self._rows:
                continue
            self._draft()
            if self._expert_side is None:
                yield from self._keep_drafts()
            else:
                yield from self._verify()
            self._leave()
            if self._rows:
                self._step()
        return self.results

    def _cancel_rows(self, specs: Sequence[RowSpec], cancelled: set[int], every: bool) -> None:
        now = time.perf_counter()
        for spec in specs:
            if every or spec.row in cancelled:
                self.results[spec.row] = RowResult([], "", "cancelled", None, 0.0)
        for row in self._rows:
            if row.finish_reason is None and (every or row.spec.row in cancelled):
                self._finish(row, "cancelled", now)

    def _admit(self, specs: Sequence[RowSpec]) -> None:
        """Prefill the new rows on both models, read their alpha, and append them."""
        admitted = time.perf_counter()
        count = len(specs)
        pad_id = self.eos_ids[0]
        base_prompts = [s.base_ids for s in specs]
        hidden = self.policy_needs_hidden and any(s.alpha is None for s in specs)
        expert_pre: Prefill | None = None
        joint = self.expert.joint_adapter if self.expert is not None else None
        if self.expert is not None and joint and all(s.base_ids == s.expert_ids for s in specs):
            both = prefill(
                self.expert.runner,
                [*base_prompts, *base_prompts],
                pad_id,
                hidden=hidden,
                adapter_names=["__base__"] * count + [joint] * count,
            )
            base_pre, expert_pre = split(both, count, (self.base, self.expert.runner))
        else:
            base_pre = prefill(self.base, base_prompts, pad_id, hidden=hidden)
            if self.expert is not None:
                expert_prompts = [s.expert_ids for s in specs]
                expert_pre = prefill(self.expert.runner, expert_prompts, pad_id)
        assessments = self._assessments(specs, base_pre.hidden)
        ready = time.perf_counter()
        device = self.base.out_device
        potential = torch.tensor([a.potential for a in assessments], dtype=torch.float32)
        state = self.gate.initial_state(count, device, potential.to(device))
        rows = [
            _Row(
                spec=spec,
                text=RowText(self.tokenizer, spec.decoding.stop),
                u=_row_uniforms(spec.decoding),
                alpha=assessment.alpha,
                risk=assessment.risk,
                started=admitted,
                next_logits=base_pre.logits[i],
                logits_at=ready,
                expert_logits=expert_pre.logits[i] if expert_pre is not None else None,
            )
            for i, (spec, assessment) in enumerate(zip(specs, assessments, strict=True))
        ]
        alpha = torch.tensor([a.alpha for a in assessments], dtype=torch.float32)
        sampling = SamplingParams.of([s.decoding for s in specs])
        if self._base_side is None:
            self._base_side = base_pre.side
            self._expert_side = expert_pre.side if expert_pre is not None else None
            self._state, self._alpha, self._sampling = state, alpha, sampling
        else:
            self._base_side.extend(base_pre.side)
            if self._expert_side is not None and expert_pre is not None:
                self._expert_side.extend(expert_pre.side)
            self._state = {k: torch.cat([self._state[k], state[k]]) for k in self._state}
            self._alpha = torch.cat([self._alpha, alpha])
            self._sampling = self._sampling.cat(sampling)
        self._rows.extend(rows)

    def _assessments(
        self, specs: Sequence[RowSpec], hidden: torch.Tensor | None
    ) -> list[Assessment]:
        """Each row's alpha: its fixed one, or the policy's reading of its request."""
        read = [i for i, s in enumerate(specs) if s.alpha is None]
        by_policy: list[Assessment] = []
        if read:
            states = hidden[read] if hidden is not None else torch.zeros(len(read), 0)
            by_policy = list(self.assess([specs[i].request for i in read], states))
        policy = iter(by_policy)
        return [Assessment(alpha=s.alpha) if s.alpha is not None else next(policy) for s in specs]

    def _leave(self) -> None:
        """Drop finished rows from the batch (caches, gate state, settings)."""
        keep = [i for i, row in enumerate(self._rows) if row.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._base_side = self._expert_side = None
            return
        assert self._base_side is not None
        self._base_side.select(index)
        if self._expert_side is not None:
            self._expert_side.select(index)
        device_index = index.to(self.base.out_device)
        self._state = {k: v[device_index] for k, v in self._state.items()}
        self._alpha = self._alpha[index]
        self._sampling = self._sampling.rows(index)

    # ------------------------------------------------------------------ 1. draft
    def _draft(self) -> None:
        """Each row that may draft takes one token from the base's logits."""
        drafting = [i for i, row in enumerate(self._rows) if not row.blocked(self.eos)]
        if not drafting:
            return
        rows = [self._rows[i] for i in drafting]
        logits = torch.stack([row.next_logits for row in rows])  # (N, V)
        masks = [self._allowed(row, logits.shape[-1]) for row in rows]
        for i, mask in enumerate(masks):
            if mask is not None:
                logits[i] = logits[i].masked_fill(~mask.to(logits.device), float("-inf"))
        sampling = self._sampling.rows(drafting)
        if bool(sampling.greedy.all()):
            tokens = logits.argmax(-1)
        else:
            index = torch.tensor([len(r.tokens) + len(r.pending) for r in rows])
            u = torch.stack(
                [r.u[min(int(t), len(r.u) - 1)] for r, t in zip(rows, index, strict=True)]
            )
            tokens = choose(torch.softmax(logits, -1), u, sampling)
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            matcher = row.spec.matcher
            accepted = complete = False
            if matcher is not None:
                if token not in self.eos:
                    matcher.accept(token)
                    accepted = True
                complete = matcher.is_complete()
            row.pending.append(
                _Draft(token, logits[i], masks[i], accepted, complete, row.logits_at)
            )

    def _allowed(self, row: _Row, vocab: int) -> torch.Tensor | None:
        """(V,) bool: the tokens the row's matcher allows next (only EOS once complete)."""
        matcher = row.spec.matcher
        if matcher is None:
            return None
        mask = torch.zeros(vocab, dtype=torch.bool)
        if matcher.is_complete():
            mask[self.eos_ids] = True
            return mask
        allowed = matcher.allowed()
        if allowed is None:
            return None
        width = min(vocab, allowed.shape[0])
        mask[:width] = allowed[:width]
        return mask

    # ------------------------------------------------------------------ 2. verify
    def _keep_drafts(self) -> Generator[StepRecord, None, None]:
        """The base alone: every draft is kept as it is, and the gate never runs."""
        potential = self.gate.potential(self._state).float().cpu().tolist()
        for r, row in enumerate(self._rows):
            draft = row.pending.pop()
            delta, reason = self._keep(row, draft.token, draft.complete)
            yield StepRecord(
                row=row.spec.row,
                step=len(row.tokens) - 1,
                token_id=draft.token,
                text=delta,
                divergence=0.0,
                potential=potential[r],
                spiked=False,
                alpha=row.alpha,
                base_token_id=draft.token,
                chosen_token_id=draft.token,
                intervened=False,
                finish_reason=reason,
            )

    def _due_rows(self) -> list[int]:
        now = time.perf_counter()
        delay = self.config.max_stream_delay
        wait_added = self._timing.wait_added()
        due = []
        for i, row in enumerate(self._rows):
            late = delay is not None and now - row.pending[0].at + wait_added > delay
            if len(row.pending) >= row.window or row.blocked(self.eos) or late:
                due.append(i)
        return due

    def _verify(self) -> Generator[StepRecord, None, None]:
        due = self._due_rows()
        if not due:
            return
        assert self._expert_side is not None
        rows = self._rows
        width = max(len(rows[i].pending) for i in due)
        counts = [min(len(row.pending), width) for row in rows]  # m_r: drafts verified
        # The expert is fed each row's last kept token (unless its prefill already scored the
        # first draft) and all but the last verified draft: logits for every verified draft.
        chunks = [
            ([] if row.expert_logits is not None else [row.tokens[-1]])
            + [d.token for d in row.pending[: m - 1]]
            for row, m in zip(rows, counts, strict=True)
        ]
        fed = max(len(c) for c in chunks)
        started = time.perf_counter()
        vocab = rows[0].next_logits.shape[-1]
        device = self.base.out_device
        out = torch.zeros((len(rows), fed, vocab), device=device)
        if fed:
            tokens = torch.full((len(rows), fed), self.eos_ids[0], dtype=torch.long)
            for r, chunk in enumerate(chunks):
                tokens[r, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            lengths = torch.tensor([len(c) for c in chunks])
            out = self._expert_side.feed(tokens, lengths)
            self._timing.observe("verify", time.perf_counter() - started)
        result = self._replay(rows, counts, out)
        yield from self._settle(rows, counts, result)
        for side in (self._base_side, self._expert_side):
            if side is not None:
                side.reclaim()

    def _replay(self, rows: list[_Row], counts: list[int], out: torch.Tensor) -> WindowResult:
        """Both models' distributions at each verified draft, and the gate over them."""
        width = max(counts)
        device = out.device
        vocab = out.shape[-1]
        base_logits = torch.zeros((len(rows), width, vocab), device=device)
        expert_logits = torch.zeros((len(rows), width, vocab), device=device)
        draft = torch.full((len(rows), width), self.eos_ids[0], dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        masks = (
            torch.ones((len(rows), width, vocab), dtype=torch.bool)
            if any(d.allowed is not None for row in rows for d in row.pending)
            else None
        )
        for r, (row, m) in enumerate(zip(rows, counts, strict=True)):
            drafts = row.pending[:m]
            base_logits[r, :m] = torch.stack([d.logits for d in drafts])
            draft[r, :m] = torch.tensor([d.token for d in drafts])
            valid[r, :m] = True
            if row.expert_logits is not None:
                expert_logits[r, 0] = row.expert_logits
                expert_logits[r, 1:m] = out[r, : m - 1]
            else:
                expert_logits[r, :m] = out[r, :m]
            if masks is not None:
                for j, d in enumerate(drafts):
                    if d.allowed is not None:
                        masks[r, j] = d.allowed
        if masks is not None:
            masks = masks.to(device)
            expert_logits = expert_logits.masked_fill(~masks, float("-inf"))
        index = torch.tensor([[len(row.tokens) + j for j in range(width)] for row in rows])
        u = torch.stack(
            [row.u.gather(0, index[r].clamp_max(len(row.u) - 1)) for r, row in enumerate(rows)]
        )
        return replay(
            p_base=torch.softmax(base_logits, -1),
            p_expert=torch.softmax(expert_logits, -1),
            draft=draft,
            valid=valid,
            state=self._state,
            gate=self.gate,
            divergence=self.divergence,
            alpha=self._alpha.to(device),
            u=u,
            sampling=self._sampling,
            top_k=self.config.intervention.top_k,
            eos=torch.tensor(self.eos_ids),
        )

    def _settle(
        self, rows: list[_Row], counts: list[int], result: WindowResult
    ) -> Generator[StepRecord, None, None]:
        """Keep each row's surviving tokens, cut the rest of a replaced draft, adapt windows."""
        assert self._base_side is not None and self._expert_side is not None
        self._state = result.state
        kept = result.kept_count.tolist()
        table = _Table.of(result)
        for r, (row, m) in enumerate(zip(rows, counts, strict=True)):
            pending, row.expert_logits = row.pending, None
            cut = table.intervened[r][kept[r] - 1]
            for j in range(kept[r]):
                token = table.chosen[r][j]
                complete = pending[j].complete
                if j == kept[r] - 1 and cut:
                    complete = self._rewind(row, pending, j, token)
                    # The replaced draft and everything after it leave both caches.
                    self._base_side.forget(r, len(pending) - 1 - j)
                    self._expert_side.forget(r, m - 1 - j)
                delta, reason = self._keep(row, token, complete)
                yield table.record(r, j, row, delta, reason)
                if reason is not None:
                    break
            row.pending = [] if cut else pending[m:]
            row.window = max(1, row.window // 2) if cut else min(self.max_window, row.window * 2)

    def _rewind(self, row: _Row, pending: list[_Draft], position: int, token: int) -> bool:
        """The matcher forgets the drafts from ``position`` on and takes ``token`` there;
        whether it is complete after it."""
        matcher = row.spec.matcher
        if matcher is None:
            return False
        matcher.rollback(sum(d.accepted for d in pending[position:]))
        if token not in self.eos:
            matcher.accept(token)
        return matcher.is_complete()

    # ------------------------------------------------------------------ keeping a token
    def _keep(self, row: _Row, token: int, complete: bool) -> tuple[str, FinishReason | None]:
        """Append a verified token to its row: the text it releases, and why the row ends
        there (None: it goes on)."""
        row.tokens.append(token)
        count = len(row.tokens)
        reason: FinishReason | None = None
        if token in self.eos or complete:
            reason = "stop"
        elif count >= row.spec.decoding.max_new_tokens:
            reason = "length"
        step = row.text.add(token, final=reason is not None)
        delta = step.delta
        if step.stopped:
            reason = "stop"
        elif reason is None:
            for rule in row.spec.stopping:
                keep = rule.end(delta, count)
                if keep is not None:
                    row.text.shorten_last(len(delta) - keep)
                    delta, reason = delta[:keep], "stop"
                    break
        if reason is not None:
            self._finish(row, reason, time.perf_counter())
        return delta, reason

    def _finish(self, row: _Row, reason: FinishReason, now: float) -> None:
        row.finish_reason = reason
        self.results[row.spec.row] = RowResult(
            token_ids=row.tokens,
            text=row.text.text,
            finish_reason=reason,
            risk=row.risk,
            seconds=now - row.started,
        )

    # ------------------------------------------------------------------ 3. step
    def _step(self) -> None:
        """Feed every row's newest token to the base: its logits for the next draft."""
        assert self._base_side is not None
        tokens = torch.tensor([[row.newest] for row in self._rows], dtype=torch.long)
        started = time.perf_counter()
        logits = self._base_side.feed(tokens)[:, -1]
        ready = time.perf_counter()
        self._timing.observe("step", ready - started)
        for r, row in enumerate(self._rows):
            row.next_logits, row.logits_at = logits[r], ready


@dataclass(frozen=True)
class _Table:
    """A WindowResult as Python lists (B, T), read once per verification."""

    draft: list[list[int]]
    chosen: list[list[int]]
    spiked: list[list[bool]]
    intervened: list[list[bool]]
    potential: list[list[float]]
    divergence: list[list[float]]

    @classmethod
    def of(cls, result: WindowResult) -> _Table:
        return cls(
            draft=result.draft.tolist(),
            chosen=result.chosen.tolist(),
            spiked=(result.spiked & result.kept).tolist(),
            intervened=(result.intervened & result.kept).tolist(),
            potential=result.potential.tolist(),
            divergence=result.divergence.tolist(),
        )

    def record(
        self, r: int, j: int, row: _Row, text: str, reason: FinishReason | None
    ) -> StepRecord:
        """The record of window position ``j`` of batch row ``r``, just kept by ``row``."""
        return StepRecord(
            row=row.spec.row,
            step=len(row.tokens) - 1,
            token_id=self.chosen[r][j],
            text=text,
            divergence=self.divergence[r][j],
            potential=self.potential[r][j],
            spiked=self.spiked[r][j],
            alpha=row.alpha,
            base_token_id=self.draft[r][j],
            chosen_token_id=self.chosen[r][j],
            intervened=self.intervened[r][j],
            finish_reason=reason,
        )


def _row_uniforms(decoding: DecodingConfig) -> torch.Tensor:
    """The row's uniforms by token index (unused zeros for a greedy row)."""
    if decoding.temperature == 0.0:
        return torch.zeros(1)
    return uniforms(1, decoding.max_new_tokens, decoding.seed)[0]
