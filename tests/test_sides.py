"""A model side's cache: dropped, compacted, merged or reordered, it gives the same logits."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_cohere
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from ngsd_guard.experts import ModelHandle, Runner, Trunk, first_adapted_layer, without_adapters
from ngsd_guard.sides import ROOM_MIN_SLOTS, GrowingLayer, kv_dtype, prefill, split


def _runner(model) -> Runner:
    return Runner(ModelHandle(model), model.config.vocab_size, torch.device("cpu"))


def _full(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_forgotten_and_compacted_slots_do_not_change_the_logits(tiny_base, monkeypatch):
    monkeypatch.setattr("ngsd_guard.sides.COMPACT_MIN_SLOTS", 2)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    done = prefill(_runner(tiny_base), prompts, pad_id=2)
    side = done.side
    assert torch.allclose(done.logits[0], _full(tiny_base, prompts[0]), atol=1e-4)
    # row 0 feeds 3 tokens, row 1 one (the rest of its chunk is dead), then row 0 drops 2
    side.feed(torch.tensor([[20, 21, 22], [30, 2, 2]]), torch.tensor([3, 1]))
    side.forget(0, 2)
    width = side.mask.shape[1]
    side.reclaim()
    assert side.mask.shape[1] < width  # the dead tail was cropped or compacted
    logits = side.feed(torch.tensor([[40], [41]])).logits[:, -1]
    assert torch.allclose(logits[0], _full(tiny_base, [*prompts[0], 20, 40]), atol=1e-4)
    assert torch.allclose(logits[1], _full(tiny_base, [*prompts[1], 30, 41]), atol=1e-4)


def test_rows_leave_and_join(tiny_base):
    runner = _runner(tiny_base)
    side = prefill(runner, [[5, 6, 7], [8, 9]], pad_id=2).side
    side.feed(torch.tensor([[20], [21]]))
    side.select(torch.tensor([1]))
    other = prefill(runner, [[12, 13, 14, 15, 16, 17]], pad_id=2).side
    side.extend(other)
    logits = side.feed(torch.tensor([[30], [31]])).logits[:, -1]
    assert torch.allclose(logits[0], _full(tiny_base, [8, 9, 21, 30]), atol=1e-4)
    assert torch.allclose(logits[1], _full(tiny_base, [12, 13, 14, 15, 16, 17, 31]), atol=1e-4)


def test_a_prefill_over_headers_gives_the_logits_and_features_of_whole_prompts(tiny_base):
    from ngsd_guard.features import PromptFeatures
    from ngsd_guard.prefixes import compute_header

    runner = _runner(tiny_base)
    features = PromptFeatures.parse("last@1+mean@1")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17]]
    spans = [(4, 6), (2, 3), (0, 3)]
    headers = [compute_header(runner, [5, 6, 7, 8]), compute_header(runner, [11, 12]), None]
    whole = prefill(runner, prompts, pad_id=2, features=features, spans=spans)
    split = prefill(runner, prompts, pad_id=2, headers=headers, features=features, spans=spans)
    assert split.side.mask.shape[1] == 4 + 3  # the widest header, then the longest rest
    assert torch.allclose(split.logits, whole.logits, atol=1e-4)
    assert torch.allclose(split.features, whole.features, atol=1e-4)
    logits = split.side.feed(torch.tensor([[40], [41], [42]])).logits[:, -1]
    for row, (prompt, token) in enumerate(zip(prompts, (40, 41, 42), strict=True)):
        assert torch.allclose(logits[row], _full(tiny_base, [*prompt, token]), atol=1e-4)


def test_a_verification_forms_the_logits_that_a_whole_forward_gives(tiny_base):
    """A Llama's logits are its output layer over the final hidden state, so a verification
    keeps the (B, T, H) states and forms (n, V) logits on demand: they equal the forward's,
    and the cache advances alike."""
    runner = _runner(tiny_base)
    assert runner.handle.head is tiny_base.lm_head
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    whole, formed = (prefill(runner, prompts, pad_id=2).side for _ in range(2))
    tokens, lengths = torch.tensor([[20, 21, 22], [30, 2, 2]]), torch.tensor([3, 1])
    logits = whole.feed(tokens, lengths).logits
    outputs = formed.feed_outputs(tokens, lengths)
    assert outputs.states.shape == (2, 3, tiny_base.config.hidden_size)
    rows, positions = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(outputs.logits(rows, positions), logits[rows, positions], atol=1e-5)
    step = torch.tensor([[40], [41]])
    assert torch.allclose(whole.feed(step).logits, formed.feed(step).logits, atol=1e-5)


class _ScaledLlama(LlamaForCausalLM):
    """A family that scales its logits after the output layer, without a config field."""

    @functools.wraps(LlamaForCausalLM.forward)
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


@pytest.mark.parametrize("family", ["cohere", "scaled"])
def test_logits_that_are_not_the_output_layers_product_are_kept_whole(tiny_base, family):
    """Cohere scales its logits (a config field); another family may do so in its forward
    (found by the check on three tokens). Their verifications keep the forward's logits."""
    if family == "cohere":
        model = tiny_cohere(0)
    else:
        model = _ScaledLlama(tiny_base.config).eval()
        model.load_state_dict(tiny_base.state_dict())
    runner = _runner(model)
    assert runner.handle.head is None
    side = prefill(runner, [[5, 6, 7]], pad_id=2).side
    outputs = side.feed_outputs(torch.tensor([[20, 21]]))
    rows, positions = torch.tensor([0, 0]), torch.tensor([0, 1])
    assert torch.allclose(
        outputs.logits(rows, positions)[1], _full(model, [5, 6, 7, 20, 21]), atol=1e-4
    )


