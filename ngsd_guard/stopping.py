"""Rules that end a row early from its text, plugged into the decode loop per row.

A :class:`StoppingRule` is one row's state: the loop shows it every piece of text the row
emits, and the rule answers with where the output should end, if it should.
"""

from __future__ import annotations

from typing import Protocol

from .judge import REFUSAL_MARKERS

SENTENCE_ENDS = (".", "!", "?", "\n")


class StoppingRule(Protocol):
    """One row's early-stopping rule (a fresh object per row per call)."""

    def end(self, delta: str, tokens: int) -> int | None:
        """Shown each emitted ``delta`` and the row's token count after it: the number of
        characters of ``delta`` to keep if the output ends here, or None to go on."""
        ...


class RefusalStop:
    """End at the next sentence end once a refusal is established.

    A refusal is established at the first emitted piece, at or after ``after`` tokens, by
    which the text contains one of ``markers`` (the keyword judge's, by default); the output
    then ends after the first of ``.``, ``!``, ``?`` or a newline that follows. Each piece is
    checked against a bounded tail, so the cost per token does not grow with the text.
    """

    def __init__(self, after: int, markers: tuple[str, ...] = REFUSAL_MARKERS) -> None:
        self.after = after
        self.markers = markers
        self._tail = ""
        self._marked = False
        self._established = False
        self._keep = max(len(m) for m in markers) - 1

    def end(self, delta: str, tokens: int) -> int | None:
        if self._established:
            ends = [i for i in (delta.find(c) for c in SENTENCE_ENDS) if i >= 0]
            return min(ends) + 1 if ends else None
        window = self._tail + delta
        self._marked = self._marked or any(m in window for m in self.markers)
        self._tail = window[-self._keep :] if self._keep else ""
        self._established = self._marked and tokens >= self.after
        return None
