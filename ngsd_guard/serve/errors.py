"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause is answered this way, and the server keeps serving:

===============================  ======  ==========================
cause                            status  ``code``
===============================  ======  ==========================
malformed JSON                   400     ``invalid_json``
unknown field, wrong type/value  400     ``unknown_parameter`` / ``invalid_value``
prompt too long for the model    400     ``context_length_exceeded``
missing or wrong API key         401     ``invalid_api_key``
``ngsd`` override not allowed    403     ``guard_override_not_allowed``
unknown model or route           404     ``model_not_found`` / ``not_found``
body over the size limit         413     ``request_too_large``
queue full                       429     ``rate_limit_exceeded``
===============================  ======  ==========================
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..errors import ContextTooLongError, NGSDError

logger = logging.getLogger(__name__)

_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(Exception):
    """A request that gets an OpenAI-shaped error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code, self.headers = type, param, code, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_validation(error: ValidationError) -> APIError:
    """The 400 for a body that is not JSON, or does not match the request model."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return APIError(
            400,
            f"the request body is not valid JSON: {first['msg']}",
            code="invalid_json",
        )
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(
            400,
            f"unrecognized request argument supplied: {where}",
            param=where,
            code="unknown_parameter",
        )
    if not where:  # a check across fields: its message names them
        message = first["msg"].removeprefix("Value error, ")
        return APIError(400, message, code="invalid_value")
    value = repr(first.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    return APIError(
        400,
        f"invalid value for `{where}` (={value}): {first['msg']}",
        param=where,
        code="invalid_value",
    )


def from_engine(error: NGSDError) -> APIError:
    """The 400 for a request the engine refuses (a bad setting, an empty or too long prompt)."""
    code = "context_length_exceeded" if isinstance(error, ContextTooLongError) else "invalid_value"
    return APIError(400, str(error), code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Answer APIError, HTTP errors (404, 405, 413) and unexpected failures in OpenAI's shape."""

    async def api_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, APIError)
        return error.response()

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        code = _STATUS_CODES.get(error.status_code)
        return APIError(error.status_code, str(error.detail), code=code).response()

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request %s %s failed", request.method, request.url.path)
        return APIError(500, "the server failed to answer", type="server_error").response()

    handlers: dict[Any, Any] = {
        APIError: api_error,
        HTTPException: http_error,
        Exception: server_error,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
