"""Shared fixtures: the real tokenizer, tiny random models, the default model."""

from __future__ import annotations

import pytest
from tiny_models import tiny_llama
from transformers import AutoTokenizer

from ngsd_guard import GuardedLM
from ngsd_guard.loading import default_model_dir


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="session")
def tiny_base():
    return tiny_llama(0)


@pytest.fixture(scope="session")
def tiny_expert():
    return tiny_llama(1)


@pytest.fixture(scope="session")
def default_lm() -> GuardedLM:
    return GuardedLM.from_default()
