"""What the operator decides about a server: where it listens, who may call it, and its limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

API_KEY_ENV = "NGSD_GUARD_API_KEY"
"""The environment variable read for the API key when ``--api-key`` is not given."""


class ServeSettings(BaseModel):
    """Limits and access of one server process (one replica under Ray Serve).

    ``max_batch`` requests decode at once, in one batch; up to ``max_queue`` more wait for a
    row, and the next one gets a 429. A request's ``max_tokens`` above ``max_tokens_cap`` is a
    400, a body over ``max_body_bytes`` a 413. The API key is a ``SecretStr``: it never shows in
    a ``repr`` or a log line.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(description="the one model name the server answers to")
    api_key: SecretStr | None = Field(
        None, description="clients send `Authorization: Bearer <key>`"
    )
    max_batch: int = Field(16, ge=1, description="requests decoded together, in one batch")
    max_queue: int = Field(64, ge=0, description="requests waiting for a row; more get a 429")
    max_tokens_cap: int = Field(1024, ge=1, description="the largest max_tokens a request may ask")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request names none")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get a 413")
    join_window_s: float = Field(
        0.02, ge=0, description="how long a new batch waits for more requests to join it"
    )
    allow_guard_overrides: bool = Field(
        False, description="clients may set `ngsd.alpha` and `ngsd.guard` (off: a 403)"
    )
