"""The OpenAI-compatible HTTP service over one ``GuardedLM``: :func:`create_app`.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (behind
the API key when one is set), ``GET /health`` (the process is up) and ``GET /ready`` (the
decode thread runs and has room for a request; 503 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ValidationError

from ..errors import NGSDError
from ..guarded import GuardedLM
from ..records import Generation
from .errors import APIError, from_engine, from_validation, install_error_handlers
from .mapping import EngineCall, chat_call, completion_calls
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import ChoiceTranslator, Delta, ResponseHead, usage_of
from .scheduler import QueueFullError, Scheduler, SchedulerStoppedError, Submission
from .settings import ServeSettings

logger = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)

_DONE = format_sse_event(data_str="[DONE]")


def create_app(lm: GuardedLM, settings: ServeSettings) -> FastAPI:
    """A FastAPI app serving ``lm`` under ``settings`` (run it with uvicorn or Ray Serve).

    The app's lifespan starts and stops its :class:`~.scheduler.Scheduler`, the one thread that
    decodes batches of concurrent requests.
    """
    scheduler = Scheduler(
        lm,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        join_window_s=settings.join_window_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(
        title="ngsd-guard",
        summary="Neuron-Guided Safe Decoding behind the OpenAI chat-completions API",
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_Authorizer(settings))])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = scheduler.ready
        body = {"status": "ready" if ok else "busy", **scheduler.load()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ngsd"}
        return {"object": "list", "data": [card]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _parse(request, ChatCompletionRequest, settings.max_body_bytes)
        _check_model(body.model, settings)
        calls = [_engine(lambda: chat_call(lm, body, settings))]
        head = ResponseHead("chat", settings.model_name)
        return await _answer(request, scheduler, head, calls, body.stream, body.include_usage)

    @v1.post("/completions")
    async def completions(request: Request) -> Any:
        body = await _parse(request, CompletionRequest, settings.max_body_bytes)
        _check_model(body.model, settings)
        calls = _engine(lambda: completion_calls(lm, body, settings))
        head = ResponseHead("text", settings.model_name)
        return await _answer(request, scheduler, head, calls, body.stream, body.include_usage)

    app.include_router(v1)
    return app


# ------------------------------------------------------------------------ request checks
_BEARER = HTTPBearer(auto_error=False)


class _Authorizer:
    """The dependency that checks ``Authorization: Bearer <key>`` when a key is set."""

    def __init__(self, settings: ServeSettings) -> None:
        key = settings.api_key
        self._expected = key.get_secret_value().encode() if key is not None else None

    async def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
    ) -> None:
        if self._expected is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not secrets.compare_digest(given, self._expected):
            raise APIError(
                401,
                "missing or incorrect API key; send it as `Authorization: Bearer <key>`",
                code="invalid_api_key",
            )


async def _parse(request: Request, model: type[Body], limit: int) -> Body:
    raw = await _read_body(request, limit)
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise from_validation(error) from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 past ``limit`` bytes (by Content-Length, or while it is
    read). FastAPI's own ``max_body_size`` answers in plain text, not OpenAI's shape."""
    too_large = APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _check_model(name: str, settings: ServeSettings) -> None:
    if name != settings.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist here; this server serves "
            f"{settings.model_name!r} (see /v1/models)",
            param="model",
            code="model_not_found",
        )


Result = TypeVar("Result")


def _engine(build: Callable[[], Result]) -> Result:
    """Run a request mapping; the engine's refusals (bad value, prompt too long) become 400s."""
    try:
        return build()
    except NGSDError as error:
        raise from_engine(error) from None


# ------------------------------------------------------------------------ answers
async def _answer(
    request: Request,
    scheduler: Scheduler,
    head: ResponseHead,
    calls: list[EngineCall],
    stream: bool,
    include_usage: bool,
) -> Any:
    try:
        submission = scheduler.submit([call.request for call in calls])
    except QueueFullError as error:
        raise APIError(
            429, str(error), type="requests", code="rate_limit_exceeded", headers=_RETRY
        ) from None
    except SchedulerStoppedError as error:
        raise APIError(503, str(error), type="server_error", headers=_RETRY) from None
    translators = [ChoiceTranslator(i, call.parser()) for i, call in enumerate(calls)]
    if stream:
        chunks = _chunks(head, translators, submission, include_usage)
        return EventSourceResponse(chunks)
    whole = asyncio.ensure_future(_whole(head, translators, submission))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({whole, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not whole.done():
            whole.cancel()
            submission.cancel()
    if whole.cancelled():  # the client left; nobody reads this
        return JSONResponse({}, status_code=499)
    try:
        return JSONResponse(whole.result())
    except SchedulerStoppedError as error:
        raise APIError(503, str(error), type="server_error", headers=_RETRY) from None
    except NGSDError as error:
        raise from_engine(error) from None


_RETRY = {"Retry-After": "1"}


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(
    head: ResponseHead, translators: Sequence[ChoiceTranslator], submission: Submission
) -> dict[str, Any]:
    deltas: list[list[Delta]] = [[] for _ in translators]
    generations: list[Generation] = []
    async for index, item in submission:
        translator = translators[index]
        if isinstance(item, Generation):
            deltas[index].append(translator.finish(item))
            generations.append(item)
        else:
            deltas[index].append(translator.step(item))
    return head.whole(deltas, usage_of(generations))


async def _chunks(
    head: ResponseHead,
    translators: Sequence[ChoiceTranslator],
    submission: Submission,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """SSE events: a chunk per delta (each choice's first one with the role), the usage chunk
    if asked for, then ``[DONE]``. A client that goes away cancels the submission."""
    started: set[int] = set()
    generations: list[Generation] = []
    try:
        async for index, item in submission:
            translator = translators[index]
            if isinstance(item, Generation):
                delta = translator.finish(item)
                generations.append(item)
            else:
                delta = translator.step(item)
            first = index not in started
            if delta.empty and not first:
                continue
            started.add(index)
            yield _event(head.chunk(index, delta, first=first))
        if include_usage:
            yield _event(head.usage_chunk(usage_of(generations)))
        yield _DONE
    except (NGSDError, SchedulerStoppedError) as error:
        status = 400 if isinstance(error, NGSDError) else 503
        yield _event(APIError(status, str(error), type="server_error").body())
    finally:
        submission.cancel()


def _event(body: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=json.dumps(body, ensure_ascii=False))
