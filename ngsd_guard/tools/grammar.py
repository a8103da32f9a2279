"""Token constraints backed by llguidance grammars: one matcher per row, rollback, and closing
within a token budget.

A :class:`GrammarConstraint` holds a compiled-once grammar (Lark with inline JSON schemas, see
https://github.com/guidance-ai/llguidance) and hands out one :class:`GrammarMatcher` per row. The
matcher's mask is llguidance's: every token whose bytes keep the output a prefix of the
grammar's language, so strings may hold any escape, objects any optional property, and so on.

**Token budget.** With ``max_tokens``, a matcher keeps a *closing path*: a token sequence that
finishes the output from where it stands (found by a walk over the grammar that takes forced
tokens, then the first allowed of ``" ] } , 0 :`` ...). While at least ``closing_bound`` tokens
are left, every grammar token is allowed (no prefix can take more than that to close). Below
it, a token is allowed only if a closing path still fits after it. Checking that per token
would be slow inside strings, so there tokens are checked by kind, one representative each:
every content token leaves the path as it is, and every token ``<content>"<tail>`` costs what
its tail costs; outside strings, every ``"<content>`` opens a free string alike (checked by the
one with the least content), and the few other tokens the grammar allows are checked one by
one. The first token of the current path is
always allowed. So the output is complete within ``max_tokens``, and a budget
below the shortest output is a :class:`~ngsd_guard.errors.ConfigError` at construction.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import torch

from ..errors import ConfigError
from .formats import ToolFormat, tool_format
from .schemas import closing_bound, json_rule, normalize_tool

__all__ = [
    "GrammarConstraint",
    "GrammarMatcher",
    "JsonConstraint",
    "ToolCallConstraint",
]

logger = logging.getLogger(__name__)


_WALK_ORDER = '"]},0:nultrefas-.1'
_BIT_VALUES = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as llguidance and the budget checks see it (built once per tokenizer)."""

    tokenizer: llguidance.LLTokenizer
    size: int
    eos_id: int
    string_content: torch.Tensor
    """(V,) bool: tokens that are string content anywhere in a string (no ``"``, ``\\``,
    control characters)."""
    token_bytes: tuple[bytes, ...]
    """Each token's bytes (empty for special tokens)."""
    walk_order: tuple[int, ...]
    """Single-character tokens the closing walk tries, in order."""
    string_probe: int
    """A token (``q``) that only string content can be: allowed means "inside a string"."""


_VOCABULARIES: weakref.WeakKeyDictionary[Any, Vocabulary] = weakref.WeakKeyDictionary()
_VOCABULARIES_LOCK = threading.Lock()


def vocabulary(tokenizer: Any) -> Vocabulary:
    """The :class:`Vocabulary` of a Hugging Face fast tokenizer, built offline from its own
    ``tokenizer.json`` (about 0.5 s for 49k tokens) and kept while the tokenizer lives."""
    with _VOCABULARIES_LOCK:
        found = _VOCABULARIES.get(tokenizer)
        if found is None:
            found = _VOCABULARIES[tokenizer] = _build_vocabulary(tokenizer)
        return found


def _build_vocabulary(tokenizer: Any) -> Vocabulary:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token")
    size = len(tokenizer)
    bridge = llguidance.hf.from_tokenizer(tokenizer, n_vocab=size)
    content = torch.zeros(size, dtype=torch.bool)
    texts: list[bytes] = []
    single: dict[bytes, int] = {}
    for token_id in range(size):
        data = b"" if bridge.is_special_token(token_id) else bridge.decode_bytes([token_id])
        texts.append(data)
        if not data:
            continue
        if len(data) == 1:
            single.setdefault(data, token_id)
        if min(data) >= 0x20 and b'"' not in data and b"\\" not in data:
            content[token_id] = True
    if b"q" not in single:
        raise ConfigError("the tokenizer has no single-byte token 'q'; it is not byte-level BPE")
    order = tuple(single[c.encode()] for c in _WALK_ORDER if c.encode() in single)
    return Vocabulary(
        bridge, size, tokenizer.eos_token_id, content, tuple(texts), order, single[b"q"]
    )


def _is_allowed(bits: bytes, token_id: int) -> bool:
    return bool(bits[token_id >> 3] >> (token_id & 7) & 1)


def _unpack(bits: bytes, size: int) -> torch.Tensor:
    """llguidance's bitmask (bit ``i % 8`` of byte ``i // 8`` is token ``i``) as (V,) bool."""
    raw = torch.frombuffer(bytearray(bits), dtype=torch.uint8)
    return (raw.unsqueeze(-1) & _BIT_VALUES).ne(0).flatten()[:size]


def _closing_path(matcher: llguidance.LLMatcher, vocab: Vocabulary, limit: int) -> list[int] | None:
    """Tokens that finish the output from ``matcher``'s state (left unchanged), or None when
    the walk takes more than ``limit`` tokens. Forced tokens first; else the first allowed of
    :data:`_WALK_ORDER`; else the lowest allowed token id."""
    walk = matcher.deep_copy()
    path: list[int] = []
    while not (walk.is_stopped() or walk.is_accepting()):
        tokens = walk.compute_ff_tokens()
        if not tokens:
            bits = walk.compute_bitmask()
            token = next((t for t in vocab.walk_order if _is_allowed(bits, t)), None)
            if token is None:
                allowed = _unpack(bits, vocab.size).nonzero().flatten()
                if not len(allowed):
                    return None
                token = int(allowed[0])
            tokens = [token]
        for token in tokens:
            if len(path) >= limit or not walk.consume_token(token):
                return None
            path.append(token)
    return path


