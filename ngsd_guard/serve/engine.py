"""Per-row requests in one batch, over today's ``GuardedLM``.

Interim: ``GuardedLM.stream_requests`` (contract 2) replaces this module. Until then a batch
may only hold requests whose options are equal (:func:`joinable`), and cancelling a row hides
its records while the batch decodes on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..guarded import GenerateOptions, GuardedLM, Prompt
from ..records import Generation, StepRecord


@dataclass(frozen=True)
class GenerationRequest:
    """One row: a prompt and its own options."""

    prompt: Prompt
    options: GenerateOptions = field(default_factory=lambda: GenerateOptions())


def joinable(a: GenerationRequest, b: GenerationRequest) -> bool:
    """Whether two requests may share a batch."""
    return _key(a.options) == _key(b.options)


def _key(options: GenerateOptions) -> tuple[Any, ...]:
    return tuple(
        (name, id(value) if name == "constraint" else repr(value))
        for name, value in sorted(options.items())
    )


class BatchStream:
    """Records of all rows, in decode order; ``generations`` once exhausted."""

    def __init__(self, lm: GuardedLM, requests: Sequence[GenerationRequest]) -> None:
        options = requests[0].options
        self._run = lm._run([r.prompt for r in requests], **options)
        self._rows = len(requests)
        self._cancelled: set[int] = set()

    def __iter__(self) -> Iterator[StepRecord]:
        for record in self._run:
            if record.row not in self._cancelled:
                yield record

    def cancel(self, row: int) -> None:
        self._cancelled.add(row)
        if len(self._cancelled) == self._rows:
            self._run.cancel.set()

    def close(self) -> None:
        self._run.close()

    @property
    def generations(self) -> list[Generation]:
        return self._run.generations


def stream_requests(lm: GuardedLM, requests: Sequence[GenerationRequest]) -> BatchStream:
    return BatchStream(lm, requests)
