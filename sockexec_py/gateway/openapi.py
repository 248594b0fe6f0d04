"""The OpenAPI 3.1 document served at ``/openapi.json`` (written by hand: it is the
contract, and the property tests check the app against it)."""

from __future__ import annotations

from typing import Any

from sockexec_py._version import __version__

_ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}


def _error_responses(*codes: int) -> dict[str, Any]:
    texts = {
        400: "Malformed request",
        401: "Missing or wrong bearer token",
        403: "Refused: sent by a web browser for a page (an Origin header)",
        404: "No such endpoint",
        413: "Request body too large, or (one-shot JSON answer) the program's output "
        "exceeded the gateway's --max-output (stdout and stderr together, 16 MiB by "
        "default): the program was terminated; streamed answers have no such limit",
        415: "The body is not sent with Content-Type: application/json",
        421: "Without tokens, the Host must be localhost, 127.0.0.1 or [::1] (any port)",
        502: "The broker broke the protocol",
        503: "The broker is unavailable",
        504: "The program did not finish in time",
    }
    return {
        str(code): {
            "description": texts[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code in codes
    }


_EXEC_REQUEST = {
    "type": "object",
    "required": ["argv"],
    "additionalProperties": False,
    "properties": {
        "argv": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string"},
            "description": "The program and its arguments; argv[0] is looked up in PATH.",
        },
        "stdin": {"type": "string", "description": "Text for stdin (UTF-8)."},
        "stdin_b64": {"type": "string", "description": "Bytes for stdin, base64."},
        "timeout": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "Seconds before the session is cut (504).",
        },
    },
}

_EXEC_RESULT = {
    "type": "object",
    "required": ["exitcode", "termsig", "duration_ms"],
    "properties": {
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
        "stdout_b64": {"type": "string"},
        "stderr_b64": {"type": "string"},
        "exitcode": {"type": ["integer", "null"]},
        "termsig": {"type": ["string", "null"]},
        "duration_ms": {"type": "number"},
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "sockexec-gateway",
        "version": __version__,
        "description": "Runs programs through the sockexec_py broker: one-shot, "
        "streamed (NDJSON or SSE) and duplex (WebSocket /v1/exec/ws).",
    },
    "components": {
        "schemas": {"Error": _ERROR, "ExecRequest": _EXEC_REQUEST, "ExecResult": _EXEC_RESULT},
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/exec": {
            "post": {
                "summary": "Run a program (one-shot JSON, or streamed frames by Accept)",
                "parameters": [
                    {
                        "name": "encoding",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["text", "base64"]},
                        "description": "base64: stdout_b64/stderr_b64 (exact bytes).",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ExecRequest"}}
                    },
                },
                "responses": {
                    "200": {
                        "description": "The program ran (whatever its exit status).",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ExecResult"}
                            },
                            "application/x-ndjson": {
                                "schema": {"type": "string"},
                                "description": "One JSON frame per line: "
                                '{"type":"stdout"|"stderr","data"} then {"type":"exit"}.',
                            },
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    **_error_responses(400, 401, 403, 413, 415, 421, 502, 503, 504),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Whether the broker socket answers",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The broker answers.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {"status": {"type": "string"}},
                                }
                            }
                        },
                    },
                    **_error_responses(403, 421, 503),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_error_responses(401, 403, 421),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_error_responses(403, 421),
                },
            }
        },
    },
}
