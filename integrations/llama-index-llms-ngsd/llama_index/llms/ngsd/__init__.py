"""ngsd-guard for LlamaIndex: `NGSD`, a guarded `FunctionCallingLLM`, and `NGSDGateEvent`."""

from llama_index.llms.ngsd.base import NGSD
from llama_index.llms.ngsd.events import NGSDGateEvent

__all__ = ["NGSD", "NGSDGateEvent"]
