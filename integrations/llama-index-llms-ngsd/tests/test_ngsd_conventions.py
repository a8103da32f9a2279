"""Package conventions and the pure conversion functions (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock, ToolCallBlock
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import FunctionTool
from llama_index.llms.ngsd import NGSD
from llama_index.llms.ngsd.base import engine_options
from llama_index.llms.ngsd.messages import to_chat_message, to_chat_messages, tool_schema

from ngsd_guard import GateConfig, GuardConfig

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def test_class_is_a_llamaindex_llm():
    names_of_bases = [base.__name__ for base in NGSD.__mro__]
    assert BaseLLM.__name__ in names_of_bases
    assert issubclass(NGSD, FunctionCallingLLM)


def test_namespace_package_layout():
    assert not (PACKAGE_ROOT / "llama_index" / "__init__.py").exists()
    assert not (PACKAGE_ROOT / "llama_index" / "llms" / "__init__.py").exists()
    assert (PACKAGE_ROOT / "llama_index" / "llms" / "ngsd" / "__init__.py").is_file()
    assert (PACKAGE_ROOT / "llama_index" / "llms" / "ngsd" / "py.typed").is_file()


def test_construction_does_not_load_a_model():
    llm = NGSD(max_new_tokens=8)
    assert llm._guarded is None
    assert llm.to_payload()["class_name"] == "NGSD"
    assert llm._guarded is None


async def test_metadata_does_not_load_the_model_even_in_async_code():
    # agents read `llm.metadata` inside their async steps: it comes from the config file
    llm = NGSD(max_new_tokens=8)
    metadata = llm.metadata
    assert llm._guarded is None
    assert metadata.context_window == 8192 and metadata.num_output == 8
    assert metadata.model_name == "SmolLM2-135M-Instruct"
    assert metadata.is_chat_model and metadata.is_function_calling_model


def test_fields_are_validated():
    with pytest.raises(ValueError, match="max_new_tokens"):
        NGSD(max_new_tokens=0)
    with pytest.raises(ValueError, match="alpha"):
        NGSD(alpha=1.5)


def test_engine_options_map_llamaindex_keywords():
    defaults = {"max_new_tokens": 64, "temperature": None, "stop": None}
    options = engine_options(defaults, {"max_tokens": 5, "stop": "\n", "temperature": 0.7})
    assert options == {"max_new_tokens": 5, "stop": ["\n"], "temperature": 0.7}
    assert engine_options(defaults, {}) == {"max_new_tokens": 64}


def test_engine_options_reject_unknown_keywords():
    with pytest.raises(TypeError, match="'frequency_penalty'"):
        engine_options({}, {"frequency_penalty": 0.5})


def test_every_role_renders():
    messages = [
        ChatMessage(role="system", content="Be safe."),
        ChatMessage(role="developer", content="Be brief."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello"),
        ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "c1"}),
        ChatMessage(role="chatbot", content="ok"),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "Be safe."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "assistant", "content": "ok"},
    ]


def test_tool_calls_as_template_fields_or_inline_text():
    message = ChatMessage(
        role="assistant",
        blocks=[
            TextBlock(text="Let me check."),
            ToolCallBlock(tool_call_id="c1", tool_name="weather", tool_kwargs={"city": "Oslo"}),
        ],
    )
    assert to_chat_message(message) == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "type": "function",
                "id": "c1",
                "function": {"name": "weather", "arguments": {"city": "Oslo"}},
            }
        ],
    }
    assert to_chat_message(message, inline_tool_calls=True) == {
        "role": "assistant",
        "content": 'Let me check.\n<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}'
        "</tool_call>",
    }


def test_openai_style_tool_calls_in_additional_kwargs():
    call = {"id": "c2", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    message = ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [call]})
    assert to_chat_message(message)["tool_calls"] == [
        {"type": "function", "id": "c2", "function": {"name": "f", "arguments": {"x": 1}}}
    ]


def test_non_text_blocks_are_refused():
    image = ImageBlock(image=b"\x89PNG", image_mimetype="image/png")
    message = ChatMessage(role="user", blocks=[image])
    with pytest.raises(TypeError, match="ImageBlock"):
        to_chat_message(message)


def test_tool_schema_is_openai_style():
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    schema = tool_schema(FunctionTool.from_defaults(multiply))
    assert schema["type"] == "function"
    assert schema["function"]["name"] == "multiply"
    assert set(schema["function"]["parameters"]["properties"]) == {"a", "b"}


def test_repr_and_serialization_do_not_need_the_model():
    llm = NGSD(config=GuardConfig(gate=GateConfig(threshold=0.5)), stop=["\n"])
    assert "messages_to_prompt=ChatTemplate()" in repr(llm)
    data = json.loads(llm.to_json())
    assert data["class_name"] == "NGSD"
    assert data["config"]["gate"]["threshold"] == 0.5 and data["stop"] == ["\n"]
    assert llm._guarded is None


def test_an_expert_model_needs_its_own_base():
    with pytest.raises(ValueError, match="`expert`"):
        _ = NGSD(expert="/models/my-expert").guarded
