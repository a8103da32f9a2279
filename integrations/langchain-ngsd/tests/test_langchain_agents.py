"""LangChain v1 agents on ChatNGSD: every structured-output strategy returns a valid object,
and middleware that needs the model profile runs. Uses the real default model."""

from __future__ import annotations

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import SummarizationMiddleware
from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_ngsd import ChatNGSD
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow  # uses the real default model

QUESTION = "Invent a fictional person: give a name and an age."


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=20)
    age: int


@tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"It is sunny in {city}."


@pytest.fixture(scope="module")
def llm() -> ChatNGSD:
    return ChatNGSD(max_tokens=48)


@pytest.mark.parametrize(
    "response_format",
    [ToolStrategy(Person), ProviderStrategy(Person), Person],
    ids=["tool-strategy", "provider-strategy", "bare-schema"],
)
def test_create_agent_structured_response_is_valid(llm: ChatNGSD, response_format: object) -> None:
    agent = create_agent(llm, response_format=response_format)
    result = agent.invoke({"messages": [HumanMessage(QUESTION)]})
    person = result["structured_response"]
    assert isinstance(person, Person)
    assert Person.model_validate(person.model_dump()) == person


def test_tools_stay_offered_beside_a_response_format(llm: ChatNGSD) -> None:
    # tool_choice auto with a schema: a call *or* a valid answer (ngsd_guard.tools.plan). The
    # tools are not dropped: asked for the weather, the model calls the tool. (An agent loop
    # with a tool the 135M model keeps calling would never reach its structured answer, so
    # the agents above get none.)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": Person.model_json_schema()},
    }
    bound = llm.bind_tools([get_weather], response_format=response_format)
    message = bound.invoke([HumanMessage("What is the weather in Paris?")])
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)


def test_provider_strategy_with_a_json_schema_dict(llm: ChatNGSD) -> None:
    schema = {
        "title": "City",
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    agent = create_agent(llm, response_format=ProviderStrategy(schema))
    result = agent.invoke({"messages": [HumanMessage("Name a city in France.")]})
    assert set(result["structured_response"]) == {"city"}


def test_summarization_middleware_with_a_fractional_trigger_runs() -> None:
    llm = ChatNGSD(max_tokens=4)
    middleware = SummarizationMiddleware(
        model=llm, trigger=("fraction", 0.5), token_counter=llm.get_num_tokens_from_messages
    )
    agent = create_agent(llm, middleware=[middleware])
    result = agent.invoke({"messages": [HumanMessage("Hello!")]})
    assert isinstance(result["messages"][-1], AIMessage)
    assert result["messages"][-1].usage_metadata["output_tokens"] <= 4
