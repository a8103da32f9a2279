"""LangChain's own standard test suites, run against ChatNGSD on the embedded default model.

Nothing is overridden: only the capability flags are declared (honestly) and ``max_tokens`` is
kept small so the suites run in minutes on a CPU. ``max_tokens=64`` leaves room for a forced
tool call with a unicode argument.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_ngsd import ChatNGSD
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

PARAMS: dict[str, Any] = {"max_tokens": 64}


class TestChatNGSDUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatNGSD]:
        return ChatNGSD

    @property
    def supports_json_mode(self) -> bool:
        return True


@pytest.mark.slow  # uses the real default model
class TestChatNGSDIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatNGSD]:
        return ChatNGSD

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return PARAMS

    @property
    def supports_json_mode(self) -> bool:
        return True
