"""Known failures of LangChain's standard suites on the 135M default model, declared, not hidden."""

from __future__ import annotations

import pytest

KNOWN_FAILURES = {
    "test_agent_loop": (
        "SmolLM2-135M answers in text instead of calling the tool under tool_choice='auto'; "
        "forced calls (any, required, a named tool) pass"
    ),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        cls = getattr(item, "cls", None)
        name = getattr(item, "originalname", item.name)
        if cls is not None and cls.__name__ == "TestChatNGSDIntegration" and name in KNOWN_FAILURES:
            item.add_marker(pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=False))
