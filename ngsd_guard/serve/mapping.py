"""OpenAI request bodies onto engine requests: messages, sampling, guard settings, tools and
structured output, and the limits the operator set."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..experts import Message
from ..guarded import GenerateOptions, GenerationRequest, GuardedLM
from ..tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    JsonConstraint,
    ToolCallConstraint,
)
from .errors import APIError
from .protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Content,
    JsonObjectFormat,
    JsonSchemaFormat,
    NamedToolChoice,
    NGSDOptions,
    SystemMessage,
    ToolMessage,
    _Sampling,
)
from .settings import ServeSettings


@dataclass(frozen=True)
class EngineCall:
    """One choice of a request, as the engine decodes it.

    ``tool_names``: the tools whose calls the output may contain (parse it for them); None when
    no tools are offered.
    """

    request: GenerationRequest
    tool_names: list[str] | None = None


def chat_call(lm: GuardedLM, body: ChatCompletionRequest, settings: ServeSettings) -> EngineCall:
    """The engine request for a chat completion.

    Raises:
        APIError: a limit, a guard override the operator does not allow, an unknown tool.
        ContextTooLongError, PromptError: the prompt does not fit the model, or is empty.
    """
    budget = token_budget(body.token_budget, settings)
    options = _sampling_options(body, budget, settings)
    template_tools = "tools" in (lm.tokenizer.chat_template or "")
    messages = to_engine_messages(body.messages, inline_tool_calls=not template_tools)
    messages, output, tool_names = _output_options(lm, body, messages, budget)
    options.update(output)
    lm.encode_prompt(messages, tools=options.get("tools"))  # too long or empty: refused here
    return EngineCall(GenerationRequest(messages, options), tool_names)


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
    messages: Sequence[ChatMessage], *, inline_tool_calls: bool
) -> list[Message]:
    """OpenAI chat messages as the dicts a chat template renders.

    ``developer`` becomes ``system``. An assistant's ``tool_calls`` are written into its content
    as ``<tool_call>{"name", "arguments"}</tool_call>`` (``inline_tool_calls``, for templates
    without tool support: the format the model is asked to answer in) or passed on with their
    arguments decoded.

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
            if calls and inline_tool_calls:
                written = [
                    TOOL_CALL_OPEN
                    + json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
                    + TOOL_CALL_CLOSE
                    for _, name, args in calls
                ]
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


def _with_instruction(messages: list[Message], text: str) -> list[Message]:
    """Append ``text`` to the system message (adding one first if there is none)."""
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ------------------------------------------------------------------------ tools and formats
def _output_options(
    lm: GuardedLM, body: ChatCompletionRequest, messages: list[Message], budget: int
) -> tuple[list[Message], GenerateOptions, list[str] | None]:
    """Tools, ``tool_choice`` and ``response_format`` onto the engine: (messages, options,
    tool names to parse the output for).

    ``tool_choice``: ``none`` hides the tools; ``auto`` (the default) shows them and parses calls
    out of the answer; ``required`` or a named tool forces one call by constrained decoding.
    ``response_format``: ``json_schema`` constrains the answer to the schema's JSON;
    ``json_object`` asks for a JSON object in the system message.

    Raises:
        APIError: an unknown tool name, an unsupported schema, or a ``max_tokens`` too small
            for the forced output (400).
    """
    options = GenerateOptions()
    format_ = body.response_format
    if isinstance(format_, JsonSchemaFormat):
        schema = format_.json_schema.schema_
        messages = _with_instruction(
            messages,
            "Answer with one JSON object that follows this JSON schema:\n"
            + json.dumps(schema, ensure_ascii=False),
        )
        try:
            options["constraint"] = JsonConstraint(lm.tokenizer, schema, max_tokens=budget)
        except ValueError as error:
            raise APIError(400, str(error), param="response_format", code="invalid_value") from None
    elif isinstance(format_, JsonObjectFormat):
        messages = _with_instruction(messages, "Answer with one JSON object.")
    tool_names = None
    if body.tools and body.tool_choice != "none":
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        tool_names = [tool.function.name for tool in body.tools]
        options["tools"] = tools
        choice = body.tool_choice
        if isinstance(choice, NamedToolChoice) or choice == "required":
            name = choice.function.name if isinstance(choice, NamedToolChoice) else None
            if name is not None and name not in tool_names:
                raise APIError(
                    400,
                    f"`tool_choice` names {name!r}, which is not one of the tools {tool_names}",
                    param="tool_choice",
                    code="invalid_value",
                )
            options["constraint"] = ToolCallConstraint(lm.tokenizer, tools, name, max_tokens=budget)
    constraint = options.get("constraint")
    if isinstance(constraint, JsonConstraint | ToolCallConstraint):
        shortest = constraint.min_tokens
        if shortest > budget:
            raise APIError(
                400,
                f"`max_tokens` (={budget}) is too small for the forced output, which takes up "
                f"to {shortest} tokens at its shortest; raise `max_tokens`",
                param="max_tokens",
                code="invalid_value",
            )
    return messages, options, tool_names
