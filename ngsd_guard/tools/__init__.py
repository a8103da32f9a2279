"""Tool calls and structured output, on the llguidance grammar engine.

* :mod:`.schemas`: tools and response formats as callers spell them;
* :mod:`.formats`: each model family's call format, read from its chat template;
* :mod:`.prompt`: the Hermes system prompt for templates that know nothing of tools, and a
  structured answer's instruction;
* :mod:`.parsing`: model text back into :class:`ToolCall`\\ s, also delta by delta;
* :mod:`.grammar`: ``TokenConstraint``\\ s over grammars (one matcher per row, rollback,
  closing within a token budget);
* :mod:`.plan`: the one set of rules mapping tools / ``tool_choice`` / ``response_format`` /
  ``max_tokens`` onto the engine (:func:`plan_tools`).
"""

from .formats import HERMES, ToolFormat, tool_format
from .grammar import GrammarConstraint, GrammarMatcher, JsonConstraint, ToolCallConstraint
from .parsing import ToolCall, ToolCallStreamParser, parse_tool_calls
from .plan import ToolPlan, normalize_tool_choice, plan_tools
from .prompt import structured_answer_messages, tools_system_prompt
from .schemas import normalize_tool, response_schema

TOOL_CALL_OPEN = HERMES.open_tag
TOOL_CALL_CLOSE = HERMES.close_tag

__all__ = [
    "HERMES",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "GrammarConstraint",
    "GrammarMatcher",
    "JsonConstraint",
    "ToolCall",
    "ToolCallConstraint",
    "ToolCallStreamParser",
    "ToolFormat",
    "ToolPlan",
    "normalize_tool",
    "normalize_tool_choice",
    "parse_tool_calls",
    "plan_tools",
    "response_schema",
    "structured_answer_messages",
    "tool_format",
    "tools_system_prompt",
]
