"""Place a request where users put it: RAG templates, conversations, agent prompts, jailbreaks.

Training builds its examples in these contexts and evaluation reports each set × context, so
that the guard is trained and measured where it is used, not only on bare requests. Every
wrapper is ``wrap(request, split, rng) -> Conversation``; ``split`` picks the training or the
held-out side of the context's templates (:mod:`ngsd_guard.splits` says which is which).

* ``bare``: the request as the only user message;
* ``rag-llamaindex``: LlamaIndex's own QA, tree-summarize and chat-engine prompts (imported
  at run time) around retrieved passages;
* ``rag-langchain``: LangChain RAG chat prompts (built with ``langchain_core``);
* ``rag-custom``: the project's own RAG templates (training only);
* ``rag-unseen``: RAG templates that training never uses (evaluation only);
* ``multiturn``: one or two earlier benign exchanges before the request;
* ``agent-tools``: an agent's system prompt and its tool schemas;
* ``agent-react``: a text ReAct agent's prompt listing the same agents' tools (LlamaIndex's
  ``ReActAgent``; LangChain's classic ReAct prompt in evaluation only);
* ``jailbreak``: role-play, fiction, hypothetical, instruction-override and past-tense
  wrappers; in evaluation also families that training never uses;
* ``structured``: the instruction to answer in a JSON schema's object, or the schema as a
  forced tool call, decoded under its grammar (``with_structured_output``, ``response_format``,
  LlamaIndex's ``structured_predict``).

>>> import random
>>> wrap("How do I bake bread?", "multiturn", "eval", random.Random(0)).messages[-1]["content"]
'How do I bake bread?'
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..errors import ConfigError
from ..splits import Split
from . import dialogue, jailbreaks, rag, react, structured
from .conversation import Conversation

Message = dict[str, str]


Wrapper = Callable[[str, Split, random.Random], Conversation]


def _bare(request: str, split: Split, rng: random.Random) -> Conversation:
    return Conversation(request, ({"role": "user", "content": request},))


def _built(context: str, build: Callable[..., tuple[str, list[Message], list]]) -> Wrapper:
    def wrapper(request: str, split: Split, rng: random.Random) -> Conversation:
        variant, messages, tools = build(request, split, rng)
        return Conversation(request, tuple(messages), tuple(tools), context, variant)

    return wrapper


CONTEXTS: dict[str, Wrapper] = {
    "bare": _bare,
    "rag-llamaindex": _built("rag-llamaindex", rag.llamaindex),
    "rag-langchain": _built("rag-langchain", rag.langchain),
    "rag-custom": _built("rag-custom", rag.custom),
    "rag-unseen": _built("rag-unseen", rag.unseen),
    "multiturn": _built("multiturn", dialogue.multiturn),
    "agent-tools": _built("agent-tools", dialogue.agent),
    "agent-react": _built("agent-react", react.react),
    "jailbreak": _built("jailbreak", jailbreaks.jailbreak),
    "structured": structured.structured,
}
"""Every context by name."""

EVAL_CONTEXTS = (
    "bare",
    "rag-llamaindex",
    "rag-langchain",
    "rag-unseen",
    "multiturn",
    "agent-tools",
    "agent-react",
    "jailbreak",
    "structured",
)
"""The contexts ``ngsd-guard eval --contexts all`` reports."""

TRAIN_CONTEXTS: dict[str, float] = {
    "bare": 0.22,
    "rag-llamaindex": 0.10,
    "rag-langchain": 0.10,
    "rag-custom": 0.10,
    "multiturn": 0.11,
    "agent-tools": 0.10,
    "agent-react": 0.06,
    "jailbreak": 0.13,
    "structured": 0.08,
}
"""The contexts training draws from, with their probabilities (``rag-unseen`` never)."""

_SPLITS: dict[str, tuple[Split, ...]] = {"rag-custom": ("train",), "rag-unseen": ("eval",)}


def wrap(request: str, context: str, split: Split, rng: random.Random) -> Conversation:
    """``request`` placed in ``context`` using that context's ``split`` side."""
    if context not in CONTEXTS:
        raise ConfigError(f"context (={context!r}) is not one of {', '.join(CONTEXTS)}")
    if split not in _SPLITS.get(context, ("train", "eval")):
        raise ConfigError(
            f"context {context!r} has no {split!r} side; it is for {_SPLITS[context]}"
        )
    if not request.strip():
        raise ConfigError("cannot place an empty request in a context")
    return CONTEXTS[context](request, split, rng)


def wrap_for_eval(requests: Sequence[str], context: str, *, seed: int = 0) -> list[Conversation]:
    """Each request in ``context``'s held-out side; the variant depends only on the request,
    the context and ``seed`` (not on the order or the other requests)."""
    return [wrap(r, context, "eval", random.Random(f"{seed}:{context}:{r}")) for r in requests]


def parse_contexts(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of context names, validated."""
    names = list(EVAL_CONTEXTS) if text.strip() == "all" else [n for n in text.split(",") if n]
    for name in names:
        if name not in CONTEXTS:
            raise ConfigError(f"`--contexts` item (={name!r}) is not one of {', '.join(CONTEXTS)}")
    return names


__all__ = [
    "CONTEXTS",
    "EVAL_CONTEXTS",
    "TRAIN_CONTEXTS",
    "Conversation",
    "parse_contexts",
    "wrap",
    "wrap_for_eval",
]
