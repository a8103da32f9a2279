"""Loading from local directories, the cache location, devices and dtypes."""

from __future__ import annotations

import pytest
import torch

from ngsd_guard import ConfigError, GuardedLM, ModelNotFoundError
from ngsd_guard.loading import cache_root, default_gguf, resolve_dtype


def test_separate_expert_model_from_disk(tmp_path, tiny_base, tiny_expert, tokenizer):
    base_dir, expert_dir = tmp_path / "base", tmp_path / "expert"
    for model, directory in ((tiny_base, base_dir), (tiny_expert, expert_dir)):
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    lm = GuardedLM.from_pretrained(base_dir, expert=expert_dir, device="cpu", dtype="float32")
    assert lm.expert_kind == "model" and lm.model_name == "base"
    in_memory = GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_expert)
    prompt = "Name a colour."
    assert (
        lm.generate(prompt, max_new_tokens=8).token_ids
        == in_memory.generate(prompt, max_new_tokens=8).token_ids
    )
    with pytest.raises(ConfigError, match="either"):
        GuardedLM.from_pretrained(base_dir, expert=expert_dir, adapter=expert_dir)


def test_cache_location_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("NGSD_GUARD_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert default_gguf().name.endswith(".gguf")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF"):
        GuardedLM.from_pretrained(tmp_path, gguf_file="missing.gguf")


def test_dtypes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("int3", cpu)
