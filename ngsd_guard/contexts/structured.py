"""Structured answers, as the frameworks ask for them:

* ``json-schema`` (two times in three): the request under the instruction to answer in a JSON
  schema's object, as ``ChatNGSD.with_structured_output`` (its default ``json_schema`` method)
  and the server's ``response_format`` send it, decoded under the schema's grammar;
* ``tool-call``: the request as it is, with the schema offered as the one tool and the call
  forced, as ``with_structured_output(method="function_calling")`` and LlamaIndex's
  ``structured_predict`` (a function-calling program) send it, decoded under the call's
  grammar.

The schemas (``data/contexts/schemas.json``) are written the way LangChain converts pydantic
models; every fourth is held out for evaluation (:func:`ngsd_guard.splits.project_split`)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from ..splits import Split, project_split
from ..tools.prompt import structured_answer_messages
from .conversation import Conversation

SCHEMAS_FILE = Path(__file__).parents[1] / "data" / "contexts" / "schemas.json"


@functools.cache
def schemas(split: Split) -> tuple[dict[str, Any], ...]:
    """The JSON schemas on one side of the split."""
    rows = json.loads(SCHEMAS_FILE.read_text())["schemas"]
    return tuple(s for i, s in enumerate(rows) if project_split(i) == split)


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``response_format`` that ``with_structured_output(schema)`` binds."""
    return {"type": "json_schema", "json_schema": {"name": schema["title"], "schema": schema}}


def structured(request: str, split: Split, rng: random.Random) -> Conversation:
    """The request asked for one schema's object, as a format or as a forced tool call."""
    schema = rng.choice(schemas(split))
    user = [{"role": "user", "content": request}]
    if rng.random() < 1 / 3:
        from langchain_core.utils.function_calling import convert_to_openai_tool

        # the one tool that with_structured_output(method="function_calling") binds
        tool = convert_to_openai_tool(schema)
        return Conversation(
            request,
            tuple(user),
            (tool,),
            "structured",
            f"tool-call/{schema['title']}",
            tool_choice={"type": "function", "function": {"name": schema["title"]}},
        )
    messages = structured_answer_messages(user, schema)
    return Conversation(
        request,
        tuple(messages),
        (),
        "structured",
        f"json-schema/{schema['title']}",
        response_format=response_format(schema),
    )
