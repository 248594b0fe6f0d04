"""Typed routes: each endpoint declares its body, query and answer as pydantic models,
and this module both enforces them and builds ``/openapi.json`` from them.

Why our own ~200 lines and not FastAPI: FastAPI runs on trio (through anyio) but
answers its own error shape and plain-text 413, and its dependency injection is
more than five kinds of input need. Here a route is one :class:`Operation`: the
guard (Origin, Host, token), the body read through a size limit (413), the JSON
content type (415), ``TypeAdapter.validate_json`` (400 with one line naming the
field: ``argv: must be a non-empty list of strings``, ``unknown field: bogus``), the
handler, and the answer model dumped as JSON. The same operations, with
:func:`pydantic.json_schema.models_json_schema`, make the OpenAPI 3.1 document, so
the document cannot drift from what the app enforces. WebSocket routes have no
place in OpenAPI: the app adds them to the document by hand (:meth:`Api.openapi`'s
``extra_paths``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import Principal
from .models import Error as ErrorBody
from .request import HTTPError, error_response, require_json
from .streaming import ClientLeft

#: A handler: the request, the validated body and query (None when the route has
#: none); it answers a model (dumped as JSON with the route's status) or a Response.
Handler = Callable[[Request, Any, Any], Awaitable[BaseModel | Response]]

ERROR_TEXTS: Mapping[int, str] = {
    400: "Malformed request: the detail names the field",
    401: "Missing, wrong or expired bearer token (unauthorized, token_expired)",
    403: "Refused: sent by a web browser for a page (an Origin header: forbidden), or "
    "the token lacks the scope (missing_scope: the detail names it)",
    404: "No such endpoint, or no such job",
    409: "The job is in a state that does not allow this",
    413: "Request body too large, or (one-shot JSON answer) the program's output "
    "exceeded the gateway's --max-output (the program was terminated)",
    415: "The body is not sent with Content-Type: application/json",
    421: "Without tokens, the Host must be localhost, 127.0.0.1 or [::1] (any port)",
    429: "The job's queue (its name) is full",
    502: "The broker broke the protocol",
    503: "The broker, or the job store, is unavailable",
    504: "The program did not finish in time",
}
#: Every guarded route may answer these (the guard's refusals).
GUARD_ERRORS = (403, 421)

#: pydantic's error types said our way (the rest: pydantic's message, lowercased).
_PHRASES: Mapping[str, str] = {
    "missing": "required",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false (or 1, 0)",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
}


def describe(error: ValidationError) -> str:
    """The first problem of a validation error, as one line naming the field."""
    first = error.errors(include_url=False, include_input=False, include_context=False)[0]
    where = ""
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    kind = first["type"]
    if kind == "json_invalid":
        return "the body is not valid JSON"
    if kind == "model_type" and not where:
        return "the body must be a JSON object"
    if kind == "extra_forbidden":
        return f"unknown field: {where}"
    message = _PHRASES.get(kind) or first["msg"][:1].lower() + first["msg"][1:]
    return f"{where}: {message}" if where else message


def validation_error(error: ValidationError) -> HTTPError:
    return HTTPError(400, "bad_request", describe(error))


@dataclass(frozen=True)
class Operation:
    """One HTTP endpoint as declared: what it takes, what it answers, how it is guarded.

    ``media`` lists other content types of the success answer (NDJSON, SSE, text)
    with a line each for the document; ``mode`` labels the request counter.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    auth: bool = True
    mode: str = "other"
    media: Mapping[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{(\w+)(?::\w+)?}", self.path)

    @property
    def template(self) -> str:
        """The path as OpenAPI writes it (``{step:path}``, Starlette's, is ``{step}``)."""
        return re.sub(r"{(\w+):\w+}", r"{\1}", self.path)


class Api:
    """The typed routes of one app.

    Args:
        screen: the checks every request passes (raises :class:`HTTPError`); called
            with the headers and whether a token is required.
        count: counts an answered request (mode, status).
        max_body: the largest request body read (413 past it, before reading it all).
    """

    def __init__(
        self,
        screen: Callable[[Headers, bool], Principal],
        count: Callable[[str, int], None],
        max_body: int,
    ) -> None:
        self.operations: list[Operation] = []
        self._screen = screen
        self._count = count
        self._max_body = max_body
        self._adapters: dict[type[BaseModel], TypeAdapter[Any]] = {}

    def route(
        self, method: str, path: str, summary: str, **declared: Any
    ) -> Callable[[Handler], Handler]:
        """Declare ``handler`` as ``method path`` (see :class:`Operation` for the rest)."""

        def register(handler: Handler) -> Handler:
            operation = Operation(method, path, handler, summary, **declared)
            for model in (operation.body, operation.query):
                if model is not None:
                    self._adapters[model] = TypeAdapter(model)
            self.operations.append(operation)
            return handler

        return register

    def routes(self) -> list[Route]:
        """Starlette routes, one per path (its methods together)."""
        by_path: dict[str, dict[str, Operation]] = {}
        for operation in self.operations:
            by_path.setdefault(operation.path, {})[operation.method] = operation
        return [
            Route(path, self._endpoint(operations), methods=list(operations))
            for path, operations in by_path.items()
        ]

    def _endpoint(
        self, operations: dict[str, Operation]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            operation = operations[method]
            mode = operation.mode
            try:
                request.state.principal = self._screen(request.headers, operation.auth)
                body = query = None
                if operation.body is not None:
                    require_json(request.headers)
                    raw = await self.read_body(request)
                    body = self._validate(operation.body, lambda a: a.validate_json(raw))
                if operation.query is not None:
                    params = self._query(operation.query, request)
                    query = self._validate(operation.query, lambda a: a.validate_python(params))
                answer = await operation.handler(request, body, query)
                if isinstance(answer, Response):
                    response = answer
                    mode = getattr(answer, "mode", mode)
                else:
                    response = Response(
                        answer.model_dump_json(exclude_unset=True),
                        status_code=operation.status,
                        media_type="application/json",
                    )
            except HTTPError as exc:
                response = error_response(exc)
            except ClientLeft:  # nobody reads this answer: 499 is for the metrics (nginx's)
                response = Response(status_code=499)
            self._count(mode, response.status_code)
            return response

        return endpoint

    def _validate(self, model: type[BaseModel], run: Callable[[TypeAdapter[Any]], Any]) -> Any:
        try:
            return run(self._adapters[model])
        except ValidationError as exc:
            raise validation_error(exc) from None

    @staticmethod
    def _query(model: type[BaseModel], request: Request) -> dict[str, Any]:
        """The query string as the model's input: a list field takes every value
        of its name (``?state=queued&state=running``), others the last one."""
        params: dict[str, Any] = {}
        for name in request.query_params:
            info = model.model_fields.get(name)
            is_list = info is not None and get_origin(info.annotation) is list
            params[name] = (
                request.query_params.getlist(name) if is_list else request.query_params[name]
            )
        return params

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 past ``max_body`` (by its declared
        length before reading any of it, else as soon as it grows past)."""
        limit = self._max_body
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise HTTPError(413, "too_large", f"the request body exceeds {limit} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, "too_large", f"the request body exceeds {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientLeft from None
        return b"".join(chunks)

    # -- the document ---------------------------------------------------------------

    def openapi(
        self, info: Mapping[str, Any], extra_paths: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The OpenAPI 3.1 document of the declared operations (plus ``extra_paths``,
        written by hand: WebSocket routes)."""
        inputs = {op.body for op in self.operations if op.body is not None}
        outputs = {op.answer for op in self.operations if op.answer is not None} | {ErrorBody}
        keys, top = models_json_schema(
            [(model, "validation") for model in sorted(inputs, key=_name)]
            + [(model, "serialization") for model in sorted(outputs, key=_name)],
            ref_template="#/components/schemas/{model}",
        )
        paths: dict[str, Any] = {}
        for operation in self.operations:
            paths.setdefault(operation.template, {})[operation.method.lower()] = self._operation(
                operation, keys
            )
        paths.update(extra_paths or {})
        return {
            "openapi": "3.1.0",
            "info": dict(info),
            "components": {
                "schemas": top.get("$defs", {}),
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
            "security": [{"bearer": []}],
            "paths": paths,
        }

    @staticmethod
    def _operation(operation: Operation, keys: Mapping[Any, Any]) -> dict[str, Any]:
        document: dict[str, Any] = {"summary": operation.summary}
        if operation.description:
            document["description"] = operation.description
        if not operation.auth:
            document["security"] = []
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in operation.path_params
        ]
        if operation.query is not None:
            schema = operation.query.model_json_schema(ref_template="#/components/schemas/{model}")
            required = set(schema.get("required", ()))
            for name, prop in schema.get("properties", {}).items():
                parameter = {"name": name, "in": "query", "required": name in required}
                if "description" in prop:
                    parameter["description"] = prop["description"]
                parameter["schema"] = {k: v for k, v in prop.items() if k != "description"}
                if prop.get("type") == "array":
                    parameter.update(style="form", explode=True)
                parameters.append(parameter)
        if parameters:
            document["parameters"] = parameters
        if operation.body is not None:
            document["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": keys[(operation.body, "validation")]}},
            }
        success: dict[str, Any] = {"description": operation.summary}
        content: dict[str, Any] = {}
        if operation.answer is not None:
            content["application/json"] = {"schema": keys[(operation.answer, "serialization")]}
        for media_type, text in operation.media.items():
            content[media_type] = {"schema": {"type": "string", "description": text}}
        if content:
            success["content"] = content
        error_ref = keys[(ErrorBody, "serialization")]
        codes: Sequence[int] = sorted(
            {*operation.errors, *GUARD_ERRORS, *((401,) if operation.auth else ())}
            | ({400} if operation.body or operation.query else set())
            | ({413, 415} if operation.body else set())
        )
        document["responses"] = {
            str(operation.status): success,
            **{
                str(code): {
                    "description": ERROR_TEXTS[code],
                    "content": {"application/json": {"schema": error_ref}},
                }
                for code in codes
            },
        }
        return document


def _name(model: type[BaseModel]) -> str:
    return model.__name__
