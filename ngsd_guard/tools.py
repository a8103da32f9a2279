"""Tool calling for models whose chat template knows nothing about tools.

Three jobs, shared by every integration:

1. :func:`tools_system_prompt` renders OpenAI-format tool schemas into a system message that
   asks the model to answer a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
   (the Hermes / Qwen convention).
2. :func:`parse_tool_calls` and :class:`ToolCallStreamParser` turn the model's text back into
   :class:`ToolCall` objects, token by token when streaming. Malformed calls stay in the text.
3. :class:`ToolCallConstraint` and :class:`JsonConstraint` implement the engine's
   ``TokenConstraint`` protocol (``matcher()``: one ``ConstraintMatcher`` per row), so that a
   forced call (``tool_choice="any"`` or a named tool) or a structured answer is *guaranteed*
   to parse: decoding is restricted, token by token, to tokens whose text keeps the output a
   valid prefix of

   ``<tool_call>{"name": "<tool>", "arguments": <JSON valid for its parameters>}</tool_call>``

   (or of one JSON value for a schema). The grammar is a character-level automaton compiled from the
   JSON schema; the vocabulary mask is found by walking a trie of every token's text, so a step
   costs in proportion to the tokens that can follow, not to the vocabulary.

The JSON written by a constraint uses ``json.dumps``'s default layout (``", "`` and ``": "``),
emits the schema's required properties in schema order, and does not use string escapes.

>>> calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
>>> calls[0], calls[1][0].name, calls[1][0].arguments
('', 'add', {'a': 1})
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field

__all__ = [
    "JsonConstraint",
    "ToolCall",
    "ToolCallConstraint",
    "ToolCallStreamParser",
    "normalize_tool",
    "parse_tool_calls",
    "tools_system_prompt",
]

logger = logging.getLogger(__name__)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


# --------------------------------------------------------------------------------------------
# Prompt


def normalize_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``tool`` in OpenAI format: ``{"type": "function", "function": {name, description,
    parameters}}``. Accepts that format or a bare ``{"name", "description", "parameters"}`` dict.

    Raises:
        TypeError: ``tool`` is not a mapping with a function name.
    """
    if not isinstance(tool, Mapping):
        raise TypeError(f"`tool` (={tool!r}) must be a dict in OpenAI function format")
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise TypeError(
            f"`tool` (={dict(tool)!r}) has no function name; pass "
            '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
        )
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": function.get("description", ""),
            "parameters": dict(parameters),
        },
    }


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """Text for the system message that lists ``tools`` and the call format.

    Args:
        tools: OpenAI-format tool schemas (see :func:`normalize_tool`).

    Returns:
        A prompt naming every tool with its JSON schema inside ``<tools></tools>``, and asking for
        calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
    """
    lines = [
        "You can call the following tools. Each tool is described by a JSON schema:",
        "<tools>",
        *(json.dumps(normalize_tool(tool), ensure_ascii=False) for tool in tools),
        "</tools>",
        "To call a tool, answer with one JSON object per call inside tool_call tags:",
        f'{TOOL_CALL_OPEN}{{"name": "<tool name>", "arguments": {{<arguments>}}}}{TOOL_CALL_CLOSE}',
        "Call a tool only when it helps; otherwise answer the user directly.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Parsing


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(BaseModel):
    """One parsed tool call."""

    id: str = Field(default_factory=_new_call_id, description="unique id, `call_<hex>`")
    name: str = Field(description="the tool's name")
    arguments: dict[str, Any] = Field(default_factory=dict, description="the call's arguments")


def _call_from_json(value: Any) -> list[ToolCall] | None:
    """Calls encoded by ``value`` (one ``{"name", "arguments"}`` object or a list of them), or
    ``None`` when ``value`` is not a call."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(name=item["name"], arguments=arguments))
    return calls or None


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _bare_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Calls written as bare JSON (optionally in a code fence), anywhere in ``text``."""
    fenced = _FENCE.match(text.strip())
    body = fenced.group(1) if fenced else text
    decoder = json.JSONDecoder()
    content, calls, position = [], [], 0
    while True:
        start = min(
            (i for i in (body.find("{", position), body.find("[", position)) if i >= 0), default=-1
        )
        if start < 0:
            break
        try:
            value, end = decoder.raw_decode(body, start)
        except json.JSONDecodeError:
            content.append(body[position : start + 1])
            position = start + 1
            continue
        found = _call_from_json(value)
        content.append(body[position:start] if found else body[position:end])
        calls.extend(found or [])
        position = end
    content.append(body[position:])
    if not calls:
        return text, []
    return "".join(content).strip(), calls


class ToolCallStreamParser:
    """Split streamed text into content and tool calls, one delta at a time.

    Content outside ``<tool_call>`` tags is released as soon as it cannot be the start of a tag;
    a call is released when its closing tag arrives. Output that *starts* with ``{``, ``[`` or a
    code fence is held to the end and parsed as bare JSON calls. Malformed calls are returned as
    content, never raised.

    >>> parser = ToolCallStreamParser()
    >>> parser.feed('Sure. <tool_call>{"name": "f", "argu')
    ['Sure. ']
    >>> [type(x).__name__ for x in parser.feed('ments": {}}</tool_call>') + parser.finish()]
    ['ToolCall']
    """

    def __init__(self, tool_names: Iterable[str] | None = None) -> None:
        self._names = set(tool_names) if tool_names is not None else None
        self._buffer = ""
        self._mode = "start"  # start | text | call | bare

    def _known(self, calls: list[ToolCall] | None) -> bool:
        return bool(calls) and (self._names is None or all(c.name in self._names for c in calls))

    def feed(self, delta: str) -> list[str | ToolCall]:
        """Add ``delta``; return the content strings and :class:`ToolCall`\\ s now certain."""
        self._buffer += delta
        out: list[str | ToolCall] = []
        while True:
            if self._mode == "start":
                stripped = self._buffer.lstrip()
                if not stripped:
                    return out
                self._mode = "bare" if stripped[0] in "{[`" else "text"
            if self._mode == "bare":
                return out
            if self._mode == "text":
                index = self._buffer.find(TOOL_CALL_OPEN)
                if index < 0:
                    hold = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
                    release = self._buffer[: len(self._buffer) - hold]
                    self._buffer = self._buffer[len(release) :]
                    if release:
                        out.append(release)
                    return out
                if index:
                    out.append(self._buffer[:index])
                self._buffer = self._buffer[index:]
                self._mode = "call"
            if self._mode == "call":
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return out
                block = self._buffer[: end + len(TOOL_CALL_CLOSE)]
                self._buffer = self._buffer[len(block) :]
                self._mode = "text"
                out.extend(self._parse_block(block))

    def _parse_block(self, block: str) -> list[str | ToolCall]:
        body = block[len(TOOL_CALL_OPEN) :]
        body = body[: -len(TOOL_CALL_CLOSE)] if body.endswith(TOOL_CALL_CLOSE) else body
        try:
            calls = _call_from_json(json.loads(body))
        except json.JSONDecodeError:
            calls = None
        if self._known(calls):
            return list(calls or [])
        logger.debug("malformed tool call kept as text: %r", block)
        return [block]

    def finish(self) -> list[str | ToolCall]:
        """Flush what is held at the end of the output."""
        buffer, mode = self._buffer, self._mode
        self._buffer, self._mode = "", "start"
        if not buffer:
            return []
        if mode == "call":
            return self._parse_block(buffer)
        if mode == "bare":
            content, calls = _bare_calls(buffer)
            if not self._known(calls):
                return [buffer]
            return ([content] if content else []) + list(calls)
        return [buffer]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def parse_tool_calls(
    text: str, tool_names: Iterable[str] | None = None
) -> tuple[str, list[ToolCall]]:
    """Split a model answer into its content and its tool calls.

    Recognises ``<tool_call>{...}</tool_call>`` blocks (several, or a JSON list in one block; a
    missing closing tag at the very end is tolerated) and an answer that is bare JSON, optionally
    fenced. ``arguments`` may also be called ``parameters`` or be a JSON string. Malformed JSON and,
    when ``tool_names`` is given, calls to unknown tools stay in the content.

    Returns:
        ``(content, calls)``: the text without the calls (stripped), and the calls in order.
    """
    parser = ToolCallStreamParser(tool_names)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    return (content.strip() if calls else content), calls


# --------------------------------------------------------------------------------------------
# Grammar: JSON schema -> character automaton


@dataclass(eq=False)
class _Lit:
    text: str


@dataclass(eq=False)
class _Seq:
    items: tuple[Any, ...]


@dataclass(eq=False)
class _Choice:
    options: tuple[Any, ...]


@dataclass(eq=False)
class _Str:
    """A JSON string body and its closing quote (the opening quote is a literal before it)."""

    max_length: int


@dataclass(eq=False)
class _Num:
    integer: bool
    max_length: int = 20


@dataclass(eq=False)
class _ArrayMore:
    """``]`` or ``, <item>`` followed by itself again."""

    item: Any
    node: Any = field(init=False)

    def __post_init__(self) -> None:
        self.node = _Choice((_Lit("]"), _seq(_Lit(", "), self.item, self)))


def _seq(*items: Any) -> Any:
    """A sequence with nested sequences flattened and adjacent literals merged."""
    flat: list[Any] = []
    for item in items:
        for part in item.items if isinstance(item, _Seq) else (item,):
            if isinstance(part, _Lit) and flat and isinstance(flat[-1], _Lit):
                flat[-1] = _Lit(flat[-1].text + part.text)
            else:
                flat.append(part)
    return flat[0] if len(flat) == 1 else _Seq(tuple(flat))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


DEFAULT_MAX_STRING = 256


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"schema `$ref` (={ref!r}) must point inside the schema ('#/...')")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _compile(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int = 0) -> Any:
    """Compile a JSON schema into grammar nodes."""
    if depth > 16:
        raise ValueError("schema nests deeper than 16 levels; recursive schemas are not supported")
    schema = _resolve(schema, root)
    if "const" in schema:
        return _Lit(_dumps(schema["const"]))
    if "enum" in schema:
        return _Choice(tuple(_Lit(_dumps(v)) for v in schema["enum"]))
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = tuple(_compile(s, root, depth + 1) for s in schema[key])
            if key == "allOf" and len(options) != 1:
                raise ValueError("schema `allOf` with several parts is not supported")
            return options[0] if len(options) == 1 else _Choice(options)
    kind = schema.get("type")
    if isinstance(kind, list):
        return _Choice(tuple(_compile({**schema, "type": k}, root, depth + 1) for k in kind))
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties", {})
        required = [k for k in properties if k in schema.get("required", [])]
        if not required:
            return _Lit("{}")
        parts: list[Any] = [_Lit("{")]
        for index, key in enumerate(required):
            parts.append(_Lit(("" if index == 0 else ", ") + _dumps(key) + ": "))
            parts.append(_compile(properties[key], root, depth + 1))
        parts.append(_Lit("}"))
        return _seq(*parts)
    if kind == "array":
        item = _compile(schema.get("items", {}), root, depth + 1)
        return _seq(_Lit("["), _Choice((_Lit("]"), _seq(item, _ArrayMore(item)))))
    if kind == "string":
        return _seq(_Lit('"'), _Str(int(schema.get("maxLength", DEFAULT_MAX_STRING))))
    if kind == "integer":
        return _Num(integer=True)
    if kind == "number":
        return _Num(integer=False)
    if kind == "boolean":
        return _Choice((_Lit("true"), _Lit("false")))
    if kind == "null":
        return _Lit("null")
    if kind is None:  # any value: a scalar
        return _Choice(
            (
                _seq(_Lit('"'), _Str(DEFAULT_MAX_STRING)),
                _Num(integer=False),
                _Lit("true"),
                _Lit("false"),
                _Lit("null"),
            )
        )
    raise ValueError(f"schema type (={kind!r}) is not supported; use a JSON schema type")


