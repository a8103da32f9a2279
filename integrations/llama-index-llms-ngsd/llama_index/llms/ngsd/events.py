"""`NGSDGateEvent`: a gate trigger, sent through LlamaIndex instrumentation."""

from __future__ import annotations

from llama_index.core.instrumentation.events import BaseEvent

from ngsd_guard import GateEvent


class NGSDGateEvent(BaseEvent):
    """The neuron spiked on one generated token, and the expert was mixed in.

    Sent once per trigger through the dispatcher of ``llama_index.llms.ngsd.base``, which
    propagates to the root dispatcher, so an event handler added with
    ``get_dispatcher().add_event_handler(...)`` sees every trigger of every call. ``span_id``
    is the span of the LLM call that produced the token (``NGSD.stream_chat-…`` and so on),
    captured when the call started, so streams consumed later or in another thread still
    land in the right trace.

    >>> from llama_index.core.instrumentation import get_dispatcher
    >>> from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    >>> class PrintTriggers(BaseEventHandler):
    ...     def handle(self, event, **kwargs):
    ...         if isinstance(event, NGSDGateEvent):
    ...             print(event.record.step, event.record.divergence, event.record.intervened)
    >>> get_dispatcher().add_event_handler(PrintTriggers())
    """

    record: GateEvent
    model_name: str

    @classmethod
    def class_name(cls) -> str:
        return "NGSDGateEvent"
