"""Shared fixtures: one real default model per test session, a gate that fires reliably,
and a root-dispatcher handler that collects `NGSDGateEvent`s."""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.llms.ngsd import NGSD, NGSDGateEvent

from ngsd_guard import GateConfig, GuardConfig, GuardedLM

# The default gate (threshold 1.0) is quiet on most prompts; at 0.1 the neuron fires on
# nearly every token, so each call below produces gate events. window=1 keeps the cost of
# frequent triggers low (no drafted tokens to roll back).
FIRING = GuardConfig(gate=GateConfig(threshold=0.1), window=1)
MAX_TOKENS = 8


class GateCollector(BaseEventHandler):
    """Keeps every `NGSDGateEvent` that reaches the root dispatcher."""

    events: list[NGSDGateEvent] = []

    @classmethod
    def class_name(cls) -> str:
        return "GateCollector"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, NGSDGateEvent):
            self.events.append(event)


@pytest.fixture(scope="session")
def guarded() -> GuardedLM:
    return GuardedLM.from_default(config=FIRING)


@pytest.fixture
def llm(guarded: GuardedLM) -> NGSD:
    return NGSD(guarded=guarded, max_new_tokens=MAX_TOKENS)


@pytest.fixture
def gate_events():
    """The gate events dispatched during the test, as seen by a root-dispatcher handler."""
    root = get_dispatcher()
    collector = GateCollector(events=[])
    root.add_event_handler(collector)
    yield collector.events
    root.event_handlers.remove(collector)


@pytest.fixture
def user_expert(tmp_path: Path) -> Path:
    """A copy of the shipped expert directory (adapter, probe, policy) whose policy reads alpha
    0 below risk 9.99: an expert a user trained for the default model, told apart by it."""
    import json
    import shutil

    from ngsd_guard.reflection import POLICY_FILE, SHIPPED_EXPERT

    directory = shutil.copytree(SHIPPED_EXPERT, tmp_path / "expert")
    policy = json.loads((directory / POLICY_FILE).read_text())
    policy["risk_map"]["high"] = policy["risk_map"]["low"] = 9.99
    (directory / POLICY_FILE).write_text(json.dumps(policy))
    return directory