# A configuration is a tuple: ("lit", text, offset, rest) | ("str", node, length, rest)
# | ("num", node, phase, length, rest) | ("end",); ``rest`` is a linked list (node, rest) | None.
# A state is a frozenset of configurations (the automaton is non-deterministic at choices).
_END = ("end",)
_DIGITS = frozenset("0123456789")
_NUMBER_ACCEPT = frozenset({"zero", "int", "frac", "exp"})


def _number_step(phase: str, char: str, integer: bool) -> str | None:
    """The JSON number DFA: ``-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?``."""
    digit = char in _DIGITS
    if phase == "start":
        return "minus" if char == "-" else "zero" if char == "0" else "int" if digit else None
    if phase == "minus":
        return "zero" if char == "0" else "int" if digit else None
    if phase == "int" and digit:
        return "int"
    if phase in ("zero", "int") and not integer:
        return "frac0" if char == "." else "exp0" if char in "eE" else None
    if phase in ("frac0", "frac") and digit:
        return "frac"
    if phase == "frac" and char in "eE":
        return "exp0"
    if phase == "exp0" and char in "+-":
        return "exp_sign"
    if phase in ("exp0", "exp_sign", "exp") and digit:
        return "exp"
    return None


def _is_string_char(char: str) -> bool:
    return char not in '"\\' and ord(char) >= 0x20


