"""A KV cache that writes into reserved storage instead of concatenating.

transformers' ``DynamicLayer`` grows by ``torch.cat`` at every forward: each step allocates the
layer's whole cache anew and frees the old one. On glibc those frees fragment the heap once a
large free (a window's logits) has raised the dynamic mmap threshold, so resident memory grows
faster than the cache does (issue 9: 138 KB per token for two caches that hold 92).

A :class:`ReservedLayer` keeps ``(B, H, capacity, D)`` storage and writes new slots into it;
``keys`` and ``values`` are views of the filled part, ``(B, H, length, D)``. Its capacity is the
filled length plus ``spare`` slots (a decode's token budget): reserved storage that is never
written is never touched, so it costs address space, not resident memory. A fill past the
capacity reallocates with ``spare`` slots again (or :data:`GROWTH` when ``spare`` is 0).
Assigning ``keys``/``values`` (a compaction, a batch change) adopts the tensor into fresh
storage with the same spare, copying only the filled slots.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROWTH = 64
"""Slots added when a layer without spare fills its storage."""


class ReservedLayer(DynamicLayer):
    """One layer's keys and values in storage ``spare`` slots longer than what is filled."""

    def __init__(self, spare: int = 0) -> None:
        self.spare = spare
        self._storage: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._filled = {"keys": 0, "values": 0}  # slots filled, per storage
        super().__init__()

    # ----------------------------------------------------------- the filled views
    def _view(self, name: str) -> torch.Tensor | None:
        storage = self._storage[name]
        if storage is None or storage.ndim != 4:
            return storage
        return storage[:, :, : self._filled[name]]  # (B, H, filled, D)

    def _adopt(self, name: str, states: torch.Tensor | None) -> None:
        """Fresh storage holding ``states`` (B, H, L, D) and ``spare`` more slots (kept as is
        when unset, or transformers' empty placeholder)."""
        if states is None or states.ndim != 4:
            self._storage[name], self._filled[name] = states, 0
            return
        length = states.shape[2]
        storage = states.new_empty((*states.shape[:2], length + self.spare, states.shape[3]))
        storage[:, :, :length] = states
        self._storage[name], self._filled[name] = storage, length

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

    def _grow(self, needed: int) -> None:
        """Reallocate both storages to hold ``needed`` slots plus the spare."""
        extra = self.spare or GROWTH
        for name, old in self._storage.items():
            storage = old.new_empty((*old.shape[:2], needed + extra, old.shape[3]))
            storage[:, :, : self._filled[name]] = old[:, :, : self._filled[name]]
            self._storage[name] = storage

    # ----------------------------------------------------------- transformers' layer API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, D) new states after the filled slots; return the filled views."""
        if not self.is_initialized or self.capacity == 0:
            self.is_initialized = True
            self.device = key_states.device
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        start = self._filled["keys"]
        end = start + key_states.shape[2]
        if end > self.capacity:
            self._grow(end)
        for name, states in (("keys", key_states), ("values", value_states)):
            self._storage[name][:, :, start:end] = states
            self._filled[name] = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._filled["keys"] if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` filled slots (a negative count, as
        ``DynamicLayer.crop`` takes it); the storage stays, to be written again."""
        if tokens_to_remove > 0:
            raise ValueError(f"`tokens_to_remove` (={tokens_to_remove}) must be negative")
        if self.is_initialized:
            for name in self._filled:
                self._filled[name] = max(0, self._filled[name] + tokens_to_remove)


class ReservedCache(DynamicCache):
    """A ``DynamicCache`` of :class:`ReservedLayer`\\ s that keep ``spare`` slots reserved."""

    def __init__(self, spare: int = 0, states: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()):
        layers = []
        for keys, values in states:
            layer = ReservedLayer(spare)
            layer.update(keys, values)
            layers.append(layer)
        self.spare = spare
        if layers:
            super(DynamicCache, self).__init__(layers=layers)
        else:
            replicate = functools.partial(ReservedLayer, spare)
            super(DynamicCache, self).__init__(layer_class_to_replicate=replicate)
