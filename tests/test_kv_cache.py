"""ChunkedCache: the same states as transformers' DynamicCache, in storage grown by chunks."""

from __future__ import annotations

import torch
from tiny_models import tiny_llama
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ngsd_guard.kv_cache import ChunkedCache, ChunkedLayer


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(
        batch, 2, length, 4, generator=g
    )


def test_layer_matches_dynamic_layer_through_fills_crops_selects_and_assignments():
    chunked, dynamic = ChunkedLayer(chunk=5), DynamicLayer()
    steps = [("fill", 3), ("fill", 1), ("crop", 2), ("fill", 4), ("select", None), ("fill", 9)]
    steps += [("assign", None), ("fill", 2), ("crop", 1), ("fill", 1)]
    for seed, (op, n) in enumerate(steps):
        if op == "fill":
            batch = dynamic.keys.shape[0] if dynamic.is_initialized else 3
            k, v = _states(batch, n, seed)
            got = chunked.update(k, v)
            want = dynamic.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        elif op == "crop":
            chunked.crop(-n)
            dynamic.crop(-n)
        elif op == "select":
            index = torch.tensor([2, 0])
            chunked.batch_select_indices(index)
            dynamic.batch_select_indices(index)
        else:  # a compaction: every slot but the first
            chunked.keys, chunked.values = chunked.keys[:, :, 1:], chunked.values[:, :, 1:]
            dynamic.keys, dynamic.values = dynamic.keys[:, :, 1:], dynamic.values[:, :, 1:]
        assert torch.equal(chunked.keys, dynamic.keys) and torch.equal(
            chunked.values, dynamic.values
        )
        assert chunked.get_seq_length() == dynamic.get_seq_length()


def test_fills_within_a_chunk_write_in_place_and_past_it_grow_by_a_chunk():
    layer = ChunkedLayer(chunk=4)
    layer.update(*_states(1, 3, 0))
    assert layer.capacity == 3 + 4
    storage = layer.keys.data_ptr()
    for seed in range(4):
        layer.update(*_states(1, 1, seed))
        assert layer.keys.data_ptr() == storage
    layer.update(*_states(1, 1, 9))  # the 8th slot: past the capacity
    assert layer.keys.data_ptr() != storage and layer.capacity == 8 + 4
    layer.crop(-3)
    layer.update(*_states(1, 2, 10))  # written where the cropped slots were
    assert layer.get_seq_length() == 7 and layer.capacity == 12


def test_a_model_decodes_the_same_logits_with_either_cache():
    model = tiny_llama(0, max_positions=64).eval()
    prompt = torch.tensor([[5, 17, 99, 3, 42, 8]])
    results = []
    for cache in (DynamicCache(), ChunkedCache(chunk=3)):
        ids, logits = prompt, []
        with torch.no_grad():
            for _ in range(6):  # past the first chunk: growths on the way
                out = model(ids, cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                ids = out.logits[:, -1:].argmax(-1)
        results.append(torch.cat(logits))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
