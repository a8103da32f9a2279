"""``ngsd-guard serve``: the guard behind the OpenAI chat-completions API.

* :func:`ngsd_guard.serve.app.create_app` - the FastAPI app over one ``GuardedLM``;
* :class:`ServeSettings` - limits and access (batch size, queue, max_tokens cap, body size,
  API key, guard overrides);
* :mod:`ngsd_guard.serve.ray_app` - the same service as a Ray Serve application.

Needs the ``serve`` extra (FastAPI, uvicorn) and, for Ray, the ``ray`` extra.
"""

from .settings import API_KEY_ENV, ServeSettings

__all__ = ["API_KEY_ENV", "ServeSettings"]
