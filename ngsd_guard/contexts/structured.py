"""Structured answers: the request under the instruction to answer in a JSON schema's object,
as ``ChatNGSD.with_structured_output`` (its default ``json_schema`` method) and the server's
``response_format`` send it. The schemas (``data/contexts/schemas.json``) are written the way
LangChain converts pydantic models; every fourth is held out for evaluation
(:func:`ngsd_guard.splits.project_split`)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from ..splits import Split, project_split
from ..tools.prompt import structured_answer_messages

SCHEMAS_FILE = Path(__file__).parents[1] / "data" / "contexts" / "schemas.json"


@functools.cache
def schemas(split: Split) -> tuple[dict[str, Any], ...]:
    """The JSON schemas on one side of the split."""
    rows = json.loads(SCHEMAS_FILE.read_text())["schemas"]
    return tuple(s for i, s in enumerate(rows) if project_split(i) == split)


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``response_format`` that ``with_structured_output(schema)`` binds."""
    return {"type": "json_schema", "json_schema": {"name": schema["title"], "schema": schema}}


def structured(
    request: str, split: Split, rng: random.Random
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """``(variant, messages, response_format)``: the request under one schema's instruction."""
    schema = rng.choice(schemas(split))
    messages = structured_answer_messages([{"role": "user", "content": request}], schema)
    return schema["title"], messages, response_format(schema)
