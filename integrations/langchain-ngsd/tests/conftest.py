"""Known failures of LangChain's standard suites on the 135M default model, declared, not hidden."""

from __future__ import annotations

from pathlib import Path

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
