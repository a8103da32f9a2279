"""One model's half of a batched decode: its KV cache, which cache slots are live, and where
each row's next token goes.

Rows are left-padded at the prefill. Later feeds may be ragged: a row that feeds fewer tokens
than the widest row fills the rest of its chunk with dead slots (masked out of attention), and
tokens dropped after a cut draft become dead slots too. Dead slots are reclaimed so that the
cache tracks the live tokens: a dead tail that every row shares is cropped, and when the dead
slots that no crop can reach grow past a threshold, every row's live slots are gathered into a
fresh, left-padded cache. Rows can be removed (finished) or appended (a request that joins).

The position of a token is its index among its row's live tokens, so a compacted or merged
cache gives the same logits. A side's cache may store its states in a narrower dtype than its
model computes in (``kv_dtype``: the expert's, by default, at float16 when it computes in
float32): every query then attends to the stored states, however the tokens were fed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .experts import Forward, Outputs, Runner, Trunk
from .features import PromptFeatures, first_divergence
from .prefixes import Header

COMPACT_MIN_SLOTS = 32
"""Compact once this many slots (and at least :data:`COMPACT_MIN_SHARE` of the cache) are dead
in the fullest row."""
COMPACT_MIN_SHARE = 0.125
ROOM_MIN_SLOTS = 64
"""A grown cache layer has room for at least this many more slots over all its rows (and a
sixteenth of its length): :class:`GrowingLayer`."""


class Widener:
    """The buffers into which the layers of a cache stored narrower than its model computes
    widen their keys and values for attention, one layer after another: a layer's widened
    states live until the next layer's update. Two buffers that grow by a sixteenth when too
    small, instead of a fresh pair per layer per forward, whose sizes grow with the cache and
    so leave holes in glibc's heap that the next, larger pair does not fit."""

    def __init__(self) -> None:
        self._buffers = [torch.empty(0), torch.empty(0)]

    def widen(
        self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys`` and ``values`` in ``dtype``, each a view of its buffer."""
        return self._into(0, keys, dtype), self._into(1, values, dtype)

    def _into(self, slot: int, states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        count, buffer = states.numel(), self._buffers[slot]
        if buffer.numel() < count or buffer.dtype != dtype or buffer.device != states.device:
            buffer = torch.empty(count + count // 16, dtype=dtype, device=states.device)
            self._buffers[slot] = buffer
        view = buffer[:count].view(states.shape)
        view.copy_(states)
        return view


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values are prefixes of buffers with room to grow.

    ``DynamicLayer.update`` concatenates, so every step copies the whole cache and frees the
    old copy: O(length) per step, and a heap of freed blocks each a slot too small for the
    next (glibc serves them from its heap once a larger block was freed). Here an update
    writes the new states into the room after the prefix, in place, and a full layer moves
    once into a buffer with ``max(ROOM_MIN_SLOTS / rows, length / 16)`` more slots. Only
    buffers made here are written in place: keys set from outside (a crop's prefix excepted)
    are copied into a new buffer on the next update, so a shared header's states are never
    written. The buffers keep the dtype of the states the layer was made with; an update
    rounds the new states to it and returns the whole prefix in the dtype they came in,
    widened into ``widener``'s buffers (shared by a cache's layers).
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, widener: Widener | None = None
    ) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.widener = widener or Widener()
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length, count = self.keys.shape[-2], key_states.shape[-2]
        if not self._fits(length + count):
            room = max(ROOM_MIN_SLOTS // key_states.shape[0], length // 16, 1)
            self._move(length, length + count + room)
        assert self._room is not None
        keys, values = self._room
        keys[:, :, length : length + count] = key_states
        values[:, :, length : length + count] = value_states
        self.keys, self.values = keys[:, :, : length + count], values[:, :, : length + count]
        if self.keys.dtype == key_states.dtype:
            return self.keys, self.values
        return self.widener.widen(self.keys, self.values, key_states.dtype)

    def _fits(self, length: int) -> bool:
        """True when keys and values are prefixes of this layer's buffers, ``length`` slots
        long at least."""
        if self._room is None:
            return False
        return all(
            view.data_ptr() == room.data_ptr()
            and view.shape[:2] == room.shape[:2]
            and view.stride() == room.stride()
            and length <= room.shape[2]
            for view, room in zip((self.keys, self.values), self._room, strict=True)
        )

    def _move(self, length: int, slots: int) -> None:
        """Copy the first ``length`` slots into new buffers ``slots`` long."""
        rooms = []
        for states in (self.keys, self.values):
            rows, heads, _, dim = states.shape
            room = states.new_empty((rows, heads, slots, dim))
            room[:, :, :length] = states
            rooms.append(room)
        self._room = (rooms[0], rooms[1])


def growing(cache: DynamicCache, dtype: torch.dtype | None = None) -> DynamicCache:
    """``cache`` with its plain dynamic layers made :class:`GrowingLayer`, their states stored
    in ``dtype`` (None: as they are); sliding-window and other layers stay as they are."""
    widener = Widener()
    cache.layers = [
        GrowingLayer(_stored(layer.keys, dtype), _stored(layer.values, dtype), widener)
        if type(layer) is DynamicLayer and layer.is_initialized
        else layer
        for layer in cache.layers
    ]
    return cache


def _stored(states: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return states if dtype is None else states.to(dtype)


def kv_dtype(setting: str, compute: torch.dtype) -> torch.dtype | None:
    """The dtype a cache stores the states of a model computing in ``compute``, when it
    differs (None: as computed). ``auto`` halves float32 (float16, whose 11-bit mantissa keeps
    a relative error of 2^-11), and keeps any other dtype.

    >>> kv_dtype("auto", torch.float32), kv_dtype("auto", torch.bfloat16)
    (torch.float16, None)
    """
    if setting == "auto":
        wanted = torch.float16 if compute == torch.float32 else compute
    else:
        wanted = getattr(torch, setting)
    return None if wanted == compute else wanted


@dataclass(frozen=True)
class Prefill:
    """The result of feeding prompts: the side, the next-token logits and the prompt features."""

    side: ModelSide
    logits: torch.Tensor  # (B, V) fp32: the next-token logits after each prompt
    features: torch.Tensor | None  # (B, F) fp32 prompt features, if asked
    hidden: torch.Tensor | None = None  # (B, H) the states entering layer ``hidden_at`` at
    # each prompt's last token, if asked


class ModelSide:
    """A batch of rows in one model: KV cache, (B, S) live-slot mask and (B,) next positions.
    ``kv_dtype``: the dtype the cache stores its states in (None: the model's)."""

    def __init__(
        self,
        runner: Runner | Trunk,
        cache: DynamicCache,
        mask: torch.Tensor,
        next_position: torch.Tensor,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.runner = runner
        self.cache = growing(cache, kv_dtype)
        self.mask = mask
        self.next_position = next_position

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @torch.no_grad()
    def feed(
        self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, *, hidden_at: int = 0
    ) -> Forward:
        """Feed (B, T) tokens, row ``r`` its first ``lengths[r]`` (all T when None): the logits
        after every fed position, (B, T, V) fp32 (those past a row's length are garbage), and
        the states entering layer ``hidden_at`` if asked (:meth:`Runner.forward`)."""
        assert isinstance(self.runner, Runner)
        positions = self._append(tokens, lengths)
        return self.runner.forward(
            tokens, self.mask, positions, self.cache, keep=tokens.shape[1], hidden_at=hidden_at
        )

    @torch.no_grad()
    def feed_outputs(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None) -> Outputs:
        """As :meth:`feed`, but the outputs that form those logits a few positions at a time;
        a trunk's side is fed (B, T, H) states instead of tokens (:class:`Trunk`)."""
        positions = self._append(inputs, lengths)
        return self.runner.outputs(inputs, self.mask, positions, self.cache)

    def _append(self, inputs: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Extend the live-slot mask and the next positions by a feed: its (B, T) positions."""
        rows, count = inputs.shape[:2]
        steps = torch.arange(count)
        live = (
            torch.ones((rows, count), dtype=torch.long)
            if lengths is None
            else (steps < lengths.unsqueeze(-1)).long()
        )
        positions = self.next_position.unsqueeze(-1) + steps
        self.mask = torch.cat([self.mask, live], -1)
        self.next_position = self.next_position + live.sum(-1)
        return positions

    def forget(self, row: int, count: int) -> None:
        """Hide the last ``count`` live tokens of ``row`` from every later query."""
        if count <= 0:
            return
        live = self.mask[row].nonzero().flatten()
        self.mask[row, live[-count:]] = 0
        self.next_position[row] -= count

    def reclaim(self) -> None:
        """Crop the dead tail that every row shares; compact when too many slots are dead."""
        width = self.mask.shape[1]
        live_any = self.mask.any(0).nonzero()
        tail = width - (int(live_any[-1]) + 1 if len(live_any) else 0)
        if tail:
            self.cache.crop(-tail)
            self.mask = self.mask[:, : width - tail]
            width -= tail
        longest = int(self.mask.sum(-1).max()) if self.rows else 0
        dead = width - longest
        if dead >= COMPACT_MIN_SLOTS and dead >= COMPACT_MIN_SHARE * width:
            self._compact(longest)

    def _compact(self, width: int) -> None:
        """Gather each row's live slots to the right end of a cache ``width`` slots wide."""
        order = torch.sort(self.mask, dim=-1, stable=True).indices  # dead slots first
        index = order[:, -width:]  # (B, width): every live slot, left-padded with dead ones
        self.mask = self.mask.gather(1, index)
        for layer in self.cache.layers:
            layer.keys = _gather_slots(layer.keys, index)
            layer.values = _gather_slots(layer.values, index)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (a (N,) index), in that order."""
        self.cache.batch_select_indices(rows.to(self.runner.out_device))
        self.mask = self.mask[rows]
        self.next_position = self.next_position[rows]

    def extend(self, other: ModelSide) -> None:
        """Append ``other``'s rows (same model) after these, left-padding the shorter cache."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat(
                [
                    _left_pad(mine.keys, width, 2),
                    _left_pad(theirs.keys.to(mine.keys.dtype), width, 2),
                ]
            )
            mine.values = torch.cat(
                [
                    _left_pad(mine.values, width, 2),
                    _left_pad(theirs.values.to(mine.values.dtype), width, 2),
                ]
            )
        self.next_position = torch.cat([self.next_position, other.next_position])


def _gather_slots(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) cache states at the (B, W) slot ``index`` of each row: (B, H, W, D)."""
    rows, heads, _, dim = states.shape
    index = index.to(states.device)[:, None, :, None].expand(rows, heads, -1, dim)
    return states.gather(2, index)


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


@torch.no_grad()
def prefill(
    runner: Runner,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    *,
    headers: Sequence[Header | None] | None = None,
    features: PromptFeatures | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
    adapter_names: Sequence[str] | None = None,
    hidden_at: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> Prefill:
    """Feed prompts to a fresh cache: the side (its cache stored in ``kv_dtype`` once the
    prompts are fed), the next-token logits (B, V) and, if
    ``features`` are asked, the (B, F) prompt features pooled from this forward, with
    ``spans`` each prompt's [start, end) token positions of its last user message; with
    ``hidden_at``, the states entering that layer at each prompt's last token.

    ``headers`` (:mod:`ngsd_guard.prefixes`), per row, the states of the prompt's first tokens
    already computed on this model: only the rest is fed. Each row's slots are its header
    right-aligned in the widest header's width, then its rest left-padded; a span must not
    start inside the header."""
    headers = list(headers) if headers is not None else [None] * len(prompts)
    cuts = [h.length if h is not None else 0 for h in headers]
    rests = [list(p[cut:]) for p, cut in zip(prompts, cuts, strict=True)]
    front, width = max(cuts), max(len(r) for r in rests)
    ids = torch.full((len(rests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rests), front + width), dtype=torch.long)
    positions = torch.zeros((len(rests), width), dtype=torch.long)
    for row, (rest, cut) in enumerate(zip(rests, cuts, strict=True)):
        ids[row, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        mask[row, front - cut : front] = 1
        mask[row, front + width - len(rest) :] = 1
        positions[row, width - len(rest) :] = torch.arange(cut, cut + len(rest))
    padded_spans = None
    if features is not None:
        if spans is None:
            raise ValueError("`features` need the `spans` of the last user message")
        padded_spans = torch.tensor(  # in the fed positions
            [
                (start - cut + width - len(r), end - cut + width - len(r))
                for r, cut, (start, end) in zip(rests, cuts, spans, strict=True)
            ]
        )
    cache = _header_cache(headers, front)
    out = runner.forward(
        ids,
        mask,
        positions,
        cache,
        features=features,
        spans=padded_spans,
        keep=1,
        adapter_names=adapter_names,
        hidden_at=hidden_at,
    )
    side = ModelSide(runner, cache, mask, positions[:, -1] + 1, kv_dtype)
    hidden = out.hidden[:, -1].clone() if out.hidden is not None else None  # not a view
    return Prefill(side, out.logits[:, -1], out.features, hidden)


def _header_cache(headers: Sequence[Header | None], width: int) -> DynamicCache:
    """A cache holding each row's header right-aligned in ``width`` slots (empty: none)."""
    if not width:
        return DynamicCache()
    known = next(h for h in headers if h is not None)
    layers = []
    for layer, (keys, _) in enumerate(known.states):
        empty = keys.new_zeros((1, keys.shape[1], 0, keys.shape[3]))
        rows = [h.states[layer] if h is not None else (empty, empty) for h in headers]
        layers.append(
            tuple(torch.cat([_left_pad(row[i], width, 2) for row in rows]) for i in (0, 1))
        )
    return _cache_of(layers)


def _cache_of(states: Sequence[tuple[torch.Tensor, ...]]) -> DynamicCache:
    """A cache holding ``states`` (per layer: keys, values) as they are, not copied: nothing
    writes a cache's tensors in place (every update, crop and compaction makes new ones)."""
    cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in states])
    for layer, (keys, values) in zip(cache.layers, states, strict=True):
        layer.keys, layer.values = keys, values
    return cache


def split(
    prefilled: Prefill,
    rows: int,
    runners: tuple[Runner, Runner | Trunk],
    kv_dtype: torch.dtype | None = None,
) -> tuple[Prefill, Prefill]:
    """Two prefills from one whose first ``rows`` rows belong to the first runner and the rest
    to the second (a base and its LoRA expert prefilled in one forward; for the expert's
    :class:`Trunk`, only the cache of its layers), the second's cache stored in ``kv_dtype``.
    The first half's cache is a view (its next step replaces it); the second's a copy, since
    its next forward may come a window later, and a view would hold the whole prefill until
    then."""
    side = prefilled.side
    halves = []
    for runner, index in zip(runners, (slice(0, rows), slice(rows, side.rows)), strict=True):
        copy = index.start > 0
        dtype = kv_dtype if copy else None
        part = ModelSide(
            runner,
            _cache_of(
                [
                    tuple(
                        t[index].clone() if copy and dtype in (None, t.dtype) else t[index]
                        for t in (layer.keys, layer.values)
                    )
                    for layer in side.cache.layers[runner.first_layer :]
                ]
            ),
            side.mask[index].clone(),
            side.next_position[index].clone(),
            dtype,
        )
        pooled = prefilled.features[index] if prefilled.features is not None else None
        hidden = prefilled.hidden[index] if prefilled.hidden is not None else None
        halves.append(Prefill(part, prefilled.logits[index], pooled, hidden))
    return halves[0], halves[1]


def upper(prefilled: Prefill, trunk: Trunk) -> Prefill:
    """An expert's prefill as its :class:`Trunk`'s: only the cache of the trunk's layers."""
    side = prefilled.side
    states = [(layer.keys, layer.values) for layer in side.cache.layers[trunk.first_layer :]]
    part = ModelSide(trunk, _cache_of(states), side.mask, side.next_position)
    return Prefill(part, prefilled.logits, prefilled.features, prefilled.hidden)


def prompt_features(
    features: PromptFeatures, base: Prefill, expert: Prefill | None
) -> torch.Tensor:
    """(B, F) fp32 ``features`` of prompts prefilled on the base (pooled with ``features``)
    and, for ``tv@0``, on the expert (:meth:`PromptFeatures.assemble`)."""
    if base.features is None:
        raise ValueError("the base's prefill was not asked for `features`")
    divergence = first_divergence(base.logits, expert.logits) if expert is not None else None
    return features.assemble(base.features, divergence)
