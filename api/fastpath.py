"""`POST /v1/sessions/{company}/messages` served straight from ASGI, in front of the framework.

The send route is the one applications call at volume. Routed through FastAPI/Starlette (request
object, routing, response object) it cost about 125 µs of CPU per request on the bench host, on
top of uvicorn's 35 µs; straight from ASGI it costs what the work costs (`Api.send`: the token
check, one JSON parse, one control round trip). Every other route goes through the framework,
and this one is still described there, for the OpenAPI document.
"""

from __future__ import annotations

import logging
from typing import Any

from api.app import JSON, MAX_BODY, Api, error_parts, idempotency_key
from ipc.errors import BAD_REQUEST, WaportError

log = logging.getLogger("waport.api")
PREFIX, SUFFIX = "/v1/sessions/", "/messages"
INTERNAL_BODY = b'{"error":{"code":"internal","message":"internal error; see the waport API log"}}'
ASGIApp = Any


class FastSend:
    def __init__(self, app: ASGIApp, api: Api) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path.startswith(PREFIX) and path.endswith(SUFFIX) and "/" not in path[len(PREFIX):-len(SUFFIX)]:
                await self.send_message(scope, receive, send, path[len(PREFIX):-len(SUFFIX)])
                return
        await self.app(scope, receive, send)

    async def send_message(self, scope: dict[str, Any], receive: Any, send: Any, company: str) -> None:
        authorization, keys = None, []
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"idempotency-key":
                keys.append(value.decode("latin-1"))
        status, headers, body = 202, {}, b""
        try:
            caller = self.api.auth.check(authorization)  # before the body is read: no token, no work
            key = idempotency_key(keys)
            raw = await read_body(receive)
            body = await self.api.send(caller, company, raw, key)
        except WaportError as exc:
            status, headers, body = error_parts(exc)
        except Exception:  # noqa: BLE001 - as api.app.guarded: a body, never a traceback
            log.exception("POST %s failed", scope["path"])
            status, headers, body = 500, {}, INTERNAL_BODY
        raw_headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})


async def read_body(receive: Any) -> bytes:
    """The whole body, refusing one past MAX_BODY as soon as it is (the rest is not read into memory)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise WaportError(BAD_REQUEST, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise WaportError(BAD_REQUEST, f"body exceeds {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
