"""Retrieval-augmented prompts: passages on the request's topic inside RAG templates.

Passages come from the project's corpus (``data/contexts/passages.json``: encyclopedic, news,
manual and FAQ texts, never operational) and are retrieved by BM25 (``bm25s``, the engine behind
LlamaIndex's BM25 retriever), so the context is plausible text on the request's topic. The
frameworks' templates are imported from the frameworks at run time, so that the prompt is
exactly the one a LlamaIndex query engine or a LangChain RAG chain sends.

Each builder returns ``(variant, messages, tools)``.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from .. import splits
from ..splits import Split

Message = dict[str, str]
Built = tuple[str, list[Message], list]

PASSAGES_FILE = Path(__file__).parents[1] / "data" / "contexts" / "passages.json"
TOP_K = 2


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@functools.cache
def passages() -> tuple[Passage, ...]:
    rows = json.loads(PASSAGES_FILE.read_text())["passages"]
    return tuple(Passage(r["id"], r["title"], r["text"]) for r in rows)


@functools.cache
def _index():
    import bm25s

    # bm25s sets its own logger to DEBUG on import; keep its chatter at the application's level
    logging.getLogger("bm25s").setLevel(logging.NOTSET)

    corpus = [f"{p.title}. {p.text}" for p in passages()]
    index = bm25s.BM25()
    index.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
    return index


def retrieve(query: str, k: int = TOP_K) -> list[Passage]:
    """The ``k`` passages that BM25 ranks first for ``query`` (ties broken by corpus order)."""
    import bm25s

    tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
    k = min(k, len(passages()))
    ids, _ = _index().retrieve(tokens, k=k, show_progress=False)
    return [passages()[int(i)] for i in ids[0]]


# ---------------------------------------------------------------------------- LlamaIndex
def llamaindex_context_str(found: list[Passage]) -> str:
    """The ``context_str`` LlamaIndex's response synthesizer builds from retrieved nodes."""
    from llama_index.core.schema import MetadataMode, TextNode

    nodes = [TextNode(text=p.text, metadata={"title": p.title}) for p in found]
    return "\n\n".join(n.get_content(metadata_mode=MetadataMode.LLM).strip() for n in nodes)


def _llamaindex_messages(template, **values: str) -> list[Message]:
    return [
        {"role": m.role.value, "content": m.content or ""}
        for m in template.format_messages(**values)
    ]


LLAMAINDEX_VARIANTS = ("query-engine", "tree-summarize", "context-chat", "condense-plus-context")
"""A query engine's QA prompt (default ``compact`` mode), its ``tree_summarize`` prompt, a
``ContextChatEngine``'s and a ``CondensePlusContextChatEngine``'s first turn."""


def _llamaindex_template(variant: str):
    from llama_index.core.chat_engine.condense_plus_context import (
        DEFAULT_CONTEXT_PROMPT_TEMPLATE,
    )
    from llama_index.core.chat_engine.context import DEFAULT_CONTEXT_TEMPLATE
    from llama_index.core.chat_engine.utils import get_prefix_messages_with_context
    from llama_index.core.llms import MessageRole
    from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
    from llama_index.core.prompts.chat_prompts import (
        CHAT_TEXT_QA_PROMPT,
        CHAT_TREE_SUMMARIZE_PROMPT,
    )

    if variant == "query-engine":
        return CHAT_TEXT_QA_PROMPT
    if variant == "tree-summarize":
        return CHAT_TREE_SUMMARIZE_PROMPT
    system = {
        "context-chat": DEFAULT_CONTEXT_TEMPLATE,
        "condense-plus-context": DEFAULT_CONTEXT_PROMPT_TEMPLATE,
    }[variant]
    return ChatPromptTemplate.from_messages(
        get_prefix_messages_with_context(PromptTemplate(system), "", [], [], MessageRole.SYSTEM)
    )


def llamaindex(request: str, split: Split, rng: random.Random) -> Built:
    """One of LlamaIndex's default RAG prompts (:data:`LLAMAINDEX_VARIANTS`), as it sends it."""
    context_str = llamaindex_context_str(retrieve(request))
    variant = rng.choice(LLAMAINDEX_VARIANTS)
    template = _llamaindex_template(variant)
    return variant, _llamaindex_messages(template, context_str=context_str, query_str=request), []


# ---------------------------------------------------------------------------- LangChain
LANGCHAIN_STUFF_SYSTEM = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved "
    "context to answer the question. If you don't know the answer, say that you don't know. "
    "Use three sentences maximum and keep the answer concise.\n\n{context}"
)
"""The system prompt of LangChain's RAG tutorial (``create_stuff_documents_chain``)."""

