"""Request and response bodies of the OpenAI chat-completions and completions APIs, plus the
``ngsd`` extension.

Requests are strict: an unknown field or a wrong type is a 400 (see :mod:`.errors`). Fields
OpenAI defines but this server cannot honour are accepted only at their neutral value (``n=1``,
``logprobs=false``, penalties 0, ``echo=false``), so a client never silently gets less than it
asked for.

The guard's settings ride in an ``ngsd`` object (:class:`NGSDOptions`); the responses are
built in :mod:`.responses`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------- requests
class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="the call's arguments, as a JSON string")


class ToolCallItem(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCallItem] | None = None
    name: str | None = None
    refusal: str | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolName


class JsonSchema(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class NGSDOptions(_Strict):
    """The guard's per-request settings (only where the operator allows overrides)."""

    alpha: float | None = Field(None, ge=0, le=1, description="the expert's weight at a spike")
    guard: bool | None = Field(None, description="false: the base model alone")


def _neutral(value: Any, neutral: Any, name: str) -> None:
    if value is not None and value != neutral:
        raise ValueError(f"`{name}` (={value!r}) is not supported; omit it or send {neutral!r}")


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ngsd: NGSDOptions | None = None

    @model_validator(mode="after")
    def _neutral_values(self) -> _Sampling:
        _neutral(self.n, 1, "n")
        _neutral(self.frequency_penalty, 0, "frequency_penalty")
        _neutral(self.presence_penalty, 0, "presence_penalty")
        _neutral(self.logit_bias or None, {}, "logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError(f"`stop` (={self.stop!r}) takes up to 4 non-empty strings")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _chat_neutral_values(self) -> ChatCompletionRequest:
        _neutral(self.logprobs, False, "logprobs")
        _neutral(self.top_logprobs, 0, "top_logprobs")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("`tool_choice` needs `tools`")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_neutral_values(self) -> CompletionRequest:
        _neutral(self.echo, False, "echo")
        _neutral(self.logprobs, 0, "logprobs")
        _neutral(self.suffix, "", "suffix")
        _neutral(self.best_of, 1, "best_of")
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("`prompt` must be a non-empty string or list of non-empty strings")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens
