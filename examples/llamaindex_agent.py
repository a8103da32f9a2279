"""LlamaIndex agents on NGSD, fully offline: a `FunctionAgent` and a `ReActAgent` with one tool.

The `FunctionAgent` asks for the tool by name on its first step (``initial_tool_choice``),
which NGSD turns into constrained decoding: the small default model (SmolLM2-135M-Instruct)
then always emits a valid ``<tool_call>``. The `ReActAgent` needs no function calling; it
parses the model's Thought/Action/Answer text. An event handler on the root dispatcher
counts the gate triggers of each run.

    pip install -e . -e integrations/llama-index-llms-ngsd
    python examples/llamaindex_agent.py
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from llama_index.core.agent.workflow import (
    BaseWorkflowAgent,
    FunctionAgent,
    ReActAgent,
    ToolCallResult,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.tools import FunctionTool
from llama_index.llms.ngsd import NGSD, NGSDGateEvent

from ngsd_guard import GateConfig, GuardConfig

QUESTION = "What is 6 times 7?"


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


class CountGateTriggers(BaseEventHandler):
    """Counts `NGSDGateEvent`s, and the LLM calls (spans) they came from."""

    triggers: int = 0
    spans: set[str] = set()

    @classmethod
    def class_name(cls) -> str:
        return "CountGateTriggers"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, NGSDGateEvent):
            self.triggers += 1
            self.spans.add(event.span_id or "")


async def run(agent: BaseWorkflowAgent, question: str) -> None:
    counter = CountGateTriggers(spans=set())
    root = get_dispatcher()
    root.add_event_handler(counter)
    try:
        handler = agent.run(question, max_iterations=4, early_stopping_method="generate")
        async for event in handler.stream_events():
            if isinstance(event, ToolCallResult):
                print(f"  tool call: {event.tool_name}({event.tool_kwargs}) -> {event.tool_output}")
        result = await handler
    finally:
        root.event_handlers.remove(counter)
    print(f"  answer: {str(result.response.content).strip()!r}")
    print(f"  gate triggers: {counter.triggers} in {len(counter.spans)} LLM call(s)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--threshold", type=float, default=None, help="gate threshold v_th")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    config = None
    if args.threshold is not None:
        config = GuardConfig(gate=GateConfig(threshold=args.threshold))
    llm = NGSD(config=config, max_new_tokens=args.max_new_tokens)
    tools = [FunctionTool.from_defaults(multiply)]

    print(f"Q: {args.question}")
    print("FunctionAgent")
    function_agent = FunctionAgent(
        tools=tools,
        llm=llm,
        system_prompt="You are a calculator. Use the multiply tool, then state the result.",
        initial_tool_choice="multiply",
    )
    await run(function_agent, args.question)

    print("ReActAgent")
    react_agent = ReActAgent(tools=tools, llm=llm)
    await run(react_agent, args.question)


if __name__ == "__main__":
    asyncio.run(main())
