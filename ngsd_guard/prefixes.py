"""Prompt headers computed once: the KV states of the tokens before a request's last user
message (a chat template's system prompt, an agent's tool schemas, a RAG app's instructions),
kept per model side and shared by every row and call that starts with them.

A prompt is prefilled in two parts: its header, always alone as a (1, P) forward (or taken
from the cache), then the rest, batched, over the header's states. Where a prompt splits
depends on the prompt alone, never on the batch or on what the cache holds, so a row decodes
the same tokens alone, in a batch, and before or after its header was cached. Both models of
a guarded decode prefill every prompt, so a shared header saves twice what it saves the base.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .experts import Runner


@dataclass(frozen=True)
class Header:
    """The KV states of a prompt's first ``length`` tokens on one model: per decoder layer
    ``(keys, values)``, each (1, H, length, D)."""

    states: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int


def header_length(base_ids: Sequence[int], span: tuple[int, int] | None) -> int:
    """Where the base's prompt splits: the start of its last user message (``span``), leaving
    at least one token to prefill after the header (0: no header)."""
    if span is None:
        return 0
    return max(0, min(span[0], len(base_ids) - 1))


def expert_header_length(base_ids: Sequence[int], expert_ids: Sequence[int], cut: int) -> int:
    """Where the expert's prompt splits, for a base split at ``cut``: at the same rest when the
    expert's prompt ends with the base's rest (the same prompt, or one under a safety system
    prompt), else 0.

    >>> expert_header_length([1, 2, 3, 4], [9, 9, 9, 3, 4], 2)
    3
    """
    rest = len(base_ids) - cut
    if cut and len(expert_ids) > rest and list(expert_ids[-rest:]) == list(base_ids[cut:]):
        return len(expert_ids) - rest
    return 0


class PrefixCache:
    """Headers by model side and tokens, least recently used first out once they hold more
    than ``max_tokens`` tokens together (a longer header is computed and used, not kept).
    Safe to share between threads; a header is computed under its model's lock."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._headers: OrderedDict[tuple[str, tuple[int, ...]], Header] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    @property
    def tokens(self) -> int:
        """The tokens of every header held."""
        return self._tokens

    def header(self, side: str, runner: Runner, ids: Sequence[int]) -> Header | None:
        """The header of ``ids`` (a prompt's first tokens) on ``runner``, which ``side`` names:
        cached, or computed alone and kept. None for no tokens."""
        if not ids:
            return None
        key = (side, tuple(ids))
        with self._lock:
            found = self._headers.get(key)
            if found is not None:
                self._headers.move_to_end(key)
                return found
        header = compute_header(runner, ids)
        if header.length <= self.max_tokens:
            with self._lock:
                if key not in self._headers:
                    self._headers[key] = header
                    self._tokens += header.length
                while self._tokens > self.max_tokens:
                    _, dropped = self._headers.popitem(last=False)
                    self._tokens -= dropped.length
        return header

    def clear(self) -> None:
        with self._lock:
            self._headers.clear()
            self._tokens = 0


@torch.no_grad()
def compute_header(runner: Runner, ids: Sequence[int]) -> Header:
    """The KV states of ``ids`` on ``runner``, fed alone as one (1, P) forward."""
    count = len(ids)
    cache = DynamicCache()
    runner.forward(
        torch.tensor([list(ids)], dtype=torch.long),
        torch.ones((1, count), dtype=torch.long),
        torch.arange(count).unsqueeze(0),
        cache,
        keep=1,
    )
    states = tuple((layer.keys, layer.values) for layer in cache.layers)
    return Header(states, count)
