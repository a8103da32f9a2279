"""The hook for constrained decoding (forced tool calls, structured output)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenConstraint(Protocol):
    """Restricts which tokens may come next.

    The gate still runs: both distributions are restricted to the allowed tokens and
    renormalised before the divergence, the gate and the intervention.
    """

    def allowed_tokens(self, generated: Sequence[int]) -> torch.Tensor | None:
        """A (V,) bool mask of the tokens allowed after ``generated``, or None for any."""
        ...

    def is_complete(self, generated: Sequence[int]) -> bool:
        """True when ``generated`` is a finished output: decoding ends there."""
        ...
