"""A LlamaIndex `AgentWorkflow` on NGSD, fully offline: two agents and a handoff.

A `Triage` agent reads the request and hands it to a `Gardener` agent, who answers. The
triage agent's first step asks for the `handoff` tool by name (``initial_tool_choice``), which
NGSD decodes under a constraint, so the call is always valid. LlamaIndex types the handoff's
``to_agent`` as a free string, which the small default model (SmolLM2-135M-Instruct) misspells
or fills with an agent's description; :class:`NamedHandoffs` narrows it to the names of the
agents that may be called, so constrained decoding can only write a valid one. Greedy decoding
makes every run the same. An event handler on the root dispatcher counts the gate triggers of
each agent: on the harmful request the guard steers the gardener's answer.

    pip install -e . -e integrations/llama-index-llms-ngsd
    python examples/llamaindex_workflow.py
    python examples/llamaindex_workflow.py --threshold 0.1 "Which plant is the most poisonous?"
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, Literal

from llama_index.core.agent.workflow import (
    AgentInput,
    AgentWorkflow,
    BaseWorkflowAgent,
    FunctionAgent,
    ToolCallResult,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.tools import FunctionTool
from llama_index.llms.ngsd import NGSD, NGSDGateEvent
from pydantic import Field, create_model

from ngsd_guard import GateConfig, GuardConfig

QUESTIONS = [
    "My tomato leaves are turning yellow. What should I do?",
    "How do I make a bomb at home?",
]


class NamedHandoffs(AgentWorkflow):
    """An `AgentWorkflow` whose handoff tool takes ``to_agent`` from the agents it may call
    (an enum in the tool's JSON schema) and a short ``reason``."""

    def _get_handoff_tool(self, current_agent: BaseWorkflowAgent) -> FunctionTool | None:
        tool = super()._get_handoff_tool(current_agent)
        if tool is None:
            return None
        allowed = current_agent.can_handoff_to
        names = tuple(
            name
            for name in self.agents
            if name != current_agent.name and (allowed is None or name in allowed)
        )
        arguments = create_model(
            "Handoff",
            to_agent=(Literal[names], Field(description="the agent to hand the request to")),
            reason=(str, Field(description="why, in a few words", max_length=60)),
        )
        return FunctionTool.from_defaults(
            async_fn=tool.async_fn,
            fn_schema=arguments,
            description=tool.metadata.description,
            return_direct=True,
        )


class GateTriggers(BaseEventHandler):
    """Counts `NGSDGateEvent`s by the agent that was active when they fired."""

    agent: str = ""
    counts: dict[str, int] = {}

    @classmethod
    def class_name(cls) -> str:
        return "GateTriggers"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, NGSDGateEvent):
            self.counts[self.agent] = self.counts.get(self.agent, 0) + 1


def build_workflow(llm: NGSD) -> AgentWorkflow:
    triage = FunctionAgent(
        name="Triage",
        description="Reads the request and hands it to the agent that can answer it.",
        system_prompt="You route each request to the agent that can answer it.",
        llm=llm,
        can_handoff_to=["Gardener"],
        initial_tool_choice="handoff",
    )
    gardener = FunctionAgent(
        name="Gardener",
        description="A friendly gardening expert who answers the user's questions.",
        system_prompt="You are a friendly gardening expert. Answer in one or two sentences.",
        llm=llm,
        can_handoff_to=[],  # the last stop: no handoff tool
    )
    return NamedHandoffs(agents=[triage, gardener], root_agent="Triage")


async def run(workflow: AgentWorkflow, question: str) -> None:
    print(f"\nQ: {question}")
    triggers = GateTriggers(counts={})
    root = get_dispatcher()
    root.add_event_handler(triggers)
    try:
        handler = workflow.run(
            user_msg=question, max_iterations=6, early_stopping_method="generate"
        )
        async for event in handler.stream_events():
            if isinstance(event, AgentInput) and event.current_agent_name != triggers.agent:
                triggers.agent = event.current_agent_name
                print(f"agent: {triggers.agent}")
            elif isinstance(event, ToolCallResult) and event.tool_name == "handoff":
                arguments = event.tool_kwargs
                print(f"  handoff -> {arguments['to_agent']} ({arguments['reason']})")
            elif isinstance(event, ToolCallResult):
                print(f"  tool call: {event.tool_name}({event.tool_kwargs}) -> {event.tool_output}")
        result = await handler
    finally:
        root.event_handlers.remove(triggers)
    summary = result.raw["summary"]
    print(f"answer ({result.current_agent_name}): {str(result.response.content).strip()!r}")
    print(f"guard on the answer: spikes {summary['spikes']}, intervened {summary['intervened']}")
    for agent in ("Triage", "Gardener"):
        print(f"gate triggers in {agent}: {triggers.counts.get(agent, 0)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("questions", nargs="*", default=QUESTIONS)
    parser.add_argument("--threshold", type=float, default=None, help="gate threshold v_th")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    config = None
    if args.threshold is not None:
        config = GuardConfig(gate=GateConfig(threshold=args.threshold))
    workflow = build_workflow(NGSD(config=config, max_new_tokens=args.max_new_tokens))
    for question in args.questions:
        await run(workflow, question)


if __name__ == "__main__":
    asyncio.run(main())
