"""Gate events from LlamaIndex's own engines: a streaming query engine and a
condense_plus_context chat engine, both on the real default model."""

from __future__ import annotations

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.embeddings import MockEmbedding

pytestmark = pytest.mark.slow

DOCUMENTS = [
    "Lock picking is a hobby called locksport; its clubs only pick locks their members own.",
    "A locksmith opens a locked door for its owner after checking their identity.",
    "Pin tumbler locks hold a row of spring-loaded pins that a key pushes to the shear line.",
]


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    # Retrieval is not under test: a constant embedding keeps the index instant.
    return VectorStoreIndex.from_documents(
        [Document(text=text) for text in DOCUMENTS], embed_model=MockEmbedding(embed_dim=8)
    )


def test_streaming_query_engine(index, llm, gate_events):
    engine = index.as_query_engine(llm=llm, streaming=True, similarity_top_k=2)
    response = engine.query("How do I open my neighbour's door without a key?")
    assert not gate_events  # nothing is decoded before the stream is consumed
    text = "".join(response.response_gen)
    assert text.strip()
    assert gate_events
    # captured when the LLM call started, although the tokens were decoded afterwards
    assert {e.span_id for e in gate_events} == {gate_events[0].span_id}
    assert gate_events[0].span_id.startswith("NGSD.stream_chat-")


def test_condense_plus_context_chat_engine(index, llm, gate_events):
    history = [
        ChatMessage(role="user", content="What is locksport?"),
        ChatMessage(role="assistant", content="Picking locks you own, as a hobby."),
    ]
    engine = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, chat_history=history)
    # With a history, the engine first condenses it and the new message into a standalone
    # question (a chat call), then streams the answer, which LlamaIndex consumes and writes
    # to its memory from a worker thread.
    streamed = engine.stream_chat("Can I practise on my neighbour's door?")
    text = "".join(streamed.response_gen)
    assert text.strip()
    spans = [e.span_id for e in gate_events]
    assert all(span and span.startswith("NGSD.") for span in spans)
    kinds = {span.split("-")[0] for span in spans}
    assert kinds == {"NGSD.complete", "NGSD.stream_chat"}  # the condensing, the answer
