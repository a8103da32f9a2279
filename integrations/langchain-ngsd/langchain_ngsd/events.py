"""Gate events through LangChain's channels: custom events, LangGraph's stream writer, and a
ready callback handler.

Every channel carries ``GateEvent.model_dump()`` (the engine's own record of the spike):
``{"row", "step", "token_id", "text", "divergence", "potential", "spiked", "alpha",
"base_token_id", "chosen_token_id", "intervened", "finish_reason"}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManager,
    CallbackManagerForLLMRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, get_callback_manager_for_config

from ngsd_guard import GateEvent

__all__ = ["GATE_EVENT", "GateEventHandler"]

GATE_EVENT = "ngsd_gate"
"""The name of the custom event (and of the key in LangGraph ``stream_mode="custom"`` items)."""


class GateEventHandler(BaseCallbackHandler):
    """Receives every gate spike as a typed :class:`ngsd_guard.GateEvent`.

    Subclass and override :meth:`on_gate`, or pass a function. Events are also kept in
    ``events``. Attach it like any handler: ``chain.invoke(x, config={"callbacks": [handler]})``
    or ``ChatNGSD(callbacks=[handler])``.

    >>> handler = GateEventHandler(lambda event: print(event.step, event.divergence))
    """

    def __init__(self, on_gate: Callable[[GateEvent], object] | None = None) -> None:
        super().__init__()
        self.events: list[GateEvent] = []
        self._callback = on_gate

    def on_gate(self, event: GateEvent) -> None:
        """Called once per spike, in order."""
        if self._callback is not None:
            self._callback(event)

    def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: UUID,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if name == GATE_EVENT:
            event = GateEvent.model_validate(data)
            self.events.append(event)
            self.on_gate(event)


def _graph_writer() -> Callable[[Any], None] | None:
    """LangGraph's stream writer when running inside a graph node, else None (also when
    LangGraph is not installed). ``get_stream_writer`` raises outside a runnable context
    (RuntimeError) and in a runnable that no graph runs (KeyError: no graph runtime)."""
    try:
        from langgraph.config import get_stream_writer
    except ImportError:
        return None
    try:
        return get_stream_writer()
    except (RuntimeError, KeyError):
        return None


def _model_run_manager(run_manager: Any, manager_class: type) -> Any:
    """A callback manager whose parent is the model's own run, with all its handlers (also the
    model's local ones)."""
    return manager_class(
        handlers=run_manager.handlers,
        inheritable_handlers=run_manager.inheritable_handlers,
        parent_run_id=run_manager.run_id,
        tags=run_manager.tags,
        inheritable_tags=run_manager.inheritable_tags,
        metadata=run_manager.metadata,
        inheritable_metadata=run_manager.inheritable_metadata,
    )


def _has_parent_run() -> bool:
    return get_callback_manager_for_config(ensure_config()).parent_run_id is not None


def emit_gate_event(event: GateEvent, run_manager: CallbackManagerForLLMRun | None) -> None:
    """Send one spike as custom event ``ngsd_gate`` and to LangGraph's stream writer.

    With the model's run manager (``invoke``), the event is parented to the model's own run
    and reaches all its handlers. LangChain's ``stream`` does not hand the run manager to
    ``_stream``: then the event goes to the enclosing run (the chain step calling the model),
    and is skipped quietly when there is none.
    """
    data = event.model_dump()
    if run_manager is not None:
        config: RunnableConfig = {"callbacks": _model_run_manager(run_manager, CallbackManager)}
        dispatch_custom_event(GATE_EVENT, data, config=config)
    elif _has_parent_run():
        dispatch_custom_event(GATE_EVENT, data)
    writer = _graph_writer()
    if writer is not None:
        writer({GATE_EVENT: data})


async def aemit_gate_event(
    event: GateEvent, run_manager: AsyncCallbackManagerForLLMRun | None
) -> None:
    """:func:`emit_gate_event` for async runs."""
    data = event.model_dump()
    if run_manager is not None:
        manager = _model_run_manager(run_manager, AsyncCallbackManager)
        await adispatch_custom_event(GATE_EVENT, data, config={"callbacks": manager})
    elif _has_parent_run():
        await adispatch_custom_event(GATE_EVENT, data)
    writer = _graph_writer()
    if writer is not None:
        writer({GATE_EVENT: data})