class GrammarConstraint:
    """A ``TokenConstraint`` over a llguidance grammar: :meth:`matcher` gives each row its own.

    Args:
        tokenizer: the model's Hugging Face fast tokenizer.
        grammar: a Lark grammar (llguidance's dialect: ``%json {...}`` inlines a JSON schema,
            ``<[id]>`` is the token ``id``).
        closing_bound: at most this many tokens close any prefix of the language.
        max_tokens: the output must be complete within this many tokens (EOS included).
        description: what the grammar is, for error messages.

    Raises:
        ConfigError: the grammar does not compile, or its shortest output does not fit in
            ``max_tokens``.
    """

    def __init__(
        self,
        tokenizer: Any,
        grammar: str,
        *,
        closing_bound: int,
        max_tokens: int | None = None,
        description: str = "the constrained output",
    ) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"`max_tokens` (={max_tokens}) must be a positive token budget")
        self.vocabulary = vocabulary(tokenizer)
        self.grammar = grammar
        self.closing_bound = closing_bound
        self.max_tokens = max_tokens
        start = llguidance.LLMatcher(self.vocabulary.tokenizer, grammar, log_level=0)
        if start.is_error():
            raise ConfigError(f"{description} does not compile to a grammar: {start.get_error()}")
        path = _closing_path(start, self.vocabulary, limit=4 * closing_bound + 64)
        if path is None:
            raise ConfigError(f"{description} has no finite output the grammar engine can reach")
        self.min_tokens = len(path)
        """Tokens of the closing walk from the start: an upper bound on the shortest output."""
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise ConfigError(
                f"`max_tokens` (={max_tokens}) is too small for {description}, which takes up "
                f"to {self.min_tokens} tokens at its shortest; raise `max_tokens`"
            )

    @property
    def vocab_size(self) -> int:
        return self.vocabulary.size

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar, for one row."""
        return GrammarMatcher(self)

    def text(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` as the grammar reads it."""
        return self.vocabulary.tokenizer.decode_str(list(token_ids))


class GrammarMatcher:
    """One row's position in a :class:`GrammarConstraint` (the ``ConstraintMatcher`` protocol).

    >>> matcher = JsonConstraint(tokenizer, {"type": "boolean"}).matcher()  # doctest: +SKIP
    >>> matcher.allowed()  # (V,) bool: "true" / "false" prefixes  # doctest: +SKIP
    """

    def __init__(self, constraint: GrammarConstraint) -> None:
        self.constraint = constraint
        vocab = constraint.vocabulary
        self._vocab = vocab
        self._matcher = llguidance.LLMatcher(vocab.tokenizer, constraint.grammar, log_level=0)
        self._accepted = 0
        self._path: list[int] | None = None  # closing path from the current state, if known

    @property
    def accepted(self) -> int:
        """Tokens accepted so far."""
        return self._accepted

    def allowed(self) -> torch.Tensor:
        """(V,) bool on CPU: the tokens allowed next (EOS once the output may end)."""
        mask = _unpack(self._matcher.compute_bitmask(), self._vocab.size)
        budget = self.constraint.max_tokens
        if budget is None:
            return mask
        left = budget - self._accepted - 1  # tokens that may follow the next one
        if left >= self.constraint.closing_bound:
            return mask
        return self._within_budget(mask, left)

    def _within_budget(self, mask: torch.Tensor, left: int) -> torch.Tensor:
        """The tokens of ``mask`` after which a closing path of at most ``left`` tokens exists
        (see the module docstring)."""
        vocab = self._vocab
        path = self._closing()
        keep = torch.zeros_like(mask)
        if path is None:  # cannot happen while the budget held; end as soon as allowed
            logger.warning("constrained output cannot close within its budget")
            keep[vocab.eos_id] = mask[vocab.eos_id]
            return keep if keep.any() else mask
        if path:
            keep[path[0]] = True
        else:
            keep[vocab.eos_id] = mask[vocab.eos_id]
        in_string = bool(mask[vocab.string_probe])
        if in_string and left >= len(path):
            keep |= mask & vocab.string_content
        groups: dict[bytes, list[int]] = {}
        for token in (mask & ~keep).nonzero().flatten().tolist():
            groups.setdefault(self._kind(token, in_string), []).append(token)
        for kind, tokens in groups.items():
            if kind == b"" and left >= len(path):  # string content with escapes
                keep[tokens] = True
                continue
            if kind == b'"':  # strings opened with content: alike when the string is free
                tokens.sort(key=lambda t: len(vocab.token_bytes[t]))  # the least content
                after = self._after(tokens[0])
                if not _is_allowed(after.compute_bitmask(), vocab.string_probe):
                    keep[[t for t in tokens if self._fits(self._after(t), left)]] = True
                    continue
            else:
                after = self._after(tokens[0])
            if self._fits(after, left):
                keep[tokens] = True
        return keep

    def _after(self, token: int) -> llguidance.LLMatcher:
        after = self._matcher.deep_copy()
        after.consume_token(token)
        return after

    def _fits(self, matcher: llguidance.LLMatcher, left: int) -> bool:
        return _closing_path(matcher, self._vocab, limit=left) is not None

    def _kind(self, token: int, in_string: bool) -> bytes:
        """Tokens of one kind cost the same to close after. In a string: content with complete
        escapes is ``b""`` (the path stays), ``<content>"<tail>`` is its tail; outside one,
        ``"<content>`` is ``b'"'``; any other token is its own kind."""
        data = self._vocab.token_bytes[token]
        if in_string:
            escaped = False
            for position, byte in enumerate(data):
                if escaped:
                    escaped = False
                elif byte == 0x5C:  # a backslash: an escape starts
                    escaped = True
                elif byte == 0x22:  # the string's closing quote
                    return data[position:]
            if not escaped:
                return b""
        elif data[:1] == b'"' and b'"' not in data[1:] and b"\\" not in data:
            return b'"'
        return b"\x00%d" % token

    def _closing(self) -> list[int] | None:
        if self._path is None:
            budget = self.constraint.max_tokens or 0
            self._path = _closing_path(self._matcher, self._vocab, budget - self._accepted)
        return self._path

    def accept(self, token_id: int) -> None:
        """Advance by one allowed token.

        Raises:
            ValueError: the grammar does not allow ``token_id`` here.
        """
        if not self._matcher.consume_token(token_id):
            raise ValueError(
                f"token {token_id} is not allowed here by the grammar: {self._matcher.get_error()}"
            )
        self._accepted += 1
        path = self._path
        self._path = path[1:] if path and path[0] == token_id else None

    def rollback(self, count: int) -> None:
        """Undo the last ``count`` accepted tokens (a cut draft)."""
        if count > self._accepted:
            raise ValueError(f"`count` (={count}) exceeds the {self._accepted} accepted tokens")
        if count:
            self._matcher.rollback(count)
            self._accepted -= count
            self._path = None

    def is_complete(self) -> bool:
        """True when the output is finished: the grammar allows nothing more."""
        return self._matcher.is_stopped()