class _Grammar:
    """A character-level recogniser of the language of one grammar node."""

    def __init__(self, node: Any) -> None:
        self.initial = frozenset(self._expand(node, None))
        self._memo: dict[tuple[frozenset, str], frozenset] = {}

    def _expand(self, node: Any, rest: Any) -> set[tuple]:
        """Configurations that start ``node`` followed by ``rest``."""
        if isinstance(node, _Lit):
            return {("lit", node.text, 0, rest)} if node.text else self._expand_rest(rest)
        if isinstance(node, _Seq):
            for item in reversed(node.items[1:]):
                rest = (item, rest)
            return self._expand(node.items[0], rest)
        if isinstance(node, _Choice):
            return set().union(*(self._expand(option, rest) for option in node.options))
        if isinstance(node, _ArrayMore):
            return self._expand(node.node, rest)
        if isinstance(node, _Str):
            return {("str", node, 0, rest)}
        if isinstance(node, _Num):
            return {("num", node, "start", 0, rest)}
        raise TypeError(f"unknown grammar node {node!r}")

    def _expand_rest(self, rest: Any) -> set[tuple]:
        return {_END} if rest is None else self._expand(rest[0], rest[1])

    def _step_config(self, config: tuple, char: str) -> set[tuple]:
        kind = config[0]
        if kind == "lit":
            _, text, offset, rest = config
            if text[offset] != char:
                return set()
            if offset + 1 == len(text):
                return self._expand_rest(rest)
            return {("lit", text, offset + 1, rest)}
        if kind == "str":
            _, node, length, rest = config
            if char == '"':
                return self._expand_rest(rest)
            if length < node.max_length and _is_string_char(char):
                return {("str", node, length + 1, rest)}
            return set()
        if kind == "num":
            _, node, phase, length, rest = config
            following = _number_step(phase, char, node.integer)
            if following is not None and length < node.max_length:
                return {("num", node, following, length + 1, rest)}
            if phase in _NUMBER_ACCEPT:
                return set().union(*(self._step_config(c, char) for c in self._expand_rest(rest)))
            return set()
        return set()

    def step(self, state: frozenset, char: str) -> frozenset:
        """The state after ``char`` (empty when ``char`` is not allowed)."""
        key = (state, char)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) > 500_000:
                self._memo.clear()
            found = frozenset().union(*(self._step_config(c, char) for c in state))
            self._memo[key] = found
        return found

    def advance(self, state: frozenset, text: str) -> frozenset:
        for char in text:
            if not state:
                break
            state = self.step(state, char)
        return state

    def shortest_completion(self, state: frozenset) -> str:
        """A shortest text that completes ``state`` ("" when it is complete)."""
        return min((self._config_completion(c) for c in state), key=len, default="")

    def _config_completion(self, config: tuple) -> str:
        kind = config[0]
        if kind == "lit":
            return config[1][config[2] :] + self._rest_completion(config[3])
        if kind == "str":
            return '"' + self._rest_completion(config[3])
        if kind == "num":
            head = "" if config[2] in _NUMBER_ACCEPT else "0"
            return head + self._rest_completion(config[4])
        return ""

    def _rest_completion(self, rest: Any) -> str:
        text = ""
        while rest is not None:
            text += self._node_completion(rest[0])
            rest = rest[1]
        return text

    def _node_completion(self, node: Any) -> str:
        if isinstance(node, _Lit):
            return node.text
        if isinstance(node, _Seq):
            return "".join(self._node_completion(item) for item in node.items)
        if isinstance(node, _Choice):
            return min((self._node_completion(o) for o in node.options), key=len)
        if isinstance(node, _ArrayMore):
            return "]"
        if isinstance(node, _Str):
            return '"'
        return "0"  # _Num

    def is_complete(self, state: frozenset) -> bool:
        for config in state:
            if config is _END or config == _END:
                return True
            if config[0] == "num" and config[2] in _NUMBER_ACCEPT and config[4] is None:
                return True
        return False


