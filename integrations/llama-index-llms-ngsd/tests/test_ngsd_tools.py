"""Tool calling on the real default model: schemas in the prompt, constrained forced calls,
parsed `ToolSelection`s, structured output, and a `FunctionAgent` run with gate events."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, TextBlock, ToolCallBlock
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.ngsd import NGSD
from pydantic import BaseModel

from ngsd_guard import GateConfig, GuardConfig, GuardedLM

pytestmark = pytest.mark.slow


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


def weather(city: str) -> str:
    """Tell the weather in a city."""
    return f"It is sunny in {city}."


TOOLS = [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(weather)]
CALL_TOKENS = 40
"""A budget that holds the shortest forced call of these tools (about 34 tokens); a smaller
one is a ConfigError before decoding."""


def test_tool_schemas_and_earlier_calls_reach_the_prompt(llm):
    history = [
        ChatMessage(role="user", content="What is 2 times 3?"),
        ChatMessage(
            role="assistant",
            blocks=[
                TextBlock(text=""),
                ToolCallBlock(
                    tool_call_id="c1", tool_name="multiply", tool_kwargs={"a": 2, "b": 3}
                ),
            ],
        ),
        ChatMessage(role="tool", content="6", additional_kwargs={"tool_call_id": "c1"}),
    ]
    kwargs = llm._prepare_chat_with_tools(TOOLS, chat_history=history)
    assert kwargs["messages"] == history and kwargs["messages"] is not history
    prompt = llm.guarded.render(llm._to_chat(history), tools=kwargs["tools"])
    assert '"name": "multiply"' in prompt and '"name": "weather"' in prompt  # the schemas
    call = '<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in prompt
    assert "<|im_start|>tool\n6<|im_end|>" in prompt


def test_tool_required_constrains_decoding_to_a_valid_call(llm):
    # a forced call must fit its budget (the engine's rule, ngsd_guard.tools.plan_tools)
    response = llm.chat_with_tools(
        TOOLS, "What is 6 times 7?", tool_required=True, max_tokens=CALL_TOKENS
    )
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name in {"multiply", "weather"}
    assert selection.tool_id.startswith("call_")
    schema = {"multiply": {"a", "b"}, "weather": {"city"}}[selection.tool_name]
    assert set(selection.tool_kwargs) == schema
    assert response.message.content == ""
    assert response.raw["finish_reason"] == "stop"


def test_a_named_tool_choice_forces_that_tool_and_streams_no_call_text(llm):
    chunks = list(
        llm.stream_chat_with_tools(
            TOOLS, "Weather in Oslo?", tool_choice="multiply", max_tokens=CALL_TOKENS
        )
    )
    assert "".join(c.delta for c in chunks) == ""  # the call is a block, not text
    (selection,) = llm.get_tool_calls_from_response(chunks[-1])
    assert selection.tool_name == "multiply"
    assert all(isinstance(selection.tool_kwargs[k], int) for k in ("a", "b"))
    with pytest.raises(ValueError, match="nope"):
        llm.chat_with_tools(TOOLS, "Hi", tool_choice="nope")


def test_no_call_is_no_tool_selection(llm):
    response = llm.chat_with_tools(TOOLS, "Say hello.", tool_choice="none", max_tokens=4)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool call"):
        llm.get_tool_calls_from_response(response)


def test_structured_predict_is_a_constrained_call(llm):
    class Person(BaseModel):
        name: str
        age: int

    person = llm.structured_predict(
        Person,
        PromptTemplate("Extract the person: {text}"),
        llm_kwargs={"max_tokens": CALL_TOKENS},
        text="Alice is 30 years old.",
    )
    assert isinstance(person, Person) and isinstance(person.age, int)


@pytest.fixture(scope="module")
def always_firing() -> NGSD:
    # threshold 0: the neuron fires on every token, also on the forced call's tokens, where
    # the constraint leaves the two distributions too close for the 0.1 gate.
    config = GuardConfig(gate=GateConfig(threshold=0.0), window=1)
    return NGSD(guarded=GuardedLM.from_default(config=config), max_new_tokens=CALL_TOKENS)


async def test_function_agent_run_sends_gate_events(always_firing, gate_events):
    agent = FunctionAgent(
        tools=TOOLS[:1],
        llm=always_firing,
        system_prompt="You are a calculator.",
        initial_tool_choice="multiply",
    )
    handler = agent.run("What is 6 times 7?", max_iterations=3, early_stopping_method="generate")
    results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
    output = await handler
    assert results and results[0].tool_name == "multiply"
    assert results[0].tool_output.content == str(6 * 7)
    assert output.response.content is not None
    assert len(gate_events) > 8  # the forced call alone is longer than 8 tokens
    assert all(e.span_id.startswith("NGSD.astream_chat-") for e in gate_events)
    assert len({e.span_id for e in gate_events}) >= 2  # the call, then the answer
