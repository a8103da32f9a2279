"""``ngsd-guard bench`` on tiny models: its reference decoding and the report's shape."""

from __future__ import annotations

import json
import logging

from tiny_models import tiny_llama

from ngsd_guard import GateConfig, GuardConfig, GuardedLM
from ngsd_guard.bench import BENCH_PROMPTS, reference_generate
from ngsd_guard.cli import main

MEASURED = ("streaming", "agent", "batch", "reference", "delays")


def test_reference_decoding_gives_the_engines_tokens(tiny_base, tiny_expert, tokenizer):
    """The paper's decoding style (no cache, both models over the whole prefix) that the
    bench times the engine against decodes the same tokens, spikes included."""
    config = GuardConfig(gate=GateConfig(tau=4, threshold=1.5))
    lm = GuardedLM.from_models(tiny_base, tokenizer, expert=tiny_expert, config=config)
    intervened = 0
    for prompt in BENCH_PROMPTS[:2]:
        got = lm.generate(prompt, max_new_tokens=16, alpha=0.7)
        assert reference_generate(lm, prompt, 16, 0.7) == got.token_ids
        intervened += got.summary.intervened
    assert intervened > 0


def test_bench_reports_every_ratio_against_the_base(tokenizer, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="ngsd_guard.bench")
    model_dir = tmp_path / "tiny"
    tiny_llama(0, max_positions=1024).save_pretrained(model_dir)  # room for the agent's prompt
    tokenizer.save_pretrained(model_dir)
    args = ["bench", "--model", str(model_dir), "--device", "cpu", "--json", "--repeats", "1"]
    args += ["--lengths", "8", "--batch-size", "2", "--batch-tokens", "4"]
    args += ["--reference-tokens", "6", "--delays", "none,0.05", "--delay-tokens", "6"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == "untrained" and report["expert_kind"] == "lora"
    assert report["expert_first_layer"] == 0  # an untrained adapter on every layer
    assert report["expert_cache_dtype"] == "auto"
    streaming = report["streaming"]
    for key in ("ttft_ratio", "max_gap_ratio", "time_ratio"):
        assert streaming[key] > 0
    (length,) = report["lengths"]
    assert length["max_new_tokens"] == 8 and length["time_ratio"] > 0
    assert length["base_peak_mb"] > 0 and length["memory_ratio"] > 0
    batch = report["batch"]
    assert batch["throughput_ratio"] > 0 and batch["base_peak_mb"] > 0 and batch["memory_ratio"] > 0
    agent = report["agent"]
    assert agent["prompt_tokens"] > 300  # a system prompt and tool schemas
    assert agent["ttft_ratio"] > 0 and agent["uncached_ttft_ratio"] > 0
    reference = report["reference"]
    assert reference["reference_tokens"] == reference["guarded_tokens"] > 0
    assert reference["same_tokens"] is True
    assert reference["speedup"] > 0
    assert [d["max_stream_delay"] for d in report["delays"]] == [None, 0.05]
    # each figure is logged as it is measured, so a run cut short still tells what it had
    logged = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "ngsd_guard.bench"]
    assert logged == [f"lora, {name}" for name in ("8 new tokens", *MEASURED)]
