"""LangChain integration of ngsd-guard (Neuron-Guided Safe Decoding).

``ChatNGSD`` (chat model) and ``NGSDLLM`` (completion model) run a base model and a safety
expert side by side; gate spikes reach LangChain as chunk metadata, ``ngsd_gate`` custom
events, LangGraph stream-writer items and :class:`GateEventHandler` callbacks.
"""

from .chat_models import ChatNGSD
from .events import GATE_EVENT, GateEventHandler
from .llms import NGSDLLM
from .messages import to_chat_messages
from .openai import ChatNGSDOpenAI

__all__ = [
    "GATE_EVENT",
    "NGSDLLM",
    "ChatNGSD",
    "ChatNGSDOpenAI",
    "GateEventHandler",
    "to_chat_messages",
]