def test_a_growing_layer_writes_in_place_and_never_into_states_it_was_given(tiny_base):
    """Updates equal ``DynamicLayer``'s concatenations, crops included; the layer moves to a
    larger buffer only when its room is used up, and the states it started from (a cached
    header's, shared between calls) are never written."""
    assert all(
        isinstance(layer, GrowingLayer)
        for layer in prefill(_runner(tiny_base), [[5, 6, 7]], pad_id=2).side.cache.layers
    )
    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, 3, 5, 4, generator=generator) for _ in range(2))
    given = keys.clone(), values.clone()
    layer, reference = GrowingLayer(keys, values), DynamicLayer()
    reference.update(keys, values)
    buffers = set()
    for step in range(ROOM_MIN_SLOTS + 6):
        if step == 20:
            layer.crop(-3)
            reference.crop(-3)
        new = [torch.randn(1, 3, 1 + step % 2, 4, generator=generator) for _ in range(2)]
        got, want = layer.update(*new), reference.update(*new)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        buffers.add(layer.keys.data_ptr())
    assert len(buffers) == 2  # the first update's move, then one when the room ran out
    assert torch.equal(keys, given[0]) and torch.equal(values, given[1])


def test_a_growing_layer_stores_in_its_states_dtype_and_returns_the_callers(tiny_base):
    """A layer made with bfloat16 states stores the new ones rounded to bfloat16 and returns
    the whole prefix, the new states included, widened back: what the rounded store holds."""
    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, 3, 5, 4, generator=generator) for _ in range(2))
    layer = GrowingLayer(keys.bfloat16(), values.bfloat16())
    new = [torch.randn(1, 3, 2, 4, generator=generator) for _ in range(2)]
    got_keys, got_values = layer.update(*new)
    assert got_keys.dtype == got_values.dtype == torch.float32
    assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
    want = torch.cat([keys, new[0]], 2).bfloat16().float()
    assert torch.equal(got_keys, want)
    assert not torch.equal(got_keys[:, :, -2:], new[0])  # the new states were rounded too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_side_stored_at_half_precision_feeds_alike_at_once_and_token_by_token(tiny_base, dtype):
    """Every query attends to the stored states, so three tokens fed in one forward give the
    logits that feeding them one at a time gives (to fp32 rounding), and the cache holds half
    the bytes; its logits stay close to a float32 cache's."""
    runner = _runner(tiny_base)
    prompts, tokens = [[5, 6, 7, 8, 9], [10, 11]], torch.tensor([[20, 21, 22], [30, 31, 32]])
    whole = prefill(runner, prompts, pad_id=2)
    at_once, stepwise = (prefill(runner, prompts, pad_id=2, kv_dtype=dtype).side for _ in range(2))
    assert torch.equal(whole.logits, prefill(runner, prompts, pad_id=2, kv_dtype=dtype).logits)
    assert all(layer.keys.dtype == dtype for layer in at_once.cache.layers)
    together = at_once.feed(tokens).logits
    apart = torch.cat([stepwise.feed(tokens[:, i : i + 1]).logits for i in range(3)], 1)
    assert torch.allclose(together, apart, atol=1e-5)
    exact = whole.side.feed(tokens).logits
    assert torch.allclose(together, exact, atol=0.05)
    full, half = (s.cache.layers[0].keys for s in (whole.side, at_once))
    assert half.element_size() * 2 == full.element_size() and half.shape == full.shape
    first, second = at_once.cache.layers[:2]
    assert first.widener is second.widener  # one pair of float32 buffers for every layer


