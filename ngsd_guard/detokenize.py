"""One row's output text, built token by token at a cost that does not grow with its length.

The text of each new token comes from ``tokenizers``' :class:`~tokenizers.decoders.DecodeStream`
(which decodes a short window of the latest tokens, holds back an incomplete UTF-8 character
and skips special tokens); stop strings are looked for in the not yet emitted tail only.

Text that could be the start of a stop string is held back until it is certain either way,
so a stop string never reaches the stream, even when it spans several tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers.decoders import DecodeStream
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TextStep:
    """What one token added: the text released now, and whether a stop string was hit."""

    delta: str
    stopped: bool


class RowText:
    """Incremental detokenisation of one row, with stop strings that may span tokens.

    ``tokenizer`` must have a ``tokenizers`` backend (a "fast" tokenizer).

    >>> text = RowText(tokenizer, stop=["\\n\\n"])                       # doctest: +SKIP
    >>> [text.add(t, final=False).delta for t in ids]                   # doctest: +SKIP
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._held = ""  # decoded but not emitted: a possible start of a stop string
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def add(self, token_id: int, *, final: bool) -> TextStep:
        """Add one token; ``final``: it is the row's last, so nothing is held back."""
        piece = self._stream.step(self._backend, token_id) or ""
        tail = self._held + piece
        cut = min((i for i in (tail.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            return TextStep(self._emit(tail[:cut], held=""), stopped=True)
        keep = 0 if final else self._partial_stop(tail)
        return TextStep(self._emit(tail[: len(tail) - keep], held=tail[len(tail) - keep :]), False)

    def shorten_last(self, count: int) -> None:
        """Take back the last ``count`` characters emitted (a stopping rule's end falls inside
        the last delta)."""
        if count > 0:
            self._pieces[-1] = self._pieces[-1][:-count]
            self._held = ""

    def _partial_stop(self, tail: str) -> int:
        """Length of the longest suffix of ``tail`` that is a proper prefix of a stop string."""
        for size in range(min(self._longest_stop - 1, len(tail)), 0, -1):
            suffix = tail[-size:]
            if any(s.startswith(suffix) for s in self._stop):
                return size
        return 0

    def _emit(self, delta: str, *, held: str) -> str:
        self._held = held
        if delta:
            self._pieces.append(delta)
        return delta
