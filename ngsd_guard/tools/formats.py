"""Each model family's own tool-call format, read from what its chat template renders.

:func:`tool_format` renders a probe tool and a probe call through the tokenizer's chat
template and looks at the text: where the call's JSON sits, what comes before and after it
(``<tool_call>\\n`` ... ``\\n</tool_call>`` for Hermes / Qwen, nothing for Llama 3's bare JSON,
``[TOOL_CALLS] [`` ... ``]`` for Mistral), whether the arguments are called ``arguments`` or
``parameters``, and whether calls come as a JSON list. No model names are involved. A template
that renders no calls (SmolLM2's ChatML) gets :data:`HERMES`, asked for through a system
prompt (:func:`~ngsd_guard.tools.prompt.tools_system_prompt`).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from jinja2 import TemplateError

from .schemas import closing_bound, json_rule, normalize_tool

__all__ = ["HERMES", "ToolFormat", "tool_format"]

Piece = str | int
"""Part of a call's frame: literal text, or the id of an added token (``[TOOL_CALLS]``)."""


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes a tool call: ``prefix`` + JSON + ``suffix``.

    The JSON is ``{"name": <tool>, <arguments_key>: {...}}``, inside ``[...]`` when
    ``as_list``. ``open_tag``/``close_tag`` are the prefix/suffix as they show in decoded text
    (special tokens are not shown), for the parser.
    """

    name: str
    prefix: tuple[Piece, ...] = ()
    suffix: tuple[Piece, ...] = ()
    arguments_key: str = "arguments"
    as_list: bool = False
    open_tag: str = ""
    close_tag: str = ""
    template_tools: bool = False
    """The chat template renders ``tools`` itself (else they go into a system prompt)."""
    template_calls: bool = False
    """The chat template renders an assistant's ``tool_calls`` (else they are inlined as text)."""

    def call_text(self, name: str, arguments: Mapping[str, Any]) -> str:
        """One call as the model writes it (special tokens as their text), for chat history."""
        payload = {"name": name, self.arguments_key: dict(arguments)}
        body = json.dumps([payload] if self.as_list else payload, ensure_ascii=False)
        return f"{self.open_tag}{body}{self.close_tag}"

    def call_rule(self, tools: Sequence[Mapping[str, Any]], name: str | None = None) -> str:
        """A Lark rule ``call: ...`` for exactly one call of one of ``tools`` (of ``name``
        only, when given), arguments valid for the tool's parameters schema (and no undeclared
        ones, unless the schema allows ``additionalProperties``), in this format.

        Raises:
            ValueError: ``tools`` is empty or ``name`` is not one of them.
        """
        functions = _chosen(tools, name)
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    self.arguments_key: _closed(f["parameters"]),
                },
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for f in functions
        ]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        body = json_rule(
            {"type": "array", "items": schema, "minItems": 1, "maxItems": 1}
            if self.as_list
            else schema
        )
        return f"call: {_lark_pieces(self.prefix)} {body} {_lark_pieces(self.suffix)}".strip()

    def call_bound(self, tools: Sequence[Mapping[str, Any]], name: str | None = None) -> int:
        """Bytes that can close any prefix of a call (see :func:`closing_bound`)."""
        pieces = (*self.prefix, *self.suffix)
        frame = sum(len(p.encode()) if isinstance(p, str) else 1 for p in pieces)
        return (
            frame
            + 2 * self.as_list
            + max(
                32 + len(f["name"]) + closing_bound(f["parameters"]) for f in _chosen(tools, name)
            )
        )


HERMES = ToolFormat(
    name="hermes",
    prefix=("<tool_call>",),
    suffix=("</tool_call>",),
    open_tag="<tool_call>",
    close_tag="</tool_call>",
)
"""The Hermes / Qwen convention, asked for through a system prompt when the template renders no
calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""


def _chosen(tools: Sequence[Mapping[str, Any]], name: str | None) -> list[dict[str, Any]]:
    functions = [normalize_tool(tool)["function"] for tool in tools]
    names = [f["name"] for f in functions]
    if name is not None and name not in names:
        raise ValueError(f"`name` (={name!r}) is not a tool; choose one of {names}")
    if not functions:
        raise ValueError("`tools` is empty; pass at least one tool schema")
    return [f for f in functions if name is None or f["name"] == name]


def _closed(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema whose arguments hold only the declared parameters, unless
    the schema itself says otherwise (``additionalProperties``)."""
    if "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return dict(parameters)


def _lark_pieces(pieces: Sequence[Piece]) -> str:
    return " ".join(
        f"<[{p}]>" if isinstance(p, int) else json.dumps(p, ensure_ascii=False)
        for p in pieces
        if p != ""
    )


