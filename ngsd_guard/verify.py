"""One verification of a batch: which drafts the expert scores, and reading its outcome.

A :class:`Verification` is a snapshot taken on the decode loop's thread: for each row ``r``
the oldest ``m_r`` drafts, the base's logits there, and the tokens to feed the expert (the
row's last kept token, unless the expert's prefill already scored the first draft, then all
but the last verified draft). The expert forward and the replay may then run on a worker
thread while the base keeps drafting; :class:`WindowTable` turns the replay's result into
records on the loop's thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .records import FinishReason, StepRecord
from .replay import WindowResult
from .rows import Row


@dataclass(frozen=True)
class Verification:
    """The drafts one expert forward verifies: (B, M) per row and position, M = max m_r."""

    rows: list[Row]  # the batch's rows, in batch order
    counts: list[int]  # m_r: how many of each row's oldest drafts are verified (may be 0)
    tokens: torch.Tensor  # (B, F) long: fed to the expert, row r its first lengths[r]
    lengths: torch.Tensor  # (B,) long
    base_logits: torch.Tensor  # (B, M, V) fp32, masked where a constraint applies
    expert_first: list[torch.Tensor | None]  # (V,) the expert's prefill logits, per row
    masks: torch.Tensor | None  # (B, M, V) bool: the constraints' masks (None: none)
    draft: torch.Tensor  # (B, M) long
    valid: torch.Tensor  # (B, M) bool: False past m_r
    u: torch.Tensor  # (B, M) fp32: the uniforms of those token indices

    @classmethod
    def of(cls, rows: list[Row], width: int, pad_id: int) -> Verification:
        """Verify up to ``width`` of each row's oldest drafts."""
        counts = [min(len(row.pending), width) for row in rows]
        chunks = [
            []
            if m == 0
            else ([] if row.expert_logits is not None else [row.tokens[-1]])
            + [d.token for d in row.pending[: m - 1]]
            for row, m in zip(rows, counts, strict=True)
        ]
        fed = max(len(c) for c in chunks)
        tokens = torch.full((len(rows), fed), pad_id, dtype=torch.long)
        for r, chunk in enumerate(chunks):
            tokens[r, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        first = rows[0].next_logits
        base_logits = first.new_zeros((len(rows), width, first.shape[-1]))
        draft = torch.full((len(rows), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        constrained = any(d.allowed is not None for row in rows for d in row.pending)
        masks = torch.ones(base_logits.shape, dtype=torch.bool) if constrained else None
        index = torch.zeros((len(rows), width), dtype=torch.long)
        u = torch.zeros((len(rows), width))
        for r, (row, m) in enumerate(zip(rows, counts, strict=True)):
            if m == 0:
                continue
            drafts = row.pending[:m]
            for j, d in enumerate(drafts):
                base_logits[r, j] = d.take_logits()
            draft[r, :m] = torch.tensor([d.token for d in drafts])
            valid[r, :m] = True
            index[r] = (len(row.tokens) + torch.arange(width)).clamp_max(len(row.u) - 1)
            u[r] = row.u[index[r]]
            if masks is not None:
                for j, d in enumerate(drafts):
                    if d.allowed is not None:
                        masks[r, j] = d.allowed
        return cls(
            rows=rows,
            counts=counts,
            tokens=tokens,
            lengths=torch.tensor([len(c) for c in chunks]),
            base_logits=base_logits,
            expert_first=[row.expert_logits for row in rows],
            masks=masks,
            draft=draft,
            valid=valid,
            u=u,
        )

    @property
    def verified_rows(self) -> list[Row]:
        """The rows with at least one draft in this verification."""
        return [row for row, m in zip(self.rows, self.counts, strict=True) if m]

    @property
    def fed(self) -> int:
        """The widest row's expert feed (0: the prefill scored every verified draft)."""
        return self.tokens.shape[1]

    @property
    def fed_tokens(self) -> int:
        """The tokens the expert is fed, all rows together."""
        return int(self.lengths.sum())

    def expert_logits(self, out: torch.Tensor) -> torch.Tensor:
        """(B, M, V) the expert's logits at each verified draft, from its forward's output
        (B, F, V) and the prefill's scores of first drafts; masked like the base's (positions
        past a row's count are arbitrary: the replay ignores them)."""
        width = self.base_logits.shape[1]
        if all(first is None for first in self.expert_first) and out.shape[1] >= width:
            logits = out[:, :width]  # no copy: the common case, every draft fed
            if self.masks is not None:
                logits = logits.masked_fill(~self.masks.to(logits.device), float("-inf"))
            return logits
        logits = torch.zeros_like(self.base_logits)
        for r, (m, first) in enumerate(zip(self.counts, self.expert_first, strict=True)):
            if m == 0:
                continue
            if first is not None:
                logits[r, 0] = first
                logits[r, 1:m] = out[r, : m - 1]
            else:
                logits[r, :m] = out[r, :m]
        if self.masks is not None:
            logits = logits.masked_fill(~self.masks.to(logits.device), float("-inf"))
        return logits


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
