"""One set of rules for tools, tool choice, response formats and the token budget.

Every front end (LangChain, LlamaIndex, the HTTP server) hands its request's tools,
``tool_choice``, ``response_format`` and ``max_tokens`` to :func:`plan_tools` and gets back a
:class:`ToolPlan`: what to render, which constraint to decode under, how to parse the output.

==================  =====================  ==========================================
tool_choice         response_format        the engine gets
==================  =====================  ==========================================
auto / None         none                   tools rendered; output parsed for calls
auto / None         a schema               tools rendered; a call *or* a valid answer
none / False        any                    no tools; a valid answer when a schema is set
any / required      any                    one call of some tool, forced
a tool's name       any                    one call of that tool, forced
==================  =====================  ==========================================

A forced call or structured answer closes within ``max_tokens``; a budget below its shortest
form raises :class:`~ngsd_guard.errors.ConfigError` here, before decoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..constraints import TokenConstraint
from ..errors import ConfigError
from .formats import ToolFormat, tool_format
from .grammar import JsonConstraint, ToolCallConstraint
from .parsing import ToolCallStreamParser
from .prompt import structured_answer_messages
from .schemas import normalize_tool, response_schema

if TYPE_CHECKING:
    from ..guarded import GuardedLM

__all__ = ["ToolPlan", "normalize_tool_choice", "plan_tools"]


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str:
    """``"auto"``, ``"none"``, ``"any"`` (one call of some tool, forced) or a tool's name (a call
    of that tool, forced), from the OpenAI, LangChain, LlamaIndex and Anthropic spellings:
    None/``"auto"``; ``"none"``/False; ``"any"``/``"required"``/True;
    ``{"type": "function", "function": {"name": ...}}``, ``{"name": ...}`` or the name.

    Raises:
        ConfigError: an unknown value or tool name.
    """
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "any"
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function", tool_choice)
        tool_choice = function.get("name") if isinstance(function, Mapping) else None
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    raise ConfigError(
        f"`tool_choice` (={tool_choice!r}) must be 'auto', 'none', 'any', 'required' or one of "
        f"the tools {list(names)}"
    )


@dataclass(frozen=True)
class ToolPlan:
    """What one request asks of the engine (see the table in this module's docstring)."""

    tools: list[dict[str, Any]] | None
    """OpenAI-format tools to render (``GuardedLM`` option ``tools``), or None."""
    constraint: TokenConstraint | None
    """The constraint to decode under (option ``constraint``), or None."""
    tool_names: list[str] | None
    """Parse the output for calls to these tools; None: the output is not parsed for calls."""
    choice: str
    """``"auto"``, ``"none"``, ``"any"`` or the forced tool's name."""
    schema: dict[str, Any] | None
    """The JSON schema a structured answer follows, or None."""
    format: ToolFormat
    """The model's tool-call format."""

    @property
    def forced(self) -> bool:
        """A tool call is forced."""
        return self.choice not in ("auto", "none")

    @property
    def inline_tool_calls(self) -> bool:
        """Earlier calls in the history must be written into the assistant's text
        (``format.call_text``): the chat template does not render ``tool_calls``."""
        return not self.format.template_calls

    def options(self) -> dict[str, Any]:
        """The ``GuardedLM.stream`` options of this plan (``tools``, ``constraint``)."""
        options: dict[str, Any] = {}
        if self.tools:
            options["tools"] = self.tools
        if self.constraint is not None:
            options["constraint"] = self.constraint
        return options

    def messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with the structured answer's instruction added to the system message
        (unchanged without a schema, or when a call is forced)."""
        if self.schema is None or self.forced:
            return [dict(m) for m in messages]
        return structured_answer_messages(messages, self.schema)

    def parser(self) -> ToolCallStreamParser | None:
        """A fresh stream parser for the output, or None when calls are not parsed."""
        if self.tool_names is None:
            return None
        return ToolCallStreamParser(self.tool_names, self.format)


def plan_tools(
    lm: GuardedLM,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
    response_format: Mapping[str, Any] | type | None = None,
    max_tokens: int | None = None,
) -> ToolPlan:
    """Map a request's tools, ``tool_choice``, ``response_format`` and ``max_tokens`` onto the
    engine (the rules: this module's docstring).

    Args:
        lm: the engine (its tokenizer gives the format; its ``max_new_tokens`` the default budget).
        tools: OpenAI-format (or bare ``{"name", "parameters"}``) tool schemas.
        tool_choice: see :func:`normalize_tool_choice`.
        response_format: see :func:`~ngsd_guard.tools.schemas.response_schema`.
        max_tokens: the call's token budget; default the engine's ``max_new_tokens``.

    Raises:
        ConfigError: an unknown ``tool_choice``, a forced call without tools, a bad
            ``response_format``, or a budget that the forced output cannot fit.
    """
    normalized = [normalize_tool(t) for t in tools or ()] or None
    names = [t["function"]["name"] for t in normalized or ()]
    choice = normalize_tool_choice(tool_choice, names)
    if choice not in ("auto", "none") and not normalized:
        raise ConfigError(f"`tool_choice` (={tool_choice!r}) forces a call but no tools are given")
    if choice == "none":
        normalized = None
    schema = response_schema(response_format)
    tokenizer = lm.tokenizer
    budget = max_tokens or lm.config.decoding.max_new_tokens
    fmt = tool_format(tokenizer)
    constraint: TokenConstraint | None = None
    if normalized and choice != "auto":
        name = None if choice == "any" else choice
        constraint = ToolCallConstraint(tokenizer, normalized, name, format=fmt, max_tokens=budget)
    elif normalized and schema is not None:
        constraint = ToolCallConstraint(
            tokenizer, normalized, format=fmt, answer_schema=schema, max_tokens=budget
        )
    elif schema is not None:
        constraint = JsonConstraint(tokenizer, schema, max_tokens=budget)
    return ToolPlan(
        tools=normalized,
        constraint=constraint,
        tool_names=names if normalized else None,
        choice=choice,
        schema=schema,
        format=fmt,
    )
