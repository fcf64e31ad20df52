"""The OpenAPI description of the API: request bodies, success and error responses.

The endpoints read and validate their JSON bodies themselves (to require `application/json`, cap the body size
while it arrives, and answer OpenAI-style errors), so FastAPI cannot see the request models. This module writes
them into the schema, with every status an endpoint can answer, so that `/openapi.json` describes the API exactly:
clients can be generated from it, and the API fuzz test (tests/test_server_fuzz.py) checks the server against it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from .protocol import Response


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """Every error: `{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""

    error: ErrorDetail


class Health(BaseModel):
    status: str
    running: float  # requests holding a slot
    waiting: float  # requests queued for one


# One server-sent event: `data` holds a JSON chunk (a `Response`, or an error body), or `[DONE]` at the end.
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
             "required": ["data"]}
ERROR = {"model": ErrorResponse, "description": "an OpenAI-style error"}
_REQUEST_MODELS: dict[str, type[BaseModel]] = {}


def route_docs(request_model: type[BaseModel]) -> dict[str, Any]:
    """Keyword arguments for `app.post(...)`: the JSON request body and the answers of a generation endpoint."""
    _REQUEST_MODELS[request_model.__name__] = request_model
    body = {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}}}}
    success = {"model": Response, "description": "the completion; with `stream: true` server-sent events "
               "(`data: {chunk}` lines, then `data: [DONE]`)",
               "content": {"text/event-stream": {"schema": SSE_EVENT}}}
    errors = {code: ERROR for code in (400, 401, 404, 413, 415, 422, 500, 503)}
    return {"openapi_extra": {"requestBody": body}, "responses": {200: success, **errors}}




def add_request_bodies(app: FastAPI) -> None:
    """Put the request models (registered by `route_docs`) into the schema's components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _REQUEST_MODELS.items():
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(s.pop("$defs", {}))
                components[name] = s
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
