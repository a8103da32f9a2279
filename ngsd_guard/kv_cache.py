"""A KV cache that grows in chunks instead of concatenating at every forward.

transformers' ``DynamicLayer`` grows by ``torch.cat`` at every forward: each step allocates the
layer's whole cache anew and frees the old one. On glibc those frees fragment the heap once a
large free (a window's logits) has raised the dynamic mmap threshold, so resident memory grows
faster than the cache does (issue 9: 138 KB per token for two caches that hold 92).

A :class:`ChunkedLayer` keeps ``(B, H, capacity, D)`` storage and writes new slots into it;
``keys`` and ``values`` are views of the filled part, ``(B, H, filled, D)``. When a write does
not fit, the storage is reallocated with room for ``chunk`` more slots, so a decode of ``n``
tokens reallocates ``n / chunk`` times, not ``n``. Assigning ``keys`` or ``values`` (a
compaction, a batch change) makes the assigned tensor the storage, full. Reserving a decode's
whole budget up front instead measured worse on this CPU (README, "Speed and memory"): glibc
serves large requests from freed heap memory that is already resident.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

CHUNK = 64
"""Slots added each time a layer's storage is full."""


class ChunkedLayer(DynamicLayer):
    """One layer's keys and values in storage that grows ``chunk`` slots at a time."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._storage: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._filled = {"keys": 0, "values": 0}  # slots filled, per storage
        super().__init__()

    # ----------------------------------------------------------- the filled views
    def _view(self, name: str) -> torch.Tensor | None:
        storage = self._storage[name]
        if storage is None or storage.ndim != 4:  # unset, or transformers' empty placeholder
            return storage
        return storage[:, :, : self._filled[name]]  # (B, H, filled, D)

    def _adopt(self, name: str, states: torch.Tensor | None) -> None:
        self._storage[name] = states
        self._filled[name] = states.shape[2] if states is not None and states.ndim == 4 else 0

    @property
    def keys(self) -> torch.Tensor | None:
        return self._view("keys")

    @keys.setter
    def keys(self, states: torch.Tensor | None) -> None:
        self._adopt("keys", states)

    @property
    def values(self) -> torch.Tensor | None:
        return self._view("values")

    @values.setter
    def values(self, states: torch.Tensor | None) -> None:
        self._adopt("values", states)

    @property
    def capacity(self) -> int:
        """Slots the storage holds (0 before the first fill)."""
        storage = self._storage["keys"]
        return 0 if storage is None or storage.ndim != 4 else storage.shape[2]

    # ----------------------------------------------------------- transformers' layer API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, D) new states after the filled slots; return the filled views."""
        if not self.is_initialized:
            self.is_initialized, self.device = True, key_states.device
        start = self._filled["keys"]
        end = start + key_states.shape[2]
        for name, states in (("keys", key_states), ("values", value_states)):
            storage = self._storage[name]
            if storage is None or storage.ndim != 4 or storage.shape[2] < end:
                self._grow(name, states, end)
            self._storage[name][:, :, start:end] = states
            self._filled[name] = end
        return self.keys, self.values

    def _grow(self, name: str, like: torch.Tensor, needed: int) -> None:
        """Reallocate ``name``'s storage to ``needed + chunk`` slots, keeping what is filled."""
        old, filled = self._storage[name], self._filled[name]
        storage = like.new_empty((*like.shape[:2], needed + self.chunk, like.shape[3]))
        if filled:
            storage[:, :, :filled] = old[:, :, :filled]
        self._storage[name] = storage

    def get_seq_length(self) -> int:
        return self._filled["keys"] if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` filled slots (a negative count, as
        ``DynamicLayer.crop`` takes it); their storage is written again by later fills."""
        if tokens_to_remove > 0:
            raise ValueError(f"`tokens_to_remove` (={tokens_to_remove}) must be negative")
        if self.is_initialized:
            for name in self._filled:
                self._filled[name] = max(0, self._filled[name] + tokens_to_remove)


class ChunkedCache(DynamicCache):
    """A ``DynamicCache`` of :class:`ChunkedLayer`\\ s, empty or holding ``states`` (one
    ``(keys, values)`` pair per layer)."""

    def __init__(
        self,
        states: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
        *,
        chunk: int = CHUNK,
    ) -> None:
        layers = []
        for keys, values in states:
            layer = ChunkedLayer(chunk)
            layer.update(keys, values)
            layers.append(layer)
        if layers:
            super(DynamicCache, self).__init__(layers=layers)
        else:
            replicate = functools.partial(ChunkedLayer, chunk)
            super(DynamicCache, self).__init__(layer_class_to_replicate=replicate)
