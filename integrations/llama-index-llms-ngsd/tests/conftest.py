"""Shared fixtures: one real default model per test session, a gate that fires reliably,
and a root-dispatcher handler that collects `NGSDGateEvent`s."""

from __future__ import annotations

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