LANGCHAIN_HUB_HUMAN = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved "
    "context to answer the question. If you don't know the answer, just say that you don't know. "
    "Use three sentences maximum and keep the answer concise.\nQuestion: {question} \n"
    "Context: {context} \nAnswer:"
)
"""The LangChain Hub's ``rlm/rag-prompt`` (one human message)."""

LANGCHAIN_V1_SYSTEM = (
    "You are a helpful assistant. Use the following context in your response:\n\n{context}"
)
"""LangChain v1's RAG agent with a ``dynamic_prompt`` middleware injecting the documents."""


def langchain_prompts():
    """The three LangChain RAG chat prompts, by variant name."""
    from langchain_core.prompts import ChatPromptTemplate

    return {
        "stuff-documents": ChatPromptTemplate.from_messages(
            [("system", LANGCHAIN_STUFF_SYSTEM), ("human", "{question}")]
        ),
        "hub-rag-prompt": ChatPromptTemplate.from_messages([("human", LANGCHAIN_HUB_HUMAN)]),
        "v1-dynamic-prompt": ChatPromptTemplate.from_messages(
            [("system", LANGCHAIN_V1_SYSTEM), ("human", "{question}")]
        ),
    }


_LANGCHAIN_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


def langchain(request: str, split: Split, rng: random.Random) -> Built:
    """A LangChain RAG chat prompt; documents joined as ``format_docs`` does (blank lines)."""
    prompts = langchain_prompts()
    variant = rng.choice(sorted(prompts))
    context = "\n\n".join(p.text for p in retrieve(request))
    messages = prompts[variant].format_messages(context=context, question=request)
    return (
        variant,
        [{"role": _LANGCHAIN_ROLES[m.type], "content": str(m.content)} for m in messages],
        [],
    )


# ---------------------------------------------------------------------------- project templates
def _numbered(found: list[Passage]) -> str:
    return "\n".join(f"[{i}] {p.title}: {p.text}" for i, p in enumerate(found, 1))


def _plain(found: list[Passage]) -> str:
    return "\n\n".join(p.text for p in found)


TEMPLATES: dict[str, tuple[str | None, str]] = {
    # name: (system, user); {request} and the passages ({context}, {numbered}, ...) are filled in
    "company-docs": (
        "You are the internal assistant of Acme Corp. Answer employees' questions using the "
        "documents below.\n\nDocuments:\n{context}",
        "{request}",
    ),
    "context-question": (
        None,
        "Use the context to answer.\n\nContext:\n{context}\n\nQuestion: {request}",
    ),
    "search-results": (
        "Answer the user's question. Relevant search results:\n{numbered}",
        "{request}",
    ),
    "text-above": (None, "{context}\n\nBased on the text above, answer this: {request}"),
    "given-information": (
        None,
        "Given the following information, answer the question.\n\nContext:\n{context}\n\n"
        "Question: {request}\nAnswer:",
    ),
    "xml-documents": (
        "You have access to these documents:\n<documents>\n{xml}\n</documents>\n"
        "Answer the user's question and cite the documents you use.",
        "{request}",
    ),
    "markdown-sources": (
        None,
        "## Sources\n{bullets}\n\n## Task\nWrite an answer to the question below and cite "
        "sources as [1], [2].\n\n**Question:** {request}",
    ),
    "support-bot": (
        "You are Ava, the friendly support assistant of Northwind Ltd. Knowledge base "
        "articles:\n---\n{articles}\n---\nBe concise and friendly.",
        "{request}",
    ),
}
"""The project's RAG templates: :data:`ngsd_guard.splits.RAG_CUSTOM_TEMPLATES` train,
:data:`ngsd_guard.splits.RAG_UNSEEN_TEMPLATES` are held out."""


def _fill(template: str, request: str, found: list[Passage]) -> str:
    return template.format(
        request=request,
        context=_plain(found),
        numbered=_numbered(found),
        xml="\n".join(
            f'<document index="{i}">\n<source>{p.title}</source>\n'
            f"<document_content>{p.text}</document_content>\n</document>"
            for i, p in enumerate(found, 1)
        ),
        bullets="\n".join(f"{i}. **{p.title}**: {p.text}" for i, p in enumerate(found, 1)),
        articles="\n---\n".join(f"{p.title}\n{p.text}" for p in found),
    )


def _from_templates(names: tuple[str, ...], request: str, rng: random.Random) -> Built:
    variant = rng.choice(names)
    system, user = TEMPLATES[variant]
    found = retrieve(request)
    messages = [{"role": "system", "content": _fill(system, request, found)}] if system else []
    messages.append({"role": "user", "content": _fill(user, request, found)})
    return variant, messages, []


def custom(request: str, split: Split, rng: random.Random) -> Built:
    return _from_templates(splits.RAG_CUSTOM_TEMPLATES, request, rng)


def unseen(request: str, split: Split, rng: random.Random) -> Built:
    return _from_templates(splits.RAG_UNSEEN_TEMPLATES, request, rng)
