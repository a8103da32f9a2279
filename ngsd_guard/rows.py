"""One row of a batched decode: what it asks for, what it holds, and when it ends.

A row ends ("stop") on an end-of-sequence token, when its constraint is complete, when a stop
string appears in its text, or when one of its stopping rules ends it; "length" when it
reaches its token budget; "cancelled" when its caller cancels it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import DecodingConfig
from .constraints import ConstraintMatcher
from .detokenize import RowText
from .records import FinishReason
from .stopping import StoppingRule


@dataclass(frozen=True)
class RowSpec:
    """One request as the loop decodes it (built by the facade)."""

    row: int  # the row's index in its stream
    base_ids: list[int]
    expert_ids: list[int]
    request: str  # the last user message, for the alpha policy
    span: tuple[int, int] | None  # [start, end) of the request in base_ids (None: not located)
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
    alpha: float | None = None  # the expert weight read before decoding (None: not admitted)


@dataclass
class Draft:
    """A token the base drafted that the expert has not verified yet."""

    token: int
    logits: torch.Tensor | None  # (V,) the base's logits it was chosen from (masked if
    # constrained); None once a verification has taken them
    allowed: torch.Tensor | None  # (V,) bool: the constraint's mask there
    accepted: bool  # the matcher took it (every draft but EOS on a constrained row)
    complete: bool  # the matcher was complete after it
    hidden: torch.Tensor | None = None  # (H,) the base's states entering the expert's trunk
    # (:class:`ngsd_guard.experts.Trunk`) at the token whose logits chose this draft

    def take_logits(self) -> torch.Tensor:
        """The draft's logits, released here: a draft is verified once, and its logits
        would otherwise stay in memory beside the verification's copy."""
        logits, self.logits = self.logits, None
        if logits is None:
            raise RuntimeError("this draft's logits were already taken by a verification")
        return logits


@dataclass
class Row:
    """A row's decoding state.

    The base has been fed every token of the row's sequence (kept tokens, then drafts) except
    the newest when ``fresh`` is False; ``next_logits`` are its logits after the newest when
    ``fresh`` is True. The expert has been fed every kept token but the last, unless
    ``expert_logits`` (from the prefill) already score the first draft.
    """

    spec: RowSpec
    text: RowText
    u: torch.Tensor  # (max_new_tokens,) this row's uniforms, by token index
    alpha: float
    risk: float | None
    started: float  # perf_counter seconds at admission
    next_logits: torch.Tensor  # (V,)
    expert_logits: torch.Tensor | None  # (V,)
    window: int  # drafts to hold before asking for a verification
    quiet: bool  # its expert weight is 0 (before any escalation): the quiet window caps it
    streamed_at: float  # when the row last released tokens (admission, before the first)
    fresh: bool = True
    next_hidden: torch.Tensor | None = None  # (H,) with next_logits, for a trunk expert
    tokens: list[int] = field(default_factory=list)
    pending: list[Draft] = field(default_factory=list)
    result: RowResult | None = None

    @property
    def newest(self) -> int:
        """The last token of the row's sequence (kept or drafted)."""
        return self.pending[-1].token if self.pending else self.tokens[-1]

    @property
    def finished(self) -> bool:
        return self.result is not None

    def blocked(self, eos: set[int]) -> bool:
        """True when the row may not draft further before a verification: its last draft is
        EOS, completes its constraint or uses up its token budget."""
        if not self.pending:
            return False
        last = self.pending[-1]
        budget = self.spec.decoding.max_new_tokens
        return last.token in eos or last.complete or len(self.tokens) + len(self.pending) >= budget

    def keep(
        self, token: int, *, complete: bool, eos: set[int], now: float
    ) -> tuple[str, FinishReason | None]:
        """Append a verified token: the text it releases, and why the row ends there (None: it
        goes on)."""
        self.tokens.append(token)
        count = len(self.tokens)
        reason: FinishReason | None = None
        if token in eos or complete:
            reason = "stop"
        elif count >= self.spec.decoding.max_new_tokens:
            reason = "length"
        step = self.text.add(token, final=reason is not None)
        delta = step.delta
        if step.stopped:
            reason = "stop"
        elif reason is None:
            for rule in self.spec.stopping:
                keep = rule.end(delta, count)
                if keep is not None:
                    self.text.shorten_last(len(delta) - keep)
                    delta, reason = delta[:keep], "stop"
                    break
        if reason is not None:
            self.finish(reason, now)
        return delta, reason

    def finish(self, reason: FinishReason, now: float) -> None:
        self.result = RowResult(
            token_ids=self.tokens,
            text=self.text.text,
            finish_reason=reason,
            risk=self.risk,
            seconds=now - self.started,
            alpha=self.alpha,
        )
