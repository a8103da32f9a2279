"""Prompt headers computed once: where a prompt splits, the LRU cache, and that decoding over
cached headers gives the tokens of whole-prompt prefills while feeding fewer tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ngsd_guard import GateConfig, GuardConfig, GuardedLM
from ngsd_guard.experts import ModelHandle, Runner
from ngsd_guard.prefixes import PrefixCache, expert_header_length, header_length


def _runner(model) -> Runner:
    return Runner(ModelHandle(model), model.config.vocab_size, torch.device("cpu"))


def test_a_prompt_splits_before_its_last_user_message_and_keeps_a_token_to_feed():
    assert header_length([1, 2, 3, 4], (2, 3)) == 2
    assert header_length([1, 2, 3, 4], None) == 0
    assert header_length([1, 2, 3, 4], (4, 4)) == 3
    assert expert_header_length([1, 2, 3, 4], [1, 2, 3, 4], 2) == 2
    assert expert_header_length([1, 2, 3, 4], [7, 8, 9, 3, 4], 2) == 3  # under a safety prompt
    assert expert_header_length([1, 2, 3, 4], [7, 3, 5], 2) == 0  # the rests differ
    assert expert_header_length([1, 2, 3, 4], [1, 2, 3, 4], 0) == 0


def test_the_cache_keeps_headers_least_recently_used_out_within_its_budget(tiny_base):
    runner = _runner(tiny_base)
    cache = PrefixCache(max_tokens=6)
    first = cache.header("base", runner, [5, 6, 7])
    assert cache.header("base", runner, [5, 6, 7]) is first  # kept, not computed again
    assert cache.header("expert", runner, [5, 6, 7]) is not first  # each side its own
    assert cache.tokens == 6
    cache.header("base", runner, [5, 6, 7])  # now the most recently used
    cache.header("base", runner, [8, 9])
    assert cache.tokens == 5  # the expert's header left first
    assert cache.header("base", runner, [5, 6, 7]) is first
    long = cache.header("base", runner, list(range(10, 20)))
    assert long is not None and long.length == 10 and cache.tokens == 5  # used, not kept
    assert cache.header("base", runner, []) is None
    assert len(first.states) == tiny_base.config.num_hidden_layers
    assert first.states[0][0].shape[2] == 3  # (1, H, P, D)


def _fed_tokens(monkeypatch) -> list[int]:
    fed: list[int] = []
    forward = Runner.forward

    def counting(self, input_ids, *args, **kwargs):
        fed.append(int(input_ids.numel()))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Runner, "forward", counting)
    return fed


def _experts(tiny_base, tiny_expert):
    lora = get_peft_model(
        copy.deepcopy(tiny_base),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    return {
        "lora": (lora, None),
        "model": (tiny_base, tiny_expert),
        "prompted": (tiny_base, None),
    }


@pytest.mark.parametrize("kind", ["lora", "model", "prompted"])
def test_cached_headers_give_the_tokens_of_whole_prompts_and_feed_fewer(
    kind, tiny_base, tiny_expert, tokenizer, monkeypatch
):
    base, expert = _experts(tiny_base, tiny_expert)[kind]
    conversation = [
        {"role": "system", "content": "You are a terse assistant for a travel agency."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a story about a dragon."},
    ]
    gate = GateConfig(tau=4, threshold=0.5)

    def guarded(tokens: int) -> GuardedLM:
        config = GuardConfig(gate=gate, window=4, prefix_cache_tokens=tokens)
        return GuardedLM.from_models(base, tokenizer, expert=expert, config=config)

    whole = guarded(0).generate(conversation, max_new_tokens=12, alpha=0.9)
    lm = guarded(4096)
    fed = _fed_tokens(monkeypatch)
    first = lm.generate(conversation, max_new_tokens=12, alpha=0.9)
    first_fed, fed[:] = list(fed), []
    second = lm.generate(conversation, max_new_tokens=12, alpha=0.9)
    second_fed = list(fed)
    batch = lm.generate_batch([conversation, "Hi"], max_new_tokens=12, alpha=0.9)
    assert first.token_ids == second.token_ids == batch[0].token_ids == whole.token_ids
    assert [r.spiked for r in first.records] == [r.spiked for r in whole.records]
    prompt = lm.encode_prompt(conversation, locate_request=True)
    header = prompt.span[0]  # the system prompt and the first exchange
    expert_header = len(prompt.expert) - (len(prompt.base) - header)
    assert header > 20
    rest = 2 * (len(prompt.base) - header) if kind == "lora" else len(prompt.base) - header
    assert first_fed[:3] == [header, expert_header, rest]  # each header alone, then the rests
    assert second_fed[0] == rest and max(second_fed) < header  # the headers were kept


def test_options_share_the_cache_and_the_flag_sets_its_budget(tiny_base, tokenizer, monkeypatch):
    import argparse

    from ngsd_guard.cli import add_model_options, config_from_args

    lm = GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_base)
    lm.generate("Hi", max_new_tokens=2)
    fed = _fed_tokens(monkeypatch)
    lm.with_options(config=lm.config.model_copy(update={"window": 2})).generate(
        "Hi", max_new_tokens=2
    )
    header = lm.encode_prompt("Hi", locate_request=True).span[0]
    assert header > 0 and max(fed) < header  # the same models: the same cache
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert config_from_args(parser.parse_args([])).prefix_cache_tokens == 4096
    assert (
        config_from_args(parser.parse_args(["--prefix-cache-tokens", "0"])).prefix_cache_tokens == 0
    )