# --------------------------------------------------------------------------------------------
# Vocabulary tables


class _Trie:
    """Nested dicts keyed by character; key ``""`` holds the ids of tokens ending there."""

    def __init__(self) -> None:
        self.root: dict[str, Any] = {}

    def add(self, text: str, token_id: int) -> None:
        node = self.root
        for char in text:
            node = node.setdefault(char, {})
        node.setdefault("", []).append(token_id)


class _TokenTable:
    """Every token's text, a trie over them, and masks for the fast string path."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.texts = _token_texts(tokenizer, vocab_size)
        self.trie = _Trie()
        self.tails = _Trie()  # text after the first quote, for tokens `<string chars>"<tail>`
        lengths = torch.zeros(vocab_size, dtype=torch.long)
        plain = torch.zeros(vocab_size, dtype=torch.bool)
        self.quote_prefix = torch.full((vocab_size,), 1 << 30, dtype=torch.long)
        for token_id, text in enumerate(self.texts):
            if not text:
                continue
            self.trie.add(text, token_id)
            lengths[token_id] = len(text)
            quote = text.find('"')
            head = text if quote < 0 else text[:quote]
            if all(_is_string_char(c) for c in head):
                if quote < 0:
                    plain[token_id] = True
                else:
                    self.quote_prefix[token_id] = quote
                    self.tails.add(text[quote + 1 :], token_id)
        self.lengths = lengths
        self.plain = plain


def _token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """The text each token adds when decoded after other text ("" for special and added
    tokens, which a constraint never allows). Bytes of a partial UTF-8 character read as
    U+FFFD, which only a string accepts: so multi-byte characters can be written in strings."""
    size = min(len(tokenizer), vocab_size)
    anchor = tokenizer.encode("a", add_special_tokens=False)
    anchor_text = tokenizer.decode(anchor)
    pairs = tokenizer.batch_decode(
        [anchor + [i] for i in range(size)], clean_up_tokenization_spaces=False
    )
    skip = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    texts = [""] * vocab_size
    for token_id, pair in enumerate(pairs):
        if token_id in skip or not pair.startswith(anchor_text):
            continue
        texts[token_id] = pair[len(anchor_text) :]
    return texts


_TABLES: weakref.WeakKeyDictionary[Any, dict[int, _TokenTable]] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def _token_table(tokenizer: Any, vocab_size: int | None) -> _TokenTable:
    """The (cached) table of ``tokenizer``; built once per tokenizer, ~1 s for 49k tokens."""
    size = vocab_size or len(tokenizer)
    with _TABLES_LOCK:
        by_size = _TABLES.setdefault(tokenizer, {})
        if size not in by_size:
            by_size[size] = _TokenTable(tokenizer, size)
        return by_size[size]


# --------------------------------------------------------------------------------------------
# Constraints


class _GrammarConstraint:
    """A ``TokenConstraint`` that keeps the generated text inside a grammar's language."""

    def __init__(
        self,
        tokenizer: Any,
        node: Any,
        *,
        max_tokens: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"`max_tokens` (={max_tokens}) must be a positive token budget")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._table = _token_table(tokenizer, vocab_size)
        self._grammar = _Grammar(node)
        self._states: OrderedDict[tuple[int, ...], frozenset] = OrderedDict()
        self._costs: dict[frozenset, int] = {}
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self._table.vocab_size

    @property
    def min_tokens(self) -> int:
        """An upper bound on the fewest tokens a complete output takes (a greedy tokenisation
        of the shortest sentence): ``max_tokens`` below it cannot be met."""
        with self._lock:
            return self._cost(self._grammar.initial)

    def _state(self, generated: Sequence[int]) -> frozenset:
        key = tuple(int(t) for t in generated)
        state = self._states.get(key)
        if state is None:
            if not key:
                state = self._grammar.initial
            else:
                previous = self._state(key[:-1])
                text = self._table.texts[key[-1]] if key[-1] < self.vocab_size else ""
                state = self._grammar.advance(previous, text) if text else frozenset()
            self._states[key] = state
            while len(self._states) > 256:
                self._states.popitem(last=False)
        return state

    def text(self, generated: Sequence[int]) -> str:
        """The text of ``generated`` as the constraint reads it."""
        return "".join(self._table.texts[int(t)] for t in generated)

    def allowed_tokens(self, generated: Sequence[int]) -> torch.Tensor:
        """Bool mask ``(vocab,)`` of the tokens that keep the output a valid prefix and, with
        ``max_tokens``, leave enough tokens to finish: a token is allowed only if the shortest
        completion after it (tokenised greedily) fits in ``max_tokens - len(generated) - 1``."""
        with self._lock:
            state = self._state(generated)
            if not state:
                logger.warning("constrained output left its grammar; allowing only EOS")
                mask = torch.zeros(self.vocab_size, dtype=torch.bool)
                if self.tokenizer.eos_token_id is not None:
                    mask[self.tokenizer.eos_token_id] = True
                return mask
            budget = None if self.max_tokens is None else self.max_tokens - len(generated) - 1
            mask = self._mask(state, budget)
            if budget is not None and not mask.any():  # the budget cannot be met: just continue
                mask = self._mask(state, None)
            return mask

    def _mask(self, state: frozenset, budget: int | None) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        ids: list[int] = []
        walk_from = set()
        for config in state:
            if config[0] == "str":
                self._string_tokens(config, mask, budget)
            else:
                walk_from.add(config)
        if walk_from:
            self._walk(self._table.trie.root, frozenset(walk_from), ids, budget)
        if ids:
            mask[torch.tensor(ids, dtype=torch.long)] = True
        return mask

    def _cost(self, state: frozenset) -> int:
        """Tokens a greedy longest-match tokenisation of the shortest completion takes: an
        upper bound on the tokens needed to finish from ``state``."""
        cost = self._costs.get(state)
        if cost is None:
            text, root, cost, start = (
                self._grammar.shortest_completion(state),
                self._table.trie.root,
                0,
                0,
            )
            while start < len(text):
                node, end, position = root, start + 1, start
                while position < len(text) and text[position] in node:
                    node = node[text[position]]
                    position += 1
                    if "" in node:
                        end = position
                start, cost = end, cost + 1
            if len(self._costs) > 100_000:
                self._costs.clear()
            self._costs[state] = cost
        return cost

    def is_complete(self, generated: Sequence[int]) -> bool:
        """True when the output is a whole sentence of the grammar (or has left it)."""
        with self._lock:
            state = self._state(generated)
            return not state or self._grammar.is_complete(state)

    def matcher(self) -> _PrefixMatcher:
        """One row's matcher (the engine's ``TokenConstraint`` protocol)."""
        return _PrefixMatcher(self)

    def _walk(self, node: dict, state: frozenset, out: list[int], budget: int | None) -> None:
        """Collect into ``out`` the ids of every token below ``node`` readable from ``state``
        (and, with a ``budget``, leaving a completion that fits)."""
        stack = [(node, state)]
        step = self._grammar.step
        while stack:
            node, state = stack.pop()
            for char, child in node.items():
                if not char:
                    continue
                following = step(state, char)
                if following:
                    if "" in child and (budget is None or self._cost(following) <= budget):
                        out.extend(child[""])
                    stack.append((child, following))

    def _string_tokens(self, config: tuple, mask: torch.Tensor, budget: int | None) -> None:
        """Inside a string: tokens of plain string characters that fit the length limit, and
        tokens ``<chars>"<tail>`` whose tail is valid after the closing quote."""
        _, node, length, _ = config
        room = node.max_length - length
        table = self._table
        if budget is None or self._cost(frozenset({config})) <= budget:
            mask |= table.plain & (table.lengths <= room)
        closed = self._grammar.step(frozenset({config}), '"')
        ids = []
        if budget is None or self._cost(closed) <= budget:
            ids.extend(table.tails.root.get("", ()))
        self._walk(table.tails.root, closed, ids, budget)
        if ids:
            index = torch.tensor(ids, dtype=torch.long)
            mask[index[table.quote_prefix[index] <= room]] = True


