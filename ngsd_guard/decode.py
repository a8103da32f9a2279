"""The guarded decode loop: both models cached, rows batched, each row verified on its own
schedule, the expert's verification overlapping the base's drafting.

Every iteration, for all active rows at once:

1. *Draft*: each row takes one token from the base's logits, as if the gate stayed quiet
   (a constrained row masks the logits with its matcher's ``allowed()`` and ``accept``\\ s it).
2. *Verify* (when none is running and some row is due): the expert scores every row's oldest
   drafts in one forward, and the gate replays over them (:func:`ngsd_guard.replay.replay`).
   A small verification runs on a worker thread while the base goes on drafting, where the
   two forwards can run side by side (:func:`overlaps`: a GPU, or the expert on a device of
   its own); a large one (more than :data:`OVERLAP_MAX_TOKENS` tokens), or any one when both
   models share the CPU's cores, runs between two steps. Once it is done, a row keeps
   its drafts up to the first one the gate replaces; the replaced token is kept, and every
   later draft leaves both caches (and the matcher rewinds them).
3. *Step*: the base is fed each row's newest token, one forward for the batch.

A row is due when it holds ``window`` drafts (its own window, :meth:`Decoder._next_window`:
capped by ``config.window``, or by ``config.quiet_window`` while its alpha is 0; halved after
an intervention, doubled after a verification that kept every draft), when it cannot draft
further (EOS, a complete constraint, the token budget), or when waiting one more step would
keep it silent for longer than ``config.max_stream_delay``, predicted from the step and
verification times measured so far (:class:`Timing`, shared by a model's calls). A
verification covers every row's oldest drafts, up to as many as the most-loaded due row
holds: the forward is paid anyway, and one busy row never cuts another's drafts.

The prompts are fed to both models when a row is admitted (in one forward for a LoRA expert),
so the first token needs no expert forward of its own. Whatever the schedule, the tokens are
those of step-by-step NGSD (``window=1``). Rows join (:meth:`Decoder.add`) and can be
cancelled (:meth:`Decoder.cancel`) from any thread; they enter and leave the batch between
verifications.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .alpha import AlphaSchedule, Assessment
from .config import DecodingConfig, GuardConfig
from .detokenize import RowText
from .divergence import DIVERGENCES
from .experts import Expert, Runner
from .features import PromptFeatures
from .gate import GateState, make_gate
from .prefixes import Header, PrefixCache, expert_header_length, header_length
from .records import StepRecord
from .replay import WindowResult, replay
from .rows import Draft, Row, RowResult, RowSpec
from .sampling import SamplingParams, choose, uniforms
from .sides import ModelSide, Prefill, kv_dtype, prefill, prompt_features, split, upper
from .verify import Verification, WindowTable

Assess = Callable[[Sequence[str], torch.Tensor], Sequence[Assessment]]
"""The alpha policy: (requests, (N, F) fp32 prompt features read from the prefills
(:mod:`ngsd_guard.features`), or (N, 0) when the policy reads none) -> one Assessment
(alpha, risk, potential, escalation) each."""


FIRST_ACTIVE_WINDOW = 4
"""The first window of a row whose alpha is above 0: an intervention early in the answer (a
refusal's opening) then wastes few drafts."""

OVERLAP_MAX_TOKENS = 16
"""Where verifications overlap the base's steps (:func:`overlaps`), one feeding at most this
many tokens (all rows together) runs beside them; a larger one would compete with them for
the device, so it runs between two steps instead."""


def overlaps(base: Runner, expert: Expert | None) -> bool:
    """Whether a small verification may run beside the base's steps: not when both models run
    on the same CPU, where the two forwards compete for the same cores. On 2 cores a step
    beside a verification that cuts its drafts is thrown away, and even where none can cut
    (a row at alpha 0) the two side by side are slower than one after the other: the
    ``ngsd-guard bench`` prompts streamed at ``max_stream_delay`` 0.3 s took 2.1–2.2 times the
    base alone's time per token with quiet rows' verifications beside the steps, 1.55 with
    them between (both with the per-call step and verification estimates then in use)."""
    if expert is None:
        return False
    return base.handle.device.type != "cpu" or expert.runner.handle.device != base.handle.device


class LinearCost:
    """An online estimate of the seconds a forward takes over ``n`` rows or tokens: a line
    ``a + b·n`` fitted by exponentially weighted least squares (each observation's weight
    decays by 7/8 per later one, so the fit follows the machine), plus four times the moving
    mean deviation of the fit's errors (Jacobson and Karels' retransmission timeout, RFC 6298:
    ``d ← d + (|x − x̂| − d)/4`` from ``d = x₀/2``), so that a prediction is rarely too short.
    Until two sizes have been seen, ``b = 0``; ``b`` is never negative."""

    DECAY = 0.875

    def __init__(self) -> None:
        self._sums = [0.0] * 5  # Σw, Σw·n, Σw·n², Σw·x, Σw·n·x
        self._deviation: float | None = None

    def observe(self, n: int, seconds: float) -> None:
        if self._deviation is None:
            self._deviation = seconds / 2
        else:
            error = abs(seconds - self._line(n))
            self._deviation += 0.25 * (error - self._deviation)
        terms = (1.0, n, n * n, seconds, n * seconds)
        self._sums = [self.DECAY * s + t for s, t in zip(self._sums, terms, strict=True)]

    def estimate(self, n: int) -> float | None:
        """The predicted seconds at ``n`` (None before any observation)."""
        if self._deviation is None:
            return None
        return self._line(n) + 4.0 * self._deviation

    def _line(self, n: int) -> float:
        w, wn, wnn, wx, wnx = self._sums
        spread = w * wnn - wn * wn
        slope = max(0.0, (w * wnx - wn * wx) / spread) if spread > 1e-9 * w * wnn else 0.0
        return (wx - slope * wn) / w + slope * n


class Timing:
    """How long one more step (the base's forward and the loop's own work, by the batch's
    rows) and an expert verification (by the tokens it feeds) take, each a
    :class:`LinearCost`: a 64-token window costs several times a 4-token one. A model's
    calls share one (``GuardedLM`` holds it): the times belong to the hardware and the
    models, and a stream that started from a guess would verify early and often until the
    guess had decayed."""

    def __init__(self) -> None:
        self._step, self._verify = LinearCost(), LinearCost()
        self._lock = threading.Lock()

    def observe_step(self, rows: int, seconds: float) -> None:
        with self._lock:
            self._step.observe(rows, seconds)

    def observe_verification(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._verify.observe(tokens, seconds)

    def wait_added(self, *, rows: int, tokens: int, beside: bool) -> float:
        """How long after now the tokens of a verification put off by one step (then feeding
        ``tokens``) would reach the stream: that step and the verification, and, where it
        runs ``beside`` the base's steps, up to one more step before the loop sees it
        finished. An unmeasured verification counts as two steps."""
        with self._lock:
            step = self._step.estimate(rows) or 0.0
            verify = self._verify.estimate(tokens)
        verify = verify if verify is not None else 2.0 * step
        return (2.0 if beside else 1.0) * step + verify


@dataclass(frozen=True)
class _Running:
    """A verification on the worker thread."""

    job: Verification
    future: Future[tuple[WindowResult, float]]


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
        features: PromptFeatures | None,
        prefixes: PrefixCache | None = None,
        timing: Timing | None = None,
    ) -> None:
        self.base, self.expert, self.config = base, expert, config
        self.prefixes = prefixes
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.eos = set(self.eos_ids)
        self.assess, self.features = assess, features
        self.gate = make_gate(config.gate)
        self.divergence = DIVERGENCES[config.divergence]
        self.max_window = config.window if expert is not None else 1
        self.quiet_window = config.quiet_window if expert is not None else 1
        self.side_by_side = overlaps(base, expert)
        self.trunk = expert.trunk if expert is not None else None
        self.trunk_at = self.trunk.first_layer if self.trunk is not None else 0
        self.expert_kv = (
            kv_dtype(config.expert_cache_dtype, expert.runner.handle.dtype)
            if expert is not None
            else None
        )
        self.results: dict[int, RowResult] = {}
        self._timing = timing or Timing()
        self._lock = threading.Lock()
        self._queued: list[RowSpec] = []
        self._cancelled: set[int] = set()
        self._cancel_all = False
        self._closed = False
        self._rows: list[Row] = []
        self._running: _Running | None = None
        self._put_off_at: float | None = None  # when the last due check found none due
        self._base_side: ModelSide | None = None
        self._expert_side: ModelSide | None = None
        self._state: GateState = {}
        self._schedule = AlphaSchedule.of([])
        self._dissents = torch.zeros(0)  # (B,) fp32 on the gate's device
        self._sampling = SamplingParams.of([])

    # ------------------------------------------------------------------ inbox (any thread)
    def add(self, specs: Sequence[RowSpec]) -> None:
        """Queue rows; they join the batch between verifications."""
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
        # only where the two forwards can run side by side (:func:`overlaps`)
        worker = ThreadPoolExecutor(1, "ngsd-verify") if self.side_by_side else None
        try:
            while True:
                with self._lock:
                    idle = self._running is None
                    specs, self._queued = (self._queued, []) if idle else ([], self._queued)
                    every, cancelled = self._cancel_all, set(self._cancelled)
                    if idle and not specs and not self._rows:
                        self._closed = True
                        break
                self._cancel(specs, cancelled, every)
                specs = [s for s in specs if not every and s.row not in cancelled]
                running = self._running
                if running is not None and (running.future.done() or self._stalled()):
                    result, seconds = running.future.result()
                    self._running, self._put_off_at = None, None
                    self._timing.observe_verification(running.job.fed_tokens, seconds)
                    yield from self._settle(running.job, result)
                if self._running is None:
                    self._leave()
                    if specs:
                        self._admit(specs)
                self._draft()
                if self.expert is None:
                    yield from self._keep_drafts()
                elif self._running is None:
                    job = self._next_verification()
                    small = job is not None and 0 < job.fed_tokens <= OVERLAP_MAX_TOKENS
                    if job is not None and worker is not None and small:  # beside the steps
                        self._running = _Running(job, worker.submit(self._verify, job))
                    elif job is not None:  # free (scored by the prefill), too large, or on
                        result, seconds = self._verify(job)  # a CPU both models share
                        if job.fed_tokens:
                            self._timing.observe_verification(job.fed_tokens, seconds)
                        yield from self._settle(job, result)
                self._step()
        finally:
            if worker is not None:
                worker.shutdown(wait=True)
        return self.results

    def _stalled(self) -> bool:
        """True when no row can draft or be stepped before the running verification ends."""
        return all(row.finished or row.blocked(self.eos) for row in self._rows)

    def _cancel(self, specs: Sequence[RowSpec], cancelled: set[int], every: bool) -> None:
        now = time.perf_counter()
        for spec in specs:
            if every or spec.row in cancelled:
                self.results[spec.row] = RowResult([], "", "cancelled", None, 0.0)
        for row in self._rows:
            if not row.finished and (every or row.spec.row in cancelled):
                row.finish("cancelled", now)
                self.results[row.spec.row] = row.result

    def _admit(self, specs: Sequence[RowSpec]) -> None:
        """Prefill the new rows on both models, read their alpha, and append them."""
        self._put_off_at = None
        admitted = time.perf_counter()
        count = len(specs)
        pad_id = self.eos_ids[0]
        base_prompts = [s.base_ids for s in specs]
        features = self.features if any(s.alpha is None for s in specs) else None
        spans = [s.span or (0, len(s.base_ids)) for s in specs]
        base_headers, expert_headers = self._headers(specs)
        expert_pre: Prefill | None = None
        joint = self.expert.joint_adapter if self.expert is not None else None
        if self.expert is not None and joint and all(s.base_ids == s.expert_ids for s in specs):
            both = prefill(
                self.expert.runner,
                [*base_prompts, *base_prompts],
                pad_id,
                headers=[*base_headers, *expert_headers],
                features=features,
                spans=[*spans, *spans],
                adapter_names=["__base__"] * count + [joint] * count,
                hidden_at=self.trunk_at,
            )
            expert_runner = self.trunk if self.trunk is not None else self.expert.runner
            base_pre, expert_pre = split(both, count, (self.base, expert_runner), self.expert_kv)
        else:
            base_pre = prefill(
                self.base,
                base_prompts,
                pad_id,
                headers=base_headers,
                features=features,
                spans=spans,
                hidden_at=self.trunk_at,
            )
            if self.expert is not None:
                expert_prompts = [s.expert_ids for s in specs]
                expert_pre = prefill(
                    self.expert.runner,
                    expert_prompts,
                    pad_id,
                    headers=expert_headers,
                    kv_dtype=self.expert_kv,
                )
                if self.trunk is not None:
                    expert_pre = upper(expert_pre, self.trunk)
        read = prompt_features(features, base_pre, expert_pre) if features is not None else None
        assessments = self._assessments(specs, read)
        device = self.base.out_device
        potential = torch.tensor([a.potential for a in assessments], dtype=torch.float32)
        state = self.gate.initial_state(count, device, potential.to(device))
        self._rows.extend(
            Row(
                spec=spec,
                text=RowText(self.tokenizer, spec.decoding.stop),
                u=_row_uniforms(spec.decoding),
                alpha=assessment.alpha,
                risk=assessment.risk,
                started=admitted,
                next_logits=base_pre.logits[i],
                next_hidden=base_pre.hidden[i] if base_pre.hidden is not None else None,
                expert_logits=expert_pre.logits[i] if expert_pre is not None else None,
                window=self._first_window(assessment.alpha),
                quiet=assessment.alpha == 0.0,
                streamed_at=admitted,
            )
            for i, (spec, assessment) in enumerate(zip(specs, assessments, strict=True))
        )
        schedule = AlphaSchedule.of(assessments)
        dissents = torch.zeros(count, device=device)
        sampling = SamplingParams.of([s.decoding for s in specs])
        if self._base_side is None:
            self._base_side = base_pre.side
            self._expert_side = expert_pre.side if expert_pre is not None else None
            self._state, self._schedule, self._sampling = state, schedule, sampling
            self._dissents = dissents
            return
        self._base_side.extend(base_pre.side)
        if self._expert_side is not None and expert_pre is not None:
            self._expert_side.extend(expert_pre.side)
        self._state = {k: torch.cat([self._state[k], state[k]]) for k in self._state}
        self._schedule = self._schedule.cat(schedule)
        self._dissents = torch.cat([self._dissents, dissents])
        self._sampling = self._sampling.cat(sampling)

    def _headers(self, specs: Sequence[RowSpec]) -> tuple[list[Header | None], list[Header | None]]:
        """Each row's header on the base and on the expert (:mod:`ngsd_guard.prefixes`): the
        states of the tokens before its last user message, cached; None without a cache."""
        if self.prefixes is None:
            return [None] * len(specs), [None] * len(specs)
        base, expert = [], []
        for spec in specs:
            cut = header_length(spec.base_ids, spec.span)
            base.append(self.prefixes.header("base", self.base, spec.base_ids[:cut]))
            if self.expert is not None:
                at = expert_header_length(spec.base_ids, spec.expert_ids, cut)
                expert.append(
                    self.prefixes.header("expert", self.expert.runner, spec.expert_ids[:at])
                )
        return base, expert

    def _first_window(self, alpha: float) -> int:
        """A new row's window: its cap, or at most FIRST_ACTIVE_WINDOW when alpha is above 0."""
        if alpha == 0.0:
            return self.quiet_window
        return min(self.max_window, FIRST_ACTIVE_WINDOW)

    def _next_window(self, row: Row, cut: bool) -> int:
        """The row's window after a verification: halved after an intervention, else doubled,
        within its cap (``quiet_window`` while its alpha is 0, else ``window``)."""
        cap = self.quiet_window if row.quiet else self.max_window
        return min(cap, max(1, row.window // 2) if cut else row.window * 2)

    def _assessments(
        self, specs: Sequence[RowSpec], features: torch.Tensor | None
    ) -> list[Assessment]:
        """Each row's alpha: its fixed one, or the policy's reading of its request."""
        read = [i for i, s in enumerate(specs) if s.alpha is None]
        by_policy: list[Assessment] = []
        if read:
            pooled = features[read] if features is not None else torch.zeros(len(read), 0)
            by_policy = list(self.assess([specs[i].request for i in read], pooled))
        policy = iter(by_policy)
        return [Assessment(alpha=s.alpha) if s.alpha is not None else next(policy) for s in specs]

    def _leave(self) -> None:
        """Drop finished rows from the batch (caches, gate state, settings)."""
        keep = [i for i, row in enumerate(self._rows) if not row.finished]
        if len(keep) == len(self._rows):
            return
        for row in self._rows:
            if row.result is not None:
                self.results[row.spec.row] = row.result
        index = torch.tensor(keep, dtype=torch.long)
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._base_side = self._expert_side = None
            return
        assert self._base_side is not None
        self._base_side.select(index)
        if self._expert_side is not None:
            self._expert_side.select(index)
        self._state = {k: v[index.to(v.device)] for k, v in self._state.items()}
        self._schedule = self._schedule.rows(index)
        self._dissents = self._dissents[index.to(self._dissents.device)]
        self._sampling = self._sampling.rows(index)

    # ------------------------------------------------------------------ 1. draft
    def _draft(self) -> None:
        """Each row that may draft takes one token from the base's logits."""
        drafting = [
            i
            for i, row in enumerate(self._rows)
            if row.fresh and not row.finished and not row.blocked(self.eos)
        ]
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
            index = [min(len(r.tokens) + len(r.pending), len(r.u) - 1) for r in rows]
            u = torch.stack([r.u[i] for r, i in zip(rows, index, strict=True)])
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
                Draft(token, logits[i], masks[i], accepted, complete, row.next_hidden)
            )
            row.fresh = False

    def _allowed(self, row: Row, vocab: int) -> torch.Tensor | None:
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
        now = time.perf_counter()
        for r, row in enumerate(self._rows):
            if row.finished or not row.pending:
                continue
            draft = row.pending.pop()
            delta, reason = row.keep(draft.token, complete=draft.complete, eos=self.eos, now=now)
            if row.result is not None:  # readable by the time its last record arrives
                self.results[row.spec.row] = row.result
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

    def _next_verification(self) -> Verification | None:
        """The drafts to verify now, or None when no row is due. The time from a check that
        found none due to the next check is what putting a verification off costs (a step,
        a draft and the loop's own work): it is the step :class:`Timing` estimates."""
        now = time.perf_counter()
        if self._put_off_at is not None:
            self._timing.observe_step(len(self._rows), now - self._put_off_at)
        self._put_off_at = None
        delay = self.config.max_stream_delay
        drafting = [row for row in self._rows if not row.finished and row.pending]
        wait_added = (
            self._timing.wait_added(
                rows=len(self._rows),
                tokens=sum(len(row.pending) + 1 for row in drafting),
                beside=self.side_by_side,
            )
            if delay is not None
            else 0.0
        )
        width = 0
        for row in drafting:
            # Put off, the row's next tokens would reach the stream after this much silence.
            late = delay is not None and now - row.streamed_at + wait_added > delay
            free = row.expert_logits is not None and len(row.pending) == 1  # scored by prefill
            if len(row.pending) >= row.window or row.blocked(self.eos) or late or free:
                width = max(width, len(row.pending))
        if not width:
            self._put_off_at = now
            return None
        return Verification.of(self._rows, width, self.eos_ids[0], self.trunk is not None)

    def _verify(self, job: Verification) -> tuple[WindowResult, float]:
        """The expert's forward over the job's drafts and the gate's replay (any thread):
        the result and the seconds it took."""
        assert self._expert_side is not None
        started = time.perf_counter()
        out = self._expert_side.feed_outputs(job.inputs, job.lengths) if job.fed else None
        result = replay(
            base=job.base,
            expert=job.expert_logits(out),
            draft=job.draft,
            valid=job.valid,
            state=self._state,
            gate=self.gate,
            divergence=self.divergence,
            schedule=self._schedule.to(self._dissents.device),
            dissents=self._dissents,
            u=job.u,
            sampling=self._sampling,
            top_k=self.config.intervention.top_k,
            eos=torch.tensor(self.eos_ids),
        )
        return result, time.perf_counter() - started

    def _settle(self, job: Verification, result: WindowResult) -> Generator[StepRecord, None, None]:
        """Keep each row's surviving tokens, cut the rest of a replaced draft, adapt windows."""
        assert self._base_side is not None and self._expert_side is not None
        self._state, self._dissents = result.state, result.dissents
        table = WindowTable.of(result)
        now = time.perf_counter()
        for r, (row, m) in enumerate(zip(job.rows, job.counts, strict=True)):
            if row.finished or m == 0:
                continue
            pending, row.expert_logits = row.pending, None
            cut = table.cut(r)
            for j in range(table.kept[r]):
                token = table.chosen[r][j]
                complete = pending[j].complete
                if cut and j == table.kept[r] - 1:
                    complete = self._rewind(row, pending, j, token)
                    # The replaced draft and everything after it leave both caches.
                    self._base_side.forget(r, len(pending) - j - (0 if row.fresh else 1))
                    self._expert_side.forget(r, m - 1 - j)
                    row.fresh = False
                delta, reason = row.keep(token, complete=complete, eos=self.eos, now=now)
                if row.result is not None:
                    self.results[row.spec.row] = row.result
                yield table.record(r, j, row, delta, reason)
                if reason is not None:
                    break
            row.pending = [] if cut else pending[m:]
            if table.kept[r]:  # escalated: the row's cap drops to ``window``
                row.quiet = table.alpha[r][table.kept[r] - 1] == 0.0
            row.window = self._next_window(row, cut)
            row.streamed_at = now
        self._base_side.reclaim()
        self._expert_side.reclaim()

    def _rewind(self, row: Row, pending: list[Draft], position: int, token: int) -> bool:
        """The matcher forgets the drafts from ``position`` on and takes ``token`` there;
        whether it is complete after it."""
        matcher = row.spec.matcher
        if matcher is None:
            return False
        matcher.rollback(sum(d.accepted for d in pending[position:]))
        if token not in self.eos:
            matcher.accept(token)
        return matcher.is_complete()

    # ------------------------------------------------------------------ 3. step
    def _step(self) -> None:
        """Feed each row's newest token to the base (one forward): its next draft's logits."""
        feeding = [
            not row.fresh and not row.finished and not row.blocked(self.eos) for row in self._rows
        ]
        if not any(feeding):
            return
        assert self._base_side is not None
        newest = [
            row.newest if feed else self.eos_ids[0]
            for row, feed in zip(self._rows, feeding, strict=True)
        ]
        tokens = torch.tensor(newest, dtype=torch.long).unsqueeze(-1)
        fed = self._base_side.feed(
            tokens, torch.tensor(feeding, dtype=torch.long), hidden_at=self.trunk_at
        )
        logits = fed.logits[:, -1]
        hidden = fed.hidden[:, -1] if fed.hidden is not None else None
        for r, row in enumerate(self._rows):
            if feeding[r]:
                row.next_logits, row.fresh = logits[r], True
                row.next_hidden = hidden[r] if hidden is not None else None


def _row_uniforms(decoding: DecodingConfig) -> torch.Tensor:
    """The row's uniforms by token index (unused zeros for a greedy row)."""
    if decoding.temperature == 0.0:
        return torch.zeros(1)
    return uniforms(1, decoding.max_new_tokens, decoding.seed)[0]
