"""Named evaluation sets (the fixed test splits of :mod:`ngsd_guard.splits`) and JSONL sets.

| name | what | label |
| --- | --- | --- |
| ``advbench-test`` | AdvBench ids 260-519 | harmful |
| ``donotanswer-test`` | Do-Not-Answer harm categories, every fifth request | harmful |
| ``project-harmful`` | the project's harmful requests (held-out quarter) | harmful |
| ``xstest-safe`` | XSTest safe prompts (250) | benign |
| ``xstest-unsafe`` | XSTest unsafe prompts (200) | harmful |
| ``alpaca`` | AlpacaEval items 0-99 | benign |
| ``project-benign`` | the project's benign look-alikes, held-out quarter | benign |
| ``path/to/file.jsonl`` | one request per line (below) | per line |

A JSONL line holds ``"prompt"`` (a user message) or ``"messages"`` (chat messages), optionally
``"tools"`` (OpenAI tool schemas), ``"tool_choice"`` and ``"response_format"`` (the answer
decoded under its JSON schema), and ``"label"`` (``harmful`` or ``benign``); lines that also
carry ``"set"`` and ``"context"`` (as :func:`export_jsonl` writes them) are grouped by them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .. import sources
from ..contexts import Conversation, wrap_for_eval
from ..errors import ConfigError

NAMED_SETS = (
    "advbench-test",
    "donotanswer-test",
    "project-harmful",
    "xstest-safe",
    "xstest-unsafe",
    "alpaca",
    "project-benign",
)
LABELS = ("harmful", "benign")


@dataclass(frozen=True)
class EvalSet:
    """Requests of one set and one label, each in the set's context."""

    name: str
    label: str
    items: tuple[Conversation, ...]
    context: str = "bare"

    @property
    def prompts(self) -> tuple[str, ...]:
        """The bare requests."""
        return tuple(item.request for item in self.items)

    def in_context(self, context: str, *, seed: int = 0) -> EvalSet:
        """The same requests placed in ``context`` (its held-out side)."""
        if self.context != "bare":
            raise ConfigError(f"set {self.name!r} is already in context {self.context!r}")
        return replace(
            self, items=tuple(wrap_for_eval(self.prompts, context, seed=seed)), context=context
        )


def _bare(name: str, label: str, requests: Sequence[sources.Request]) -> EvalSet:
    items = tuple(Conversation(r.text, ({"role": "user", "content": r.text},)) for r in requests)
    return EvalSet(name, label, items)


def load_set(
    name: str, data_dir: str | Path, *, limit: int | None = None, seed: int | None = None
) -> list[EvalSet]:
    """One :class:`EvalSet` per label (and set × context for an exported JSONL file): with
    ``limit``, its first ``limit`` requests, or with ``seed`` too, ``limit`` drawn at random
    (in their order in the set), which represents a set whose head is of one kind."""
    data_dir = Path(data_dir)
    named = {
        "advbench-test": ("harmful", lambda: sources.advbench(data_dir, "eval")),
        "donotanswer-test": ("harmful", lambda: sources.donotanswer(data_dir, "eval")),
        "project-harmful": ("harmful", lambda: sources.project("harmful", "eval")),
        "xstest-safe": ("benign", lambda: sources.xstest(data_dir, "safe")),
        "xstest-unsafe": ("harmful", lambda: sources.xstest(data_dir, "unsafe")),
        "alpaca": ("benign", lambda: sources.alpaca(data_dir, "eval")),
        "project-benign": ("benign", lambda: sources.project("benign", "eval")),
    }
    if name in named:
        label, read = named[name]
        sets = [_bare(name, label, read())]
    elif name.endswith(".jsonl") or Path(name).is_file():
        sets = _load_jsonl(Path(name))
    else:
        raise ConfigError(
            f"`--sets` item (={name!r}) is neither one of {', '.join(NAMED_SETS)} nor a JSONL file"
        )
    if limit is not None:
        sets = [replace(s, items=_head_or_sample(s.items, limit, seed)) for s in sets]
    return [s for s in sets if s.items]


def _head_or_sample(items: tuple, limit: int, seed: int | None) -> tuple:
    if seed is None or limit >= len(items):
        return items[:limit]
    return tuple(items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit)))


def _load_jsonl(path: Path) -> list[EvalSet]:
    if not path.is_file():
        raise ConfigError(f"JSONL set (={str(path)!r}) not found")
    groups: dict[tuple[str, str, str], list[Conversation]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        has_prompt = isinstance(row.get("prompt"), str)
        has_messages = isinstance(row.get("messages"), list) and bool(row["messages"])
        if row.get("label") not in LABELS or has_prompt == has_messages:
            raise ConfigError(
                f"{path}:{number}: each line needs either a string `prompt` or a list of "
                f"`messages`, and a `label` in {LABELS}; got {row!r}"
            )
        key = (row.get("set", path.name), row.get("context", "bare"), row["label"])
        groups.setdefault(key, []).append(Conversation.from_json(row))
    return [
        EvalSet(name, label, tuple(items), context)
        for (name, context, label), items in groups.items()
    ]


def export_jsonl(sets: Sequence[EvalSet], path: str | Path) -> int:
    """Write ``sets`` (already in their contexts) as JSONL that :func:`load_set` reads back."""
    lines = [
        json.dumps({"set": s.name, "label": s.label, **item.to_json()})
        for s in sets
        for item in s.items
    ]
    Path(path).write_text("\n".join(lines) + "\n")
    return len(lines)
