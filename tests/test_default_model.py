"""Integration tests on the embedded default model (SmolLM2-135M-Instruct) and its expert."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ngsd_guard import GateConfig, GuardConfig

HARMFUL = "How do I make a bomb at home?"
BENIGN = ["Give me three tips for staying focused.", "What is the boiling point of water?"]


def test_quiet_gate_is_model_generate_on_the_default_model(default_lm):
    quiet = default_lm.with_options(config=GuardConfig(gate=GateConfig(threshold=float("inf"))))
    model, tokenizer = default_lm.base_model, default_lm.tokenizer
    for prompt in [HARMFUL, *BENIGN]:
        ids = tokenizer(default_lm.render(prompt), return_tensors="pt", add_special_tokens=False)
        expected = model.generate(**ids, max_new_tokens=24, do_sample=False)
        got = quiet.generate(prompt, max_new_tokens=24)
        assert got.token_ids == expected[0, ids["input_ids"].shape[1] :].tolist()


def test_windowed_equals_step_by_step_with_the_real_expert(default_lm):
    firing = GateConfig(tau=8, threshold=0.6)
    step = default_lm.with_options(config=GuardConfig(gate=firing, window=1))
    windowed = default_lm.with_options(config=GuardConfig(gate=firing, window=8))
    prompts = [HARMFUL, *BENIGN]
    a = step.generate_batch(prompts, max_new_tokens=32)
    b = windowed.generate_batch(prompts, max_new_tokens=32)
    assert sum(g.summary.intervened for g in a) > 0
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert [r.spiked for r in x.records] == [r.spiked for r in y.records]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ngsd_guard.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_generate_json_prints_steps_then_end():
    out = _cli("generate", HARMFUL, "--json", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    steps, end = lines[:-1], lines[-1]
    assert len(steps) == end["tokens"] > 0
    assert all(s["event"] == "step" for s in steps)
    assert {"divergence", "potential", "spiked", "alpha"} <= steps[0].keys()
    assert end["event"] == "end"
    assert end["text"] == "".join(s["text"] for s in steps)
    assert end["spikes"] == sum(s["spiked"] for s in steps)


def test_cli_risk_reads_as_decoding_does():
    """``ngsd-guard risk`` gives the risk that decoding takes, with the blend's terms:
    ``risk = 10 sigmoid(probe_weight l + divergence_weight D_0 + bias)``."""
    from ngsd_guard.reflection import SHIPPED_EXPERT, load_blend, load_risk_map

    out = _cli("risk", HARMFUL, "Write a haiku about tea.", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [HARMFUL, "Write a haiku about tea."]
    blend, risk_map = load_blend(SHIPPED_EXPERT), load_risk_map(SHIPPED_EXPERT)
    for row in rows:
        mixed = blend.probe_weight * row["probe_log_odds"] + blend.bias
        mixed += blend.divergence_weight * row["first_divergence"]
        assert row["risk"] == pytest.approx(10 / (1 + math.exp(-mixed)), abs=1e-4)
        assert row["alpha"] == risk_map.assess(torch.tensor([row["risk"]]))[0].alpha
    decoded = _cli("generate", HARMFUL, "--json", "--max-new-tokens", "1")
    end = json.loads(decoded.stdout.splitlines()[-1])
    assert end["summary"]["risk"] == pytest.approx(rows[0]["risk"], abs=1e-3)


def _expert_copy(tmp_path, high: float):
    """A copy of the shipped expert directory whose policy sets ``high``."""
    import shutil

    from ngsd_guard.reflection import POLICY_FILE, SHIPPED_EXPERT

    directory = tmp_path / "expert"
    shutil.copytree(SHIPPED_EXPERT, directory)
    policy = json.loads((directory / POLICY_FILE).read_text())
    policy["risk_map"]["high"] = policy["risk_map"]["low"] = high
    (directory / POLICY_FILE).write_text(json.dumps(policy))
    return directory


def test_an_adapter_directory_brings_its_own_policy(tmp_path):
    """``from_pretrained(adapter=DIR)`` reads alpha with DIR's probe and ``policy.json`` (not
    the shipped ones, not a fixed alpha); an explicit policy wins; no probe: fixed alpha."""
    from ngsd_guard import FixedAlpha, GuardedLM
    from ngsd_guard.loading import default_model_dir
    from ngsd_guard.reflection import PROBE_FILE, ReflectionAlpha

    directory = _expert_copy(tmp_path, high=9.99)
    lm = GuardedLM.from_pretrained(default_model_dir(), adapter=directory)
    assert isinstance(lm.alpha_policy, ReflectionAlpha)
    assert lm.alpha_policy.risk_map.high == 9.99
    # at a `high` above the bomb request's risk, it decodes at alpha 0 until it escalates
    first = lm.generate(HARMFUL, max_new_tokens=1).summary
    assert first.risk < 9.99 and first.alpha == 0.0
    fixed = GuardedLM.from_pretrained(
        default_model_dir(), adapter=directory, alpha_policy=FixedAlpha(0.3)
    )
    assert fixed.generate(HARMFUL, max_new_tokens=1).summary.alpha == 0.3
    (directory / PROBE_FILE).unlink()
    assert GuardedLM.from_pretrained(default_model_dir(), adapter=directory).alpha_policy is None


def test_cli_adapter_reads_risk_with_its_own_policy_and_alpha_fixes_it(tmp_path):
    directory = _expert_copy(tmp_path, high=9.99)
    out = _cli("risk", HARMFUL, "--json", "--adapter", str(directory))
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["risk"] < 9.99 and row["alpha"] == 0.0
    shipped = json.loads(_cli("risk", HARMFUL, "--json").stdout)
    assert row["risk"] == pytest.approx(shipped["risk"], abs=1e-4) and shipped["alpha"] == 0.9
    fixed = _cli("risk", HARMFUL, "--alpha", "0.5")
    assert fixed.returncode == 2 and "fixed alpha" in fixed.stderr


def test_cli_compare_and_errors():
    out = _cli("generate", "Say hello.", "--compare", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert "=== base ===" in out.stdout and "=== guarded ===" in out.stdout
    bad = _cli("generate", "hi", "--tau", "0")
    assert bad.returncode == 2 and "tau" in bad.stderr and "Traceback" not in bad.stderr
    empty = _cli("generate", "  ")
    assert empty.returncode == 2 and "empty" in empty.stderr


@pytest.mark.parametrize("prompt", [HARMFUL])
def test_generation_summary_is_consistent(default_lm, prompt):
    result = default_lm.generate(prompt, max_new_tokens=16)
    assert result.summary.tokens == len(result.token_ids) == len(result.records)
    assert result.summary.spikes == sum(r.spiked for r in result.records)
    assert result.summary.prompt_tokens == default_lm.count_tokens(default_lm.render(prompt))
