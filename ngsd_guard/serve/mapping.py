"""OpenAI request bodies onto engine requests: messages, sampling, guard settings, tools and
structured output, and the limits the operator set."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..experts import Message
from ..guarded import GenerateOptions, GenerationRequest, GuardedLM
from ..tools import ToolCallStreamParser, ToolFormat, ToolPlan, plan_tools
from .errors import APIError
from .protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Content,
    NGSDOptions,
    SystemMessage,
    ToolMessage,
    _Sampling,
)
from .settings import ServeSettings


@dataclass(frozen=True)
class EngineCall:
    """One choice of a request, as the engine decodes it, and how to read its output
    (``plan``: the tools it may call; None for a plain completion)."""

    request: GenerationRequest
    plan: ToolPlan | None = None

    def parser(self) -> ToolCallStreamParser | None:
        """A fresh parser of the output's tool calls, or None when it calls none."""
        return self.plan.parser() if self.plan is not None else None


def chat_call(lm: GuardedLM, body: ChatCompletionRequest, settings: ServeSettings) -> EngineCall:
    """The engine request for a chat completion.

    Tools, ``tool_choice``, ``response_format`` and the budget follow the engine's one set of
    rules (:func:`ngsd_guard.tools.plan_tools`): ``auto`` parses calls out of the answer,
    ``required`` or a named tool forces one valid call, ``none`` hides the tools, a
    ``json_schema`` or ``json_object`` format constrains the answer.

    Raises:
        APIError: a limit, or a guard override the operator does not allow.
        ConfigError: an unknown tool, a bad format, a budget too small for a forced output.
        ContextTooLongError, PromptError: the prompt does not fit the model, or is empty.
    """
    budget = token_budget(body.token_budget, settings)
    options = _sampling_options(body, budget, settings)
    plan = plan_tools(
        lm,
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools or ()] or None,
        tool_choice=(
            body.tool_choice
            if isinstance(body.tool_choice, str | None)
            else body.tool_choice.model_dump()
        ),
        response_format=(
            body.response_format.model_dump(by_alias=True, exclude_none=True)
            if body.response_format is not None
            else None
        ),
        max_tokens=budget,
    )
    call_format = plan.format if plan.inline_tool_calls else None
    messages = plan.messages(to_engine_messages(body.messages, call_format=call_format))
    options.update(GenerateOptions(**plan.options()))
    lm.encode_prompt(messages, tools=options.get("tools"))  # too long or empty: refused here
    return EngineCall(GenerationRequest(messages, options), plan)


def completion_calls(
    lm: GuardedLM, body: CompletionRequest, settings: ServeSettings
) -> list[EngineCall]:
    """One engine request per prompt of a (legacy) completion: the prompt is decoded as it is,
    without a chat template."""
    budget = token_budget(body.token_budget, settings)
    calls = []
    for prompt in body.prompts:
        lm.encode_prompt(prompt, raw=True)  # too long: refused here
        options = _sampling_options(body, budget, settings)
        options["raw"] = True
        calls.append(EngineCall(GenerationRequest(prompt, options)))
    return calls


def token_budget(asked: int | None, settings: ServeSettings) -> int:
    """``max_tokens`` (or ``max_completion_tokens``), the operator's default when absent.

    Raises:
        APIError: above the operator's cap (400).
    """
    budget = asked if asked is not None else settings.default_max_tokens
    if budget > settings.max_tokens_cap:
        raise APIError(
            400,
            f"`max_tokens` (={budget}) is above this server's limit of "
            f"{settings.max_tokens_cap}; ask for fewer tokens",
            param="max_tokens",
            code="invalid_value",
        )
    return budget


def _sampling_options(body: _Sampling, budget: int, settings: ServeSettings) -> GenerateOptions:
    options = GenerateOptions(max_new_tokens=budget)
    if body.temperature is not None:
        options["temperature"] = body.temperature
    if body.top_p is not None:
        options["top_p"] = body.top_p
    if body.seed is not None:
        options["seed"] = body.seed
    if body.stop_strings:
        options["stop"] = body.stop_strings
    options.update(guard_options(body.ngsd, settings))
    return options


def guard_options(ngsd: NGSDOptions | None, settings: ServeSettings) -> GenerateOptions:
    """``alpha`` and ``guard`` from the ``ngsd`` extension object.

    Raises:
        APIError: the operator does not allow overrides (403).
    """
    asked = ngsd.model_dump(exclude_none=True) if ngsd is not None else {}
    if asked and not settings.allow_guard_overrides:
        raise APIError(
            403,
            f"this server does not let clients change the guard (`ngsd` = {asked}); the "
            "operator can allow it with `ngsd-guard serve --allow-guard-overrides`",
            type="permission_error",
            param="ngsd",
            code="guard_override_not_allowed",
        )
    return GenerateOptions(**asked)


# ------------------------------------------------------------------------ messages
def text_of(content: Content | None) -> str:
    """A message's text: the string, or its text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def to_engine_messages(
    messages: Sequence[ChatMessage], *, call_format: ToolFormat | None = None
) -> list[Message]:
    """OpenAI chat messages as the dicts a chat template renders.

    ``developer`` becomes ``system``. An assistant's ``tool_calls`` are written into its content
    in ``call_format`` (for templates that do not render ``tool_calls``: the format the model
    answers in), or else passed on with their arguments decoded.

    Raises:
        APIError: a tool call's ``arguments`` are not a JSON object (400).
    """
    converted: list[Message] = []
    for index, message in enumerate(messages):
        text = text_of(message.content)
        if isinstance(message, SystemMessage):
            converted.append({"role": "system", "content": text})
        elif isinstance(message, ToolMessage):
            converted.append(
                {"role": "tool", "content": text, "tool_call_id": message.tool_call_id}
            )
        elif isinstance(message, AssistantMessage):
            calls = [
                (call.id, call.function.name, _arguments(call.function.arguments, index, n))
                for n, call in enumerate(message.tool_calls or [])
            ]
            entry: dict[str, Any] = {"role": "assistant", "content": text}
            if calls and call_format is not None:
                written = [call_format.call_text(name, args) for _, name, args in calls]
                entry["content"] = "\n".join(filter(None, [text, *written]))
            elif calls:
                entry["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": name, "arguments": args}}
                    for i, name, args in calls
                ]
            converted.append(entry)
        else:
            converted.append({"role": "user", "content": text})
    return converted


def _arguments(text: str, message: int, call: int) -> dict[str, Any]:
    try:
        arguments = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        where = f"messages.{message}.tool_calls.{call}.function.arguments"
        raise APIError(
            400,
            f"`{where}` (={text!r}) must be a JSON object, as a string",
            param=where,
            code="invalid_value",
        )
    return arguments