class _PrefixMatcher:
    """A ``ConstraintMatcher`` over a ``_GrammarConstraint``: the row's tokens, read through the
    constraint's prefix-state cache."""

    def __init__(self, constraint: _GrammarConstraint) -> None:
        self._constraint = constraint
        self._tokens: list[int] = []

    def allowed(self) -> torch.Tensor:
        return self._constraint.allowed_tokens(self._tokens)

    def accept(self, token_id: int) -> None:
        self._tokens.append(int(token_id))

    def rollback(self, count: int) -> None:
        del self._tokens[len(self._tokens) - count :]

    def is_complete(self) -> bool:
        return self._constraint.is_complete(self._tokens)


class JsonConstraint(_GrammarConstraint):
    """Constrain decoding to one JSON value valid for ``schema`` (e.g. a pydantic model's
    ``model_json_schema()``), for structured output.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        schema: a JSON schema: objects (required properties, in order), strings (``maxLength``,
            default 256), integers, numbers, booleans, null, ``enum``, ``const``, arrays,
            ``anyOf``/``oneOf``, ``$ref`` into ``$defs``.
        max_tokens: the token budget of the call; when given, strings and arrays are closed in
            time for the output to be complete within it.
        vocab_size: the length of the mask (the model's logits); default ``len(tokenizer)``.
    """

    def __init__(
        self,
        tokenizer: Any,
        schema: Mapping[str, Any],
        *,
        max_tokens: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.schema = dict(schema)
        node = _compile(schema, schema)
        super().__init__(tokenizer, node, max_tokens=max_tokens, vocab_size=vocab_size)


class ToolCallConstraint(_GrammarConstraint):
    """Constrain decoding to exactly one call
    ``<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>`` of one of ``tools`` (of
    ``name`` only, when given), with arguments valid for that tool's parameters schema.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        tools: OpenAI-format tool schemas.
        name: force this tool.
        max_tokens: the token budget of the call; when given, strings and arrays are closed in
            time for the output to be complete within it.
        vocab_size: the length of the mask (the model's logits); default ``len(tokenizer)``.

    Raises:
        ValueError: ``tools`` is empty or ``name`` is not one of them.
    """

    def __init__(
        self,
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]],
        name: str | None = None,
        *,
        max_tokens: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        functions = [normalize_tool(tool)["function"] for tool in tools]
        names = [f["name"] for f in functions]
        if name is not None and name not in names:
            raise ValueError(f"`name` (={name!r}) is not a tool; choose one of {names}")
        chosen = [f for f in functions if name is None or f["name"] == name]
        if not chosen:
            raise ValueError("`tools` is empty; pass at least one tool schema")
        self.tool_names = [f["name"] for f in chosen]
        options = tuple(
            _seq(
                _Lit(f'{TOOL_CALL_OPEN}{{"name": {_dumps(f["name"])}, "arguments": '),
                _compile(f["parameters"], f["parameters"]),
                _Lit("}" + TOOL_CALL_CLOSE),
            )
            for f in chosen
        )
        node = options[0] if len(options) == 1 else _Choice(options)
        super().__init__(tokenizer, node, max_tokens=max_tokens, vocab_size=vocab_size)
