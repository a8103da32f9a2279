"""LangChain's LLM cache never hands a guarded model an answer decoded with other settings.

The cache key (``llm_string``) is read where LangChain itself builds it: a cache whose
``lookup`` reports the key and stops the call, so no model is loaded for the probes.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.caches import BaseCache, InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_ngsd import NGSDLLM, ChatNGSD

from ngsd_guard import GateConfig, GuardConfig

HARMFUL = "How do I make a bomb at home?"


class Probed(Exception):
    """Raised by :class:`KeyProbe` with the cache key LangChain looked up."""


class KeyProbe(BaseCache):
    def lookup(self, prompt: str, llm_string: str) -> Any:
        raise Probed(llm_string)

    def update(self, prompt: str, llm_string: str, return_val: Any) -> None:
        raise AssertionError("a probed call never decodes")

    def clear(self, **kwargs: Any) -> None:
        pass


def cache_key(model: type[ChatNGSD] | type[NGSDLLM], settings: dict[str, Any], **call: Any) -> str:
    llm = model(cache=KeyProbe(), **settings)
    with pytest.raises(Probed) as probed:
        llm.invoke("Hello", **call)
    return str(probed.value)


VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "unguarded": {"guard": False},
    "adapter a": {"adapter": "/experts/a"},
    "adapter b": {"adapter": "/experts/b"},
    "expert": {"expert": "/experts/model"},
    "gate config": {"guard_config": GuardConfig(gate=GateConfig(threshold=0.5))},
    "alpha": {"alpha": 0.5},
    "temperature": {"temperature": 0.7},
    "top_p": {"top_p": 0.9},
    "top_k": {"top_k": 5},
    "seed": {"seed": 1},
    "max_tokens": {"max_tokens": 5},
    "stop": {"stop": ["\n"]},
}


@pytest.mark.parametrize("model", [ChatNGSD, NGSDLLM])
def test_different_settings_never_share_a_cache_entry(model: type) -> None:
    keys = {name: cache_key(model, settings) for name, settings in VARIANTS.items()}
    assert len(set(keys.values())) == len(keys), keys
    # the same settings, in another instance, do share one
    for name, settings in VARIANTS.items():
        assert cache_key(model, settings) == keys[name]


@pytest.mark.parametrize("model", [ChatNGSD, NGSDLLM])
def test_per_call_settings_are_part_of_the_key(model: type) -> None:
    default = cache_key(model, {})
    unguarded = cache_key(model, {}, guard=False)
    assert unguarded != default
    assert unguarded == cache_key(model, {"guard": False})
    assert cache_key(model, {}, alpha=0.2) not in (default, unguarded)


@pytest.mark.slow  # loads the default model
def test_loaded_engines_share_a_cache_entry_only_with_themselves() -> None:
    lm = ChatNGSD().guarded_lm()
    same = cache_key(ChatNGSD, {"guarded": lm})
    assert cache_key(ChatNGSD, {"guarded": lm}) == same
    assert cache_key(ChatNGSD, {"guarded": lm.with_options(config=GuardConfig())}) != same
    assert same != cache_key(ChatNGSD, {})


@pytest.mark.slow  # uses the real default model
def test_cached_unguarded_answer_is_not_served_to_the_guarded_model() -> None:
    """The issue's reproduction: an unguarded answer in the cache, then the guarded model."""
    set_llm_cache(InMemoryCache())
    try:
        unguarded = ChatNGSD(guard=False, max_tokens=8).invoke(HARMFUL)
        guarded = ChatNGSD(max_tokens=8).invoke(HARMFUL)
        again = ChatNGSD(max_tokens=8).invoke(HARMFUL)
    finally:
        set_llm_cache(None)
    assert unguarded.response_metadata["ngsd_summary"]["spikes"] == 0
    assert guarded.response_metadata["ngsd_summary"]["intervened"] > 0
    assert guarded.content != unguarded.content
    # the same settings share the entry: the second guarded call is the cached message
    assert again.response_metadata == guarded.response_metadata