def test_rows_stored_at_half_precision_leave_join_and_compact_at_it(tiny_base, monkeypatch):
    monkeypatch.setattr("ngsd_guard.sides.COMPACT_MIN_SLOTS", 2)
    runner = _runner(tiny_base)
    side = prefill(runner, [[5, 6, 7], [8, 9]], pad_id=2, kv_dtype=torch.float16).side
    side.feed(torch.tensor([[20, 21, 22], [21, 2, 2]]), torch.tensor([3, 1]))
    side.forget(0, 3)
    side.reclaim()
    side.select(torch.tensor([1, 0]))
    side.extend(prefill(runner, [[12, 13, 14, 15]], pad_id=2, kv_dtype=torch.float16).side)
    logits = side.feed(torch.tensor([[30], [31], [32]])).logits[:, -1]
    assert all(layer.keys.dtype == torch.float16 for layer in side.cache.layers)
    for row, ids in enumerate(([8, 9, 21, 30], [5, 6, 7, 31], [12, 13, 14, 15, 32])):
        assert torch.allclose(logits[row], _full(tiny_base, ids), atol=0.05)


def test_a_joint_prefill_splits_into_a_base_as_computed_and_an_expert_stored_at_half(tiny_base):
    runner = _runner(tiny_base)
    both = prefill(runner, [[5, 6, 7], [5, 6, 7]], pad_id=2)
    base, expert = split(both, 1, (runner, runner), torch.float16)
    assert base.side.cache.layers[0].keys.dtype == torch.float32
    assert expert.side.cache.layers[0].keys.dtype == torch.float16
    assert torch.equal(expert.logits, both.logits[1:])  # the prefill itself is float32


def test_the_expert_cache_dtype_setting():
    import argparse

    from ngsd_guard import GuardConfig
    from ngsd_guard.cli import add_model_options, config_from_args
    from ngsd_guard.errors import ConfigError

    assert kv_dtype("auto", torch.float32) == torch.float16
    assert kv_dtype("auto", torch.bfloat16) is None
    assert kv_dtype("float32", torch.float32) is None
    assert kv_dtype("bfloat16", torch.float32) == torch.bfloat16
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert config_from_args(parser.parse_args([])).expert_cache_dtype == "auto"
    chosen = config_from_args(parser.parse_args(["--expert-cache-dtype", "float32"]))
    assert chosen.expert_cache_dtype == "float32"
    with pytest.raises(ConfigError, match="expert_cache_dtype"):
        GuardConfig(expert_cache_dtype="int8")


def _lora(model, layers):
    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=layers,
        init_lora_weights=False,
    )
    return get_peft_model(copy.deepcopy(model), config).eval()


def test_an_adapter_on_the_upper_layers_gets_a_trunk_whose_logits_are_the_experts(tiny_base):
    """An adapter that leaves layer 0 alone: the expert's states entering layer 1 are the
    base's, so its trunk (layer 1 on, fed those states, with a cache of layer 1 only) gives
    the whole expert's logits, through a joint prefill and ragged feeds."""
    assert first_adapted_layer(_lora(tiny_base, [0, 1])) == 0
    assert Trunk.of(_runner(_lora(tiny_base, [0, 1])), _runner(tiny_base)) is None
    expert = _lora(tiny_base, [1])
    assert first_adapted_layer(expert) == 1
    lora, base = _runner(expert), _runner(without_adapters(expert))
    trunk = Trunk.of(lora, base)
    assert trunk is not None and trunk.first_layer == 1

    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    both = prefill(
        lora, prompts * 2, pad_id=2, adapter_names=["__base__"] * 2 + ["default"] * 2, hidden_at=1
    )
    base_half, upper = split(both, 2, (base, trunk))
    whole = prefill(lora, prompts, pad_id=2).side  # the whole expert, every layer
    assert len(upper.side.cache.layers) == 1 and len(whole.cache.layers) == 2
    for row, prompt in enumerate(prompts):
        assert torch.allclose(upper.logits[row], _full(expert, prompt), atol=1e-4)
    tokens, lengths = torch.tensor([[20, 21, 22], [30, 2, 2]]), torch.tensor([3, 1])
    fed = base_half.side.feed(tokens, lengths, hidden_at=1)  # the base's states at the tokens
    assert fed.hidden is not None and fed.hidden.shape == (2, 3, tiny_base.config.hidden_size)
    formed = upper.side.feed_outputs(fed.hidden, lengths)
    expected = whole.feed_outputs(tokens, lengths)
    rows, positions = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(
        formed.logits(rows, positions), expected.logits(rows, positions), atol=1e-5
    )
    assert torch.allclose(
        formed.logits(torch.tensor([0]), torch.tensor([2]))[0],
        _full(expert, [5, 6, 7, 8, 9, 20, 21, 22]),
        atol=1e-4,
    )
