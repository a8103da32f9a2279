"""Bad input gets a clear error naming the problem, and the instance keeps working."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ngsd_guard import (
    ConfigError,
    ContextTooLongError,
    GateConfig,
    GuardConfig,
    GuardedLM,
    IncompatibleTokenizerError,
    InterventionConfig,
    ModelNotFoundError,
    PromptError,
)
from ngsd_guard.loading import default_model_dir, resolve_device


@pytest.fixture(scope="module")
def lm(tiny_base, tiny_expert, tokenizer):
    return GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_expert)


def still_works(lm):
    assert lm.generate("Hello there", max_new_tokens=3).summary.tokens == 3


@pytest.mark.parametrize("prompt", ["", "   ", []])
def test_empty_prompt(lm, prompt):
    with pytest.raises(PromptError, match="empty"):
        lm.generate(prompt)
    still_works(lm)


def test_prompt_longer_than_context(lm):
    with pytest.raises(ContextTooLongError, match="context window") as error:
        lm.generate("word " * 400)  # the tiny model's window is 256 tokens
    assert "256" in str(error.value)
    still_works(lm)


def test_budget_is_clipped_to_the_context(lm):
    result = lm.generate("word " * 200, max_new_tokens=500)
    assert result.summary.tokens + result.summary.prompt_tokens <= 256


def test_constrained_budget_is_not_clipped_silently(lm, tokenizer):
    """A grammar closes its output within the budget it was given: a prompt that leaves less
    room than that budget is an error, not a JSON value cut off at the window."""
    from ngsd_guard.tools import JsonConstraint

    constraint = JsonConstraint(tokenizer, {"type": "object"}, max_tokens=64)
    with pytest.raises(ContextTooLongError, match="leaves .* fewer than the constrained"):
        lm.generate("word " * 200, max_new_tokens=64, constraint=constraint)
    still_works(lm)
    answer = lm.generate("word " * 20, max_new_tokens=64, constraint=constraint)
    assert answer.text.startswith("{") and answer.finish_reason == "stop"


@pytest.mark.parametrize("device", ["tpu", "cuda:0", "nonsense"])
def test_unknown_or_missing_device(device):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="device"):
        resolve_device(device)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: GateConfig(tau=0), "tau"),
        (lambda: GateConfig(tau=-2), "tau"),
        (lambda: InterventionConfig(alpha=1.5), "alpha"),
        (lambda: InterventionConfig(alpha=-0.1), "alpha"),
        (lambda: GuardConfig(window=0), "window"),
        (lambda: GuardConfig(divergence="hellinger"), "divergence"),
    ],
)
def test_invalid_config_values(factory, field):
    with pytest.raises(ConfigError, match=field):
        factory()


def test_invalid_call_options(lm):
    with pytest.raises(ConfigError, match="alpha"):
        lm.generate("hi", alpha=2.0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        lm.generate("hi", max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        lm.generate("hi", temperature=-1.0)
    still_works(lm)


def test_missing_adapter(tmp_path):
    with pytest.raises(ModelNotFoundError, match="adapter"):
        GuardedLM.from_pretrained(default_model_dir(), adapter=tmp_path / "nope")


def test_missing_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nothing is downloaded"):
        GuardedLM.from_pretrained(tmp_path / "no-such-model")


def test_mismatched_tokenizers(tiny_base, tiny_expert, tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<unk>")
    with pytest.raises(IncompatibleTokenizerError, match="tokenizer"):
        GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_expert, expert_tokenizer=other)
    same = AutoTokenizer.from_pretrained(default_model_dir())
    assert GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_expert, expert_tokenizer=same)


def test_raw_needs_a_string(lm):
    with pytest.raises(PromptError, match="raw"):
        lm.generate([{"role": "user", "content": "hi"}], raw=True)