class JsonConstraint(GrammarConstraint):
    """One JSON value valid for ``schema``, for structured output.

    Args:
        tokenizer: the model's Hugging Face fast tokenizer.
        schema: a JSON schema, as llguidance supports it: string escapes, optional properties,
            maps (``additionalProperties``), ``enum``/``const``, ``anyOf``/``oneOf``/``allOf``,
            ``$ref``/``$defs``, arrays with ``minItems``/``maxItems``, numbers with bounds,
            nulls, string ``pattern``/``format``/length.
        max_tokens: the output must be complete within this many tokens.

    Raises:
        ConfigError: an unsupported schema, or a budget below the shortest output.
    """

    def __init__(
        self, tokenizer: Any, schema: Mapping[str, Any], *, max_tokens: int | None = None
    ) -> None:
        self.schema = dict(schema)
        super().__init__(
            tokenizer,
            f"start: {json_rule(self.schema)}",
            closing_bound=closing_bound(self.schema) + 16,
            max_tokens=max_tokens,
            description="the JSON schema",
        )


class ToolCallConstraint(GrammarConstraint):
    """Exactly one call of one of ``tools`` (of ``name`` only, when given) in the model's own
    format, with arguments valid for the tool's parameters; with ``answer_schema``, either such
    a call or a JSON answer valid for that schema (tools offered beside a response format).

    Args:
        tokenizer: the model's Hugging Face fast tokenizer.
        tools: OpenAI-format tool schemas.
        name: force this tool.
        format: the call format; default :func:`~ngsd_guard.tools.formats.tool_format` of
            ``tokenizer`` (read from its chat template).
        answer_schema: also allow a plain JSON answer valid for this schema.
        max_tokens: the output must be complete within this many tokens.

    Raises:
        ValueError: ``tools`` is empty or ``name`` is not one of them.
        ConfigError: a budget below the shortest call.
    """

    def __init__(
        self,
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]],
        name: str | None = None,
        *,
        format: ToolFormat | None = None,
        answer_schema: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.format = format or tool_format(tokenizer)
        self.tool_names = [
            f["function"]["name"]
            for f in map(normalize_tool, tools)
            if name is None or f["function"]["name"] == name
        ]
        rules = [self.format.call_rule(tools, name)]
        bound = self.format.call_bound(tools, name)
        if answer_schema is None:
            rules.insert(0, "start: call")
        else:
            rules[:0] = ["start: call | answer", f"answer: {json_rule(answer_schema)}"]
            bound = max(bound, closing_bound(answer_schema))
        super().__init__(
            tokenizer,
            "\n".join(rules),
            closing_bound=bound + 16,
            max_tokens=max_tokens,
            description="the forced tool call" if answer_schema is None else "the answer",
        )
