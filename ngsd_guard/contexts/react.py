"""Text ReAct agents: the request under a ReAct prompt that lists an agent's tools as text, as
agents send it to a model without native tool calling.

* ``llamaindex-react``: LlamaIndex's ``ReActAgent`` prompt, its ``ReActChatFormatter``
  (imported at run time) over the agent's tools, then the request; half the time with the
  agent's system prompt as ``ReActAgent(system_prompt=...)`` adds it (the formatter's
  ``context``). Both sides of the split, since users meet the framework's default as it is;
* ``langchain-react``: LangChain's classic ReAct prompt (``hwchase17/react``, what
  ``create_react_agent`` was used with) as one user message, the tools rendered by
  ``langchain_core``'s ``render_text_description_and_args``; evaluation only
  (:data:`ngsd_guard.splits.REACT_UNSEEN_TEMPLATES`).

The agents and their tool schemas are the ``agent-tools`` context's (every fourth held out).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from .. import splits
from ..splits import Split
from .dialogue import agents

Message = dict[str, str]

LANGCHAIN_REACT_PROMPT = (
    "Answer the following questions as best you can. You have access to the following tools:"
    "\n\n{tools}\n\nUse the following format:\n\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [{tool_names}]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can repeat N times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n\n"
    "Begin!\n\nQuestion: {input}\nThought:{agent_scratchpad}"
)
"""LangChain's ReAct prompt (LangChain Hub ``hwchase17/react``)."""


def _functions(tools: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [tool["function"] for tool in tools]


def llamaindex_react_messages(
    request: str, tools: Sequence[Mapping[str, Any]], system_prompt: str | None = None
) -> list[Message]:
    """What LlamaIndex's ``ReActAgent(tools=..., system_prompt=...)`` sends first for
    ``request`` (``tools``: OpenAI-style function schemas): its ``ReActChatFormatter``'s system
    header, then the request."""
    from llama_index.core.agent.react.formatter import ReActChatFormatter
    from llama_index.core.base.llms.types import ChatMessage, MessageRole

    chat = [ChatMessage(role=MessageRole.USER, content=request)]
    formatter = ReActChatFormatter.from_defaults(context=system_prompt)
    formatted = formatter.format(_llamaindex_tools(tools), chat)
    return [{"role": m.role.value, "content": m.content or ""} for m in formatted]


def _llamaindex_tools(tools: Sequence[Mapping[str, Any]]) -> list[Any]:
    """LlamaIndex tools whose metadata give the schemas' own parameters (as a ``FunctionTool``
    built from a typed function gives its pydantic schema's)."""
    from llama_index.core.tools import FunctionTool, ToolMetadata

    class SchemaMetadata(ToolMetadata):
        def __init__(self, function: Mapping[str, Any]) -> None:
            super().__init__(description=function["description"], name=function["name"])
            self.parameters = dict(function["parameters"])

        def get_parameters_dict(self) -> dict:
            return self.parameters

    return [
        FunctionTool(fn=_unused, metadata=SchemaMetadata(function))
        for function in _functions(tools)
    ]


def _unused(**kwargs: Any) -> str:
    return ""


def langchain_react_messages(request: str, tools: Sequence[Mapping[str, Any]]) -> list[Message]:
    """LangChain's classic ReAct prompt for ``request`` with ``tools``, as one user message at
    the first step (empty scratchpad)."""
    from langchain_core.prompts import PromptTemplate
    from langchain_core.tools import StructuredTool
    from langchain_core.tools.render import render_text_description_and_args

    lc_tools = [
        StructuredTool(
            name=f["name"], description=f["description"], args_schema=dict(f["parameters"])
        )
        for f in _functions(tools)
    ]
    text = PromptTemplate.from_template(LANGCHAIN_REACT_PROMPT).format(
        tools=render_text_description_and_args(lc_tools),
        tool_names=", ".join(t.name for t in lc_tools),
        input=request,
        agent_scratchpad="",
    )
    return [{"role": "user", "content": text}]


TEMPLATES = ("llamaindex-react", "langchain-react")


def react(request: str, split: Split, rng: random.Random) -> tuple[str, list[Message], list]:
    """One ReAct prompt (training: LlamaIndex's only) around one agent's tools; the tools are
    text in the prompt, so none are passed to the renderer."""
    names = [n for n in TEMPLATES if split == "eval" or n not in splits.REACT_UNSEEN_TEMPLATES]
    name = rng.choice(names)
    chosen = rng.choice(agents(split))
    if name == "langchain-react":
        return f"{name}/{chosen['name']}", langchain_react_messages(request, chosen["tools"]), []
    system = chosen["system"] if rng.random() < 0.5 else None
    variant = f"{name}{'-system' if system else ''}/{chosen['name']}"
    return variant, llamaindex_react_messages(request, chosen["tools"], system), []
