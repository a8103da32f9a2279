"""Shared fixtures: the real tokenizer, tiny random models, the default model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ngsd_guard import GuardedLM
from ngsd_guard.loading import default_model_dir


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


def tiny_llama(seed: int, vocab_size: int = 49152) -> LlamaForCausalLM:
    """A 2-layer random Llama with peaked distributions (large init), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_base():
    return tiny_llama(0)


@pytest.fixture(scope="session")
def tiny_expert():
    return tiny_llama(1)


@pytest.fixture(scope="session")
def default_lm() -> GuardedLM:
    return GuardedLM.from_default()
