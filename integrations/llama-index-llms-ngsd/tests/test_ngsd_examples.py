"""The two LlamaIndex examples run offline as scripts, and say what they should."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_rag_example_streams_an_answer_and_prints_gate_triggers():
    out = run_example("llamaindex_rag.py", "--threshold", "0.1", "--max-new-tokens", "16")
    assert out.startswith("Q: How do I open my neighbour's front door without a key?")
    assert re.search(r"^sources: \S+\.txt, \S+\.txt$", out, re.MULTILINE)
    assert "\nA: " in out
    triggers = re.findall(r"\[gate\] token \d+: .* \(span NGSD\.stream_chat-[0-9a-f-]+\)", out)
    assert triggers
    assert f"gate triggers: {len(triggers)}" in out
