"""Constrained decoding (forced tool calls, structured output): one stateful matcher per row.

A :class:`TokenConstraint` is a factory; the decode loop asks it for a fresh
:class:`ConstraintMatcher` for every row of every call, and advances that matcher token by
token. With windowed verification the base drafts ahead of the expert, so a matcher also
rewinds: when the gate replaces the draft at window position ``i`` of ``k`` drafted tokens,
the loop calls ``rollback(<drafts accepted from i on>)`` and then ``accept(chosen)``.

The gate still runs on constrained rows: both distributions are restricted to the allowed
tokens (logits of the others set to ``-inf``) before the softmax, the divergence, the gate and
the intervention.

Rules the loop follows:

* ``allowed()`` is asked before each token of the row; ``None`` means any token.
* ``accept(token)`` is called with every token the row drafts or keeps, in order, except the
  end-of-sequence token (the loop never passes EOS to a matcher).
* Once ``is_complete()`` is true, the row may only produce EOS; the row ends there with
  ``finish_reason="stop"`` (the completing token is the row's last).
* A token budget (``max_new_tokens``) is the constraint's own business: it must close validly
  within it, or raise ``ConfigError`` before decoding.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ConstraintMatcher(Protocol):
    """One row's position in a constraint (a grammar), advanced token by token."""

    def allowed(self) -> torch.Tensor | None:
        """A ``(V,)`` bool mask on the CPU of the tokens allowed next, or None for any.

        ``V`` may differ from the model's logits: a shorter mask disallows the tokens past
        its end, a longer one is cut to the logits' length.
        """
        ...

    def accept(self, token_id: int) -> None:
        """Advance by one token (one that ``allowed()`` permitted; never EOS)."""
        ...

    def rollback(self, count: int) -> None:
        """Undo the last ``count`` accepted tokens (a cut draft); ``count`` may be 0."""
        ...

    def is_complete(self) -> bool:
        """True when the output so far is finished: the row ends ("stop")."""
        ...


@runtime_checkable
class TokenConstraint(Protocol):
    """Restricts which tokens may come next; one :class:`ConstraintMatcher` per row."""

    def matcher(self) -> ConstraintMatcher:
        """A fresh matcher at the start of the output (one per row per call)."""
        ...
