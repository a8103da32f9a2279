"""ReservedCache: the same states as transformers' DynamicCache, written into reserved storage."""

from __future__ import annotations

import torch
from tiny_models import tiny_llama
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ngsd_guard.kv_cache import GROWTH, ReservedCache, ReservedLayer


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(
        batch, 2, length, 4, generator=g
    )


def test_layer_matches_dynamic_layer_through_fills_crops_selects_and_assignments():
    reserved, dynamic = ReservedLayer(spare=5), DynamicLayer()
    steps = [("fill", 3), ("fill", 1), ("crop", 2), ("fill", 4), ("select", None), ("fill", 9)]
    steps += [("assign", None), ("fill", 2), ("crop", 1), ("fill", 1)]
    for seed, (op, n) in enumerate(steps):
        if op == "fill":
            batch = dynamic.keys.shape[0] if dynamic.is_initialized else 3
            k, v = _states(batch, n, seed)
            got = reserved.update(k, v)
            want = dynamic.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        elif op == "crop":
            reserved.crop(-n)
            dynamic.crop(-n)
        elif op == "select":
            index = torch.tensor([2, 0])
            reserved.batch_select_indices(index)
            dynamic.batch_select_indices(index)
        else:  # a compaction: every slot but the first
            reserved.keys, reserved.values = reserved.keys[:, :, 1:], reserved.values[:, :, 1:]
            dynamic.keys, dynamic.values = dynamic.keys[:, :, 1:], dynamic.values[:, :, 1:]
        assert torch.equal(reserved.keys, dynamic.keys) and torch.equal(
            reserved.values, dynamic.values
        )
        assert reserved.get_seq_length() == dynamic.get_seq_length()


def test_fills_within_the_spare_write_in_place_and_past_it_grow_once():
    layer = ReservedLayer(spare=4)
    layer.update(*_states(1, 3, 0))
    assert layer.capacity == 3 + 4
    storage = layer.keys.data_ptr()
    for seed in range(4):
        layer.update(*_states(1, 1, seed))
        assert layer.keys.data_ptr() == storage
    layer.update(*_states(1, 1, 9))  # the 8th slot: past the capacity
    assert layer.keys.data_ptr() != storage and layer.capacity == 8 + 4
    assert ReservedLayer(spare=0).update(*_states(1, 2, 0))[0].shape[2] == 2
    bare = ReservedLayer(spare=0)
    bare.update(*_states(1, 2, 0))
    bare.update(*_states(1, 1, 1))
    assert bare.capacity == 3 + GROWTH


def test_a_model_decodes_the_same_logits_with_either_cache():
    model = tiny_llama(0, max_positions=64).eval()
    prompt = torch.tensor([[5, 17, 99, 3, 42, 8]])
    results = []
    for cache in (DynamicCache(), ReservedCache(spare=3)):
        ids, logits = prompt, []
        with torch.no_grad():
            for _ in range(6):  # past the spare: one growth on the way
                out = model(ids, cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                ids = out.logits[:, -1:].argmax(-1)
        results.append(torch.cat(logits))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
