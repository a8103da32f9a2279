"""One verification of a batch: which drafts the expert scores, and reading its outcome.

A :class:`Verification` is a snapshot taken on the decode loop's thread: for each row ``r``
the oldest ``m_r`` drafts, the base's logits there, and the tokens to feed the expert (the
row's last kept token, unless the expert's prefill already scored the first draft, then all
but the last verified draft). The expert forward and the replay may then run on a worker
thread while the base keeps drafting; both models' logits over the window are formed a few
positions at a time (:class:`DraftLogits`, :class:`ExpertLogits`), never as (B, M, V)
tensors, and the drafts' logits are released as they are stacked; :class:`WindowTable`
turns the replay's result into records on the loop's thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .experts import Outputs
from .records import FinishReason, StepRecord
from .replay import WindowResult
from .rows import Row


@dataclass(frozen=True)
class DraftLogits:
    """The base's logits at each verified draft, (V,) per row and position (masked where a
    constraint applies), stacked a few positions at a time and released once stacked, so
    that a window's drafts and their stacked copy are not held twice."""

    logits: list[list[torch.Tensor | None]]  # [r][j] for j < m_r; None once taken

    def take(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, V) fp32 logits at the (n,) ``rows`` and ``positions``, each taken once."""
        pairs = list(zip(rows.tolist(), positions.tolist(), strict=True))
        taken = [self.logits[r][j] for r, j in pairs]
        if any(t is None for t in taken):
            raise RuntimeError("a draft's logits were already taken by this verification")
        stacked = torch.stack(taken)  # type: ignore[arg-type]
        for r, j in pairs:
            self.logits[r][j] = None
        return stacked


@dataclass(frozen=True)
class ExpertLogits:
    """The expert's logits at each verified draft, formed from its forward's outputs a few
    positions at a time: position ``j`` of row ``r`` is fed position ``j - 1`` when the prefill
    scored the row's first draft (``first[r]``, position 0 itself), else fed position ``j``;
    masked like the base's."""

    outputs: Outputs | None  # None: the prefill scored every verified draft
    first: list[torch.Tensor | None]  # (V,) the expert's prefill logits, per row
    allowed: list[list[torch.Tensor | None]] | None  # [r][j] (V,) bool; None: unconstrained

    def take(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, V) fp32 logits at the (n,) ``rows`` and ``positions``."""
        pairs = list(zip(rows.tolist(), positions.tolist(), strict=True))
        shift = [int(self.first[r] is not None) for r, _ in pairs]
        fed = [i for i, ((_, j), s) in enumerate(zip(pairs, shift, strict=True)) if j >= s]
        logits = None
        if fed:
            assert self.outputs is not None
            logits = self.outputs.logits(
                torch.tensor([pairs[i][0] for i in fed]),
                torch.tensor([pairs[i][1] - shift[i] for i in fed]),
            )
        if logits is not None and len(fed) == len(pairs):
            stacked = logits  # every pair was fed: the output layer's result, not a copy
        else:
            formed: list[torch.Tensor | None] = [self.first[r] for r, _ in pairs]
            for k, i in enumerate(fed):
                formed[i] = logits[k]  # type: ignore[index]
            stacked = torch.stack(formed)  # type: ignore[arg-type]
        if self.allowed is not None:
            for i, (r, j) in enumerate(pairs):
                mask = self.allowed[r][j]
                if mask is not None:
                    stacked[i].masked_fill_(~mask.to(stacked.device), float("-inf"))
        return stacked


@dataclass(frozen=True)
class Verification:
    """The drafts one expert forward verifies: (B, M) per row and position, M = max m_r."""

    rows: list[Row]  # the batch's rows, in batch order
    counts: list[int]  # m_r: how many of each row's oldest drafts are verified (may be 0)
    inputs: torch.Tensor  # (B, F) long tokens fed to the expert, row r its first lengths[r];
    # for a trunk expert, (B, F, H) the base's states at those tokens
    lengths: torch.Tensor  # (B,) long
    base: DraftLogits
    expert_first: list[torch.Tensor | None]  # (V,) the expert's prefill logits, per row
    allowed: list[list[torch.Tensor | None]] | None  # [r][j] the constraints' masks (None:
    # no row is constrained)
    draft: torch.Tensor  # (B, M) long
    valid: torch.Tensor  # (B, M) bool: False past m_r
    u: torch.Tensor  # (B, M) fp32: the uniforms of those token indices

    @classmethod
    def of(cls, rows: list[Row], width: int, pad_id: int, trunk: bool = False) -> Verification:
        """Verify up to ``width`` of each row's oldest drafts; with ``trunk``, feed the base's
        states at the tokens instead of the tokens (draft ``j`` holds those of the token fed
        before it: the row's last kept token for the first)."""
        counts = [min(len(row.pending), width) for row in rows]
        chunks = [
            []
            if m == 0
            else ([] if row.expert_logits is not None else [row.tokens[-1]])
            + [d.token for d in row.pending[: m - 1]]
            for row, m in zip(rows, counts, strict=True)
        ]
        fed = max(len(c) for c in chunks)
        if trunk and fed:
            inputs = _states(rows, counts, fed)
        else:
            inputs = torch.full((len(rows), fed), pad_id, dtype=torch.long)
            for r, chunk in enumerate(chunks):
                inputs[r, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        drafts = [row.pending[:m] for row, m in zip(rows, counts, strict=True)]
        draft = torch.full((len(rows), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        u = torch.zeros((len(rows), width))
        for r, (row, m) in enumerate(zip(rows, counts, strict=True)):
            if m == 0:
                continue
            draft[r, :m] = torch.tensor([d.token for d in drafts[r]])
            valid[r, :m] = True
            index = (len(row.tokens) + torch.arange(width)).clamp_max(len(row.u) - 1)
            u[r] = row.u[index]
        constrained = any(d.allowed is not None for row in drafts for d in row)
        return cls(
            rows=rows,
            counts=counts,
            inputs=inputs,
            lengths=torch.tensor([len(c) for c in chunks]),
            base=DraftLogits([[d.take_logits() for d in row] for row in drafts]),
            expert_first=[row.expert_logits for row in rows],
            allowed=[[d.allowed for d in row] for row in drafts] if constrained else None,
            draft=draft,
            valid=valid,
            u=u,
        )

    @property
    def fed(self) -> int:
        """The widest row's expert feed (0: the prefill scored every verified draft)."""
        return self.inputs.shape[1]

    @property
    def fed_tokens(self) -> int:
        """The tokens the expert is fed, all rows together."""
        return int(self.lengths.sum())

    def expert_logits(self, outputs: Outputs | None) -> ExpertLogits:
        """The expert's logits at each verified draft, from its forward's ``outputs`` over
        :attr:`tokens` (None when nothing was fed) and the prefill's scores of first drafts."""
        return ExpertLogits(outputs, self.expert_first, self.allowed)


def _states(rows: list[Row], counts: list[int], fed: int) -> torch.Tensor:
    """(B, F, H) the base's states at each row's fed tokens (zeros past them)."""
    chunks = [
        [d.hidden for d in row.pending[(row.expert_logits is not None) : m]] if m else []
        for row, m in zip(rows, counts, strict=True)
    ]
    known = next(h for chunk in chunks for h in chunk if h is not None)
    states = known.new_zeros((len(rows), fed, known.shape[-1]))
    for r, chunk in enumerate(chunks):
        if chunk:
            states[r, : len(chunk)] = torch.stack(chunk)  # type: ignore[arg-type]
    return states


@dataclass(frozen=True)
class WindowTable:
    """A WindowResult as Python lists (B, T), read once per verification."""

    draft: list[list[int]]
    chosen: list[list[int]]
    spiked: list[list[bool]]
    intervened: list[list[bool]]
    potential: list[list[float]]
    divergence: list[list[float]]
    alpha: list[list[float]]
    expert_token: list[list[int]]
    dissent: list[list[bool]]
    kept: list[int]

    @classmethod
    def of(cls, result: WindowResult) -> WindowTable:
        return cls(
            draft=result.draft.tolist(),
            chosen=result.chosen.tolist(),
            spiked=(result.spiked & result.kept).tolist(),
            intervened=(result.intervened & result.kept).tolist(),
            potential=result.potential.tolist(),
            divergence=result.divergence.tolist(),
            alpha=result.alpha.tolist(),
            expert_token=result.expert_token.tolist(),
            dissent=(result.dissent & result.kept).tolist(),
            kept=result.kept_count.tolist(),
        )

    def cut(self, r: int) -> bool:
        """True when row ``r``'s last kept token replaced its draft."""
        return self.kept[r] > 0 and self.intervened[r][self.kept[r] - 1]

    def record(
        self, r: int, j: int, row: Row, text: str, reason: FinishReason | None
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
            alpha=self.alpha[r][j],
            base_token_id=self.draft[r][j],
            chosen_token_id=self.chosen[r][j],
            expert_token_id=self.expert_token[r][j],
            dissent=self.dissent[r][j],
            intervened=self.intervened[r][j],
            finish_reason=reason,
        )
