"""Tiny random models over the real vocabulary, for fast unit tests."""

from __future__ import annotations

import torch
from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

SIZES = {
    "vocab_size": 49152,  # the real tokenizer's
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""The shapes every tiny model shares."""


def tiny_llama(
    seed: int, *, max_positions: int = 256, tie_embeddings: bool = False
) -> LlamaForCausalLM:
    """A 2-layer random Llama with peaked distributions (large init), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        **SIZES,
        num_hidden_layers=2,
        max_position_embeddings=max_positions,
        initializer_range=0.3,
        tie_word_embeddings=tie_embeddings,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_cohere(seed: int) -> CohereForCausalLM:
    """A 1-layer random Cohere model: its logits are the output layer's, scaled."""
    torch.manual_seed(seed)
    config = CohereConfig(**SIZES, num_hidden_layers=1, logit_scale=0.0625)
    return CohereForCausalLM(config).eval()