# ---------------------------------------------------------------------------- detection
_PROBE_NAME = "ngsd_probe_tool"
_PROBE_ARGUMENTS = {"ngsd_probe_arg": "ngsd_probe_value"}
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": _PROBE_NAME,
        "description": "A probe.",
        "parameters": {
            "type": "object",
            "properties": {"ngsd_probe_arg": {"type": "string"}},
            "required": ["ngsd_probe_arg"],
        },
    },
}
_PROBE_CALL = {
    "id": "ngsdprobe",  # nine alphanumerics: what Mistral's templates insist on
    "type": "function",
    "function": {"name": _PROBE_NAME, "arguments": _PROBE_ARGUMENTS},
}
_PROBE_ANSWER = "ngsd probe answer"
_USER = [{"role": "user", "content": "ngsd probe question"}]

_FORMATS: weakref.WeakKeyDictionary[Any, ToolFormat] = weakref.WeakKeyDictionary()
_FORMATS_LOCK = threading.Lock()


def tool_format(tokenizer: Any) -> ToolFormat:
    """The tool-call format of ``tokenizer``'s chat template (found once per tokenizer).

    >>> tool_format(smollm2_tokenizer).name        # ChatML renders no tools  # doctest: +SKIP
    'hermes'
    """
    with _FORMATS_LOCK:
        found = _FORMATS.get(tokenizer)
        if found is None:
            found = _FORMATS[tokenizer] = _detect(tokenizer)
        return found


def _render(tokenizer: Any, messages: list[dict[str, Any]], **options: Any) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except (TemplateError, KeyError, TypeError, ValueError):  # the template refuses the probe
        return None


def _detect(tokenizer: Any) -> ToolFormat:
    if not tokenizer.chat_template:
        return HERMES
    with_tools = _render(tokenizer, _USER, tools=[_PROBE_TOOL], add_generation_prompt=True)
    template_tools = with_tools is not None and _PROBE_NAME in with_tools
    tools = [_PROBE_TOOL] if template_tools else None
    fallback = replace(HERMES, template_tools=template_tools)
    call = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    rendered = _render(tokenizer, [*_USER, call], tools=tools)
    answer = _render(tokenizer, [*_USER, {"role": "assistant", "content": _PROBE_ANSWER}])
    head = _render(tokenizer, _USER, tools=tools, add_generation_prompt=True)
    if rendered is None or answer is None or head is None or _PROBE_NAME not in rendered:
        return fallback
    start = _common_prefix(head, rendered)
    found = _call_json(rendered, start)
    if found is None:
        return fallback
    begin, end, value = found
    turn_end = answer[answer.index(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    after = rendered[end:]
    suffix = after[: len(after) - len(turn_end)] if turn_end and after.endswith(turn_end) else ""
    item = value[0] if isinstance(value, list) else value
    key = next(k for k, v in item.items() if _same_arguments(v))
    prefix_pieces = _pieces(tokenizer, rendered[start:begin].lstrip())
    suffix_pieces = _pieces(tokenizer, suffix.rstrip())
    return ToolFormat(
        name="template",
        prefix=prefix_pieces,
        suffix=suffix_pieces,
        arguments_key=key,
        as_list=isinstance(value, list),
        open_tag=_visible(tokenizer, prefix_pieces),
        close_tag=_visible(tokenizer, suffix_pieces),
        template_tools=template_tools,
        template_calls=True,
    )


def _common_prefix(a: str, b: str) -> int:
    size = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        size += 1
    return size


def _same_arguments(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    return value == _PROBE_ARGUMENTS


def _is_probe(value: Any) -> bool:
    items = value if isinstance(value, list) and len(value) == 1 else [value]
    return all(
        isinstance(i, dict)
        and i.get("name") == _PROBE_NAME
        and any(_same_arguments(v) for v in i.values())
        for i in items
    )


def _call_json(text: str, start: int) -> tuple[int, int, Any] | None:
    """``(begin, end, value)`` of the outermost JSON value after ``start`` that is the probe
    call (an object, or a list of one)."""
    decoder = json.JSONDecoder()
    name_at = text.find(_PROBE_NAME, start)
    best = None
    for begin in range(name_at, start - 1, -1):
        if text[begin] not in "{[":
            continue
        try:
            value, end = decoder.raw_decode(text, begin)
        except json.JSONDecodeError:
            continue
        if end > name_at and _is_probe(value):
            best = (begin, end, value)
    return best


def _pieces(tokenizer: Any, text: str) -> tuple[Piece, ...]:
    """``text`` split into literal text and added tokens (``[TOOL_CALLS]``, ``<tool_call>``)."""
    added = sorted(tokenizer.get_added_vocab().items(), key=lambda kv: -len(kv[0]))
    pieces: list[Piece] = []
    rest = text
    while rest:
        hit = min(
            ((rest.find(t), t, i) for t, i in added if t and rest.find(t) >= 0),
            default=None,
        )
        if hit is None:
            pieces.append(rest)
            break
        at, token, token_id = hit
        if at:
            pieces.append(rest[:at])
        pieces.append(token_id)
        rest = rest[at + len(token) :]
    return tuple(pieces)


def _visible(tokenizer: Any, pieces: Sequence[Piece]) -> str:
    """What ``pieces`` show in decoded text (special tokens skipped, as the engine decodes)."""
    text = "".join(
        p if isinstance(p, str) else tokenizer.decode([p], skip_special_tokens=True) for p in pieces
    )
    return text.strip()
