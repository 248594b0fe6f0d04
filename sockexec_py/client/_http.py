"""One-shot runs through the gateway: one ``POST /v1/exec?encoding=base64`` (bytes
exact both ways), with the standard library's HTTP client.

The body is sent while the socket is watched for an early answer: the gateway
refuses an oversized body (413) before reading it, and a client that kept writing
would see a broken pipe instead of the refusal.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import time
from collections.abc import Sequence
from typing import Any

from sockexec_py.errors import BrokerUnavailable, Timeout

from ._common import Result
from ._websocket import GatewayAddress
from .wire import argv_text, auth_headers, raise_for_status

_SEND_CHUNK = 256 * 1024
# Beyond the session's own timeout, how long the gateway may take to answer.
_ANSWER_GRACE = 5.0


def run_gateway(
    url: str,
    argv: Sequence[str | bytes],
    *,
    stdin: bytes = b"",
    timeout: float | None = None,
    token: str | None = None,
) -> Result:
    """Run ``argv`` to the end through the gateway at ``url`` (see :func:`~.run`)."""
    address = GatewayAddress(url.replace("ws://", "http://", 1).replace("wss://", "https://", 1))
    body: dict[str, Any] = {"argv": argv_text(argv)}
    if stdin:
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    if timeout is not None:
        body["timeout"] = timeout
    payload = json.dumps(body).encode()
    connection_class = http.client.HTTPSConnection if address.secure else http.client.HTTPConnection
    limit = None if timeout is None else timeout + _ANSWER_GRACE
    conn = connection_class(address.netloc, timeout=limit)
    deadline = None if limit is None else time.monotonic() + limit
    try:
        conn.putrequest("POST", address.prefix + "/v1/exec?encoding=base64")
        for name, value in {
            "Content-Type": "application/json",
            "Content-Length": str(len(payload)),
            **auth_headers(token),
        }.items():
            conn.putheader(name, value)
        conn.endheaders()
        _send_body(conn, payload, deadline)
        response = conn.getresponse()
        data = response.read()
    except TimeoutError:
        raise Timeout(f"{url}: the gateway did not answer in time") from None
    except OSError as exc:
        raise BrokerUnavailable(f"cannot reach the gateway at {url}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise_for_status(response.status, data)
    result = json.loads(data)
    return Result(
        base64.b64decode(result["stdout_b64"]),
        base64.b64decode(result["stderr_b64"]),
        result["exitcode"],
        result["termsig"],
    )


def _send_body(conn: http.client.HTTPConnection, payload: bytes, deadline: float | None) -> None:
    """Send ``payload``, stopping early when the gateway answers before taking it all
    (or stops reading): its answer is then read as usual."""
    sock = conn.sock
    assert sock is not None
    view = memoryview(payload)
    while view:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        readable, writable, _ = select.select([sock], [sock], [], remaining)
        if readable:
            return  # an early answer (413...): stop sending and read it
        if not writable:
            raise TimeoutError
        try:
            view = view[sock.send(view[:_SEND_CHUNK]) :]
        except (BrokenPipeError, ConnectionResetError):
            return  # it stopped reading: its answer may still be there
