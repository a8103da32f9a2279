"""Conversations and agents: earlier benign turns before the request, or an agent's system
prompt with its tools. Pools live in ``data/contexts``; every fourth item is held out for
evaluation (:func:`ngsd_guard.splits.project_split`)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from ..splits import Split, project_split

Message = dict[str, str]

DATA = Path(__file__).parents[1] / "data" / "contexts"


@functools.cache
def conversations(split: Split) -> tuple[tuple[Message, ...], ...]:
    """Benign exchanges (user, assistant, ...) on one side of the split."""
    rows = json.loads((DATA / "conversations.json").read_text())["conversations"]
    return tuple(tuple(c) for i, c in enumerate(rows) if project_split(i) == split)


@functools.cache
def agents(split: Split) -> tuple[dict[str, Any], ...]:
    """Agent set-ups (``name``, ``system``, ``tools``) on one side of the split."""
    rows = json.loads((DATA / "agents.json").read_text())["agents"]
    return tuple(a for i, a in enumerate(rows) if project_split(i) == split)


def multiturn(request: str, split: Split, rng: random.Random) -> tuple[str, list[Message], list]:
    """One or two earlier benign exchanges, then the request."""
    turns = rng.choice((1, 2))
    chosen = rng.sample(conversations(split), turns)
    history = [dict(m) for exchange in chosen for m in exchange[:2]]
    return f"{turns}-turns", [*history, {"role": "user", "content": request}], []


def agent(request: str, split: Split, rng: random.Random) -> tuple[str, list[Message], list]:
    """An agent's system prompt and tools, then the request."""
    chosen = rng.choice(agents(split))
    messages = [
        {"role": "system", "content": chosen["system"]},
        {"role": "user", "content": request},
    ]
    return chosen["name"], messages, list(chosen["tools"])
