"""The HTTP API of DESIGN.md §9: routes that become control commands, SSE from the events socket.

FastAPI gives the OpenAPI 3.1 document (pydantic models in `api/schemas.py` describe bodies and
answers); the handlers themselves stay lean — they read the body with one `json.loads`, validate
with the same `ipc.validation` the daemon uses, and answer with pre-encoded bytes — because a
pydantic body, `Depends` auth and response validation cost three to four times the CPU of the
request itself (README: HTTP API, cost per request).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api import consolepage, schemas
from api.auth import Auth, Caller
from api.daemon import ControlLink, EventHub
from api.docs import DOCS_HTML
from api.securityheaders import inline_policy
from ipc import __version__, events
from ipc.errors import (
    BAD_REQUEST,
    CAPACITY,
    DISK_FULL,
    FORBIDDEN,
    INTERNAL,
    INVALID_COMPANY_ID,
    INVALID_PHONE,
    MEDIA_TOO_LARGE,
    MESSAGE_TOO_LONG,
    NOT_CONNECTED,
    NOT_FOUND,
    NOT_IMPLEMENTED,
    RATE_LIMITED,
    TIMEOUT,
    UNAUTHORIZED,
    UNKNOWN_COMPANY,
    WaportError,
)
from ipc.jsonsafe import InvalidJSON
from ipc.jsonsafe import loads as parse_json
from ipc.mediastore import WIRE_CHUNK, put_args
from ipc.richmessage import SEND_ARGS
from ipc.validation import validate_company

log = logging.getLogger("waport.api")

STATUS = {
    BAD_REQUEST: 400, INVALID_COMPANY_ID: 400, INVALID_PHONE: 400, MESSAGE_TOO_LONG: 400,
    UNAUTHORIZED: 401, FORBIDDEN: 403, UNKNOWN_COMPANY: 404, NOT_FOUND: 404,
    NOT_CONNECTED: 409, CAPACITY: 409, MEDIA_TOO_LARGE: 413, RATE_LIMITED: 429, TIMEOUT: 504, INTERNAL: 500,
    NOT_IMPLEMENTED: 501, DISK_FULL: 507,
}
MAX_BODY = 256 * 1024  # JSON bodies; media has routes of its own (§11)
CONTROL_TIMEOUT = 10.0
HEALTH_TIMEOUT = 3.0
WORKER_TIMEOUT = 65.0  # commands that wait on a worker: its 30 s, or a stop's stop_timeout and SIGKILL
JSON = "application/json"
DOCS_POLICY = inline_policy(DOCS_HTML)  # its script and style are inline: allowed by their hashes only


def error_parts(exc: WaportError) -> tuple[int, dict[str, str], bytes]:
    """Status, extra headers and body of an error answer (§9: `Retry-After` whole seconds, at least 1)."""
    headers = {}
    if exc.code == RATE_LIMITED:
        ms = exc.extra.get("retry_after_ms")
        seconds = math.ceil(ms / 1000) if isinstance(ms, (int, float)) and ms > 0 else 1
        headers["Retry-After"] = str(max(1, seconds))
    elif exc.code == UNAUTHORIZED:
        headers["WWW-Authenticate"] = 'Bearer realm="waport"'
    return STATUS.get(exc.code, 500), headers, dumps({"error": exc.to_dict()})


def error_response(exc: WaportError) -> Response:
    status, headers, body = error_parts(exc)
    return Response(body, status, headers, media_type=JSON)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def ok(result: Any, status: int = 200) -> Response:
    return Response(dumps(result), status, media_type=JSON)


async def read_json(request: Request) -> dict[str, Any]:
    """The body, read no further than MAX_BODY bytes, as a JSON object."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise WaportError(BAD_REQUEST, f"body exceeds {MAX_BODY} bytes")
        chunks.append(chunk)
    return json_object(b"".join(chunks))


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or `bad_request` (too big, not JSON, nested too deep, not an object)."""
    if len(body) > MAX_BODY:
        raise WaportError(BAD_REQUEST, f"body of {len(body)} bytes exceeds {MAX_BODY}")
    try:
        data = parse_json(body) if body else {}
    except InvalidJSON as exc:
        raise WaportError(BAD_REQUEST, f"body: {exc}") from None
    if not isinstance(data, dict):
        raise WaportError(BAD_REQUEST, "body must be a JSON object")
    return data


class Api:
    """The routes' shared state: the links to waportd and the token check."""

    def __init__(self, control: ControlLink, hub: EventHub, auth: Auth) -> None:
        self.control = control
        self.hub = hub
        self.auth = auth

    async def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = CONTROL_TIMEOUT) -> dict:
        return await self.control.call(cmd, args or {}, timeout)

    def caller(self, request: Request) -> Caller:
        return self.auth.check(request.headers.get("authorization"))

    async def send(self, caller: Caller, company: str, body: bytes, key: str | None) -> bytes:
        """The send route's work, with no framework around it: one control round trip (the daemon
        validates the fields with the same ipc.richmessage as every other entry point)."""
        validate_company(company)
        caller.may_act_on(company)
        data = json_object(body)
        args: dict[str, Any] = {k: data[k] for k in SEND_ARGS if k in data}  # DESIGN.md §11; the daemon checks them
        args.update(company=company, to=data.get("to"))
        if key is not None:
            args["idempotency_key"] = key
        result = await self.call("send", args)
        return dumps({"message_id": result.get("message_id"), "status": result.get("status")})

    def company_of(self, request: Request, caller: Caller) -> str:
        """The path's company, valid and within the caller's reach."""
        company = validate_company(request.path_params["company"])
        caller.may_act_on(company)
        return company


Handler = Callable[[Api, Request], Awaitable[Response]]


def guarded(api: Api, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Every failure becomes the error body of §9 with its status: never a traceback."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(api, request)
        except WaportError as exc:
            return error_response(exc)
        except Exception:  # noqa: BLE001 - a bug answers 500 with a body, the process carries on
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(WaportError(INTERNAL, "internal error; see the waport API log"))

    return endpoint


# ---------------------------------------------------------------- handlers


async def health(api: Api, request: Request) -> Response:
    """The /healthz body and status: 200 ok, 503 degraded; a probe gets an answer within 3 s."""
    body = await api.call("health", timeout=HEALTH_TIMEOUT)
    return ok(body, 200 if body.get("status") == "ok" else 503)


async def list_sessions(api: Api, request: Request) -> Response:
    caller = api.caller(request)
    sessions = (await api.call("list"))["sessions"]
    if caller.company is not None:
        sessions = [s for s in sessions if s.get("company") == caller.company]
    return ok({"sessions": sessions})


async def put_session(api: Api, request: Request) -> Response:
    caller = api.caller(request)
    company = api.company_of(request, caller)
    args: dict[str, Any] = {"company": company}
    body = await request.body()
    if body.strip():
        proxy = json_object(body).get("proxy")
        if proxy is not None:
            args["proxy"] = proxy  # a changed proxy restarts a running worker: a worker's wait
    record = await api.call("start", args, WORKER_TIMEOUT)
    created = record.pop("created", False)  # said by the daemon, which alone knows: two PUTs never both get 201
    return ok(record, 201 if created else 200)


async def get_session(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    return ok(await api.call("status", {"company": company}))


async def delete_session(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    return ok(await api.call("delete", {"company": company}, WORKER_TIMEOUT))


def lifecycle(cmd: str) -> Handler:
    async def handler(api: Api, request: Request) -> Response:
        company = api.company_of(request, api.caller(request))
        if cmd == "start":
            await api.call("status", {"company": company})  # a known session only: PUT creates
        return ok(await api.call(cmd, {"company": company}, WORKER_TIMEOUT))

    return handler


async def diagnose(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    return ok(await api.call("diagnose", {"company": company}))


async def qr(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    code = (await api.call("qr", {"company": company})).get("code")
    if not code:
        raise WaportError(NOT_FOUND, f"{company} has no QR code waiting (it is not pairing)")
    if "image/png" in request.headers.get("accept", ""):
        return Response(qr_png(code), media_type="image/png", headers={"Cache-Control": "no-store"})
    return Response(dumps({"code": code}), media_type=JSON, headers={"Cache-Control": "no-store"})


def qr_png(code: str) -> bytes:
    import io

    import segno

    out = io.BytesIO()
    segno.make(code, error="m").save(out, kind="png", scale=8, border=4)
    return out.getvalue()


async def pairing_code(api: Api, request: Request) -> Response:
    caller = api.caller(request)
    company = api.company_of(request, caller)
    body = await read_json(request)
    result = await api.call("pair_code", {"company": company, "phone": body.get("phone")}, WORKER_TIMEOUT)
    return ok({"code": result.get("code")})


async def send_message(api: Api, request: Request) -> Response:
    """Served by `api.fastpath` in front of the framework; this route is its twin for the OpenAPI document
    (and answers the same should the fast path ever step aside)."""
    caller = api.caller(request)
    key = idempotency_key(request.headers.getlist("idempotency-key"))
    result = await api.send(caller, request.path_params["company"], await request.body(), key)
    return Response(result, 202, media_type=JSON)


def idempotency_key(values: list[str]) -> str | None:
    """The one Idempotency-Key, ASCII; two of them, or other characters, would make two sends look alike."""
    if not values:
        return None
    if len(values) > 1 or not values[0].isascii():
        raise WaportError(BAD_REQUEST, "Idempotency-Key: give one, of ASCII characters")
    return values[0]


async def list_messages(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    raw = request.query_params.get("limit", "20")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1000:
        raise WaportError(BAD_REQUEST, "limit must be a whole number from 1 to 1000")
    return ok(await api.call("messages", {"company": company, "limit": int(raw)}))


async def get_message(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    message_id = request.path_params["message_id"]
    result = await api.call("messages", {"company": company, "message_id": message_id})
    return ok(result["message"])


async def event_stream(api: Api, request: Request) -> Response:
    caller = api.caller(request)
    company = request.query_params.get("company")
    if company is not None:
        validate_company(company)
    if caller.company is not None:
        if company is not None:
            caller.may_act_on(company)
        company = caller.company
    type_ = request.query_params.get("type")
    if type_ is not None and type_ not in events.TYPES:
        raise WaportError(BAD_REQUEST, f"unknown event type {type_!r}; known: {', '.join(sorted(events.TYPES))}")
    stream = api.hub.stream(company, type_, request.headers.get("last-event-id"))
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def put_webhook(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    body = await read_json(request)
    result = await api.call("webhook_set", {"company": company, "url": body.get("url"), "events": body.get("events")})
    created = result.pop("created", False)
    return ok(result, 201 if created else 200)


def webhook_call(cmd: str) -> Handler:
    async def handler(api: Api, request: Request) -> Response:
        company = api.company_of(request, api.caller(request))
        return ok(await api.call(cmd, {"company": company}))

    return handler


async def webhook_deliveries(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    raw = request.query_params.get("limit", "50")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1000:
        raise WaportError(BAD_REQUEST, "limit must be a whole number from 1 to 1000")
    return ok(await api.call("webhook_deliveries", {"company": company, "limit": int(raw)}))


async def replay_webhook(api: Api, request: Request) -> Response:
    company = api.company_of(request, api.caller(request))
    body = await read_json(request)
    return ok(await api.call("webhook_replay", {"company": company, "dead": body.get("dead") is True,
                                                "since": body.get("since")}))


def chat_action(cmd: str) -> Handler:
    """`POST .../read {chat, message_ids}` and `.../typing {chat, state}`: the worker does them (§11)."""

    async def handler(api: Api, request: Request) -> Response:
        company = api.company_of(request, api.caller(request))
        body = await read_json(request)
        args = {"company": company, "chat": body.get("chat")}
        if cmd == "read":
            args["message_ids"] = body.get("message_ids")
        else:
            args["state"] = body.get("state", "composing")
        return ok(await api.call(cmd, args, WORKER_TIMEOUT))

    return handler


MEDIA_REQUEST_MAX = (64 << 20) + (1 << 20)  # a request body no media can need (media_max_bytes is the daemon's)


async def put_media(api: Api, request: Request) -> Response:
    """`POST /v1/media`: multipart (one `file` part) or the raw bytes with their Content-Type; streamed to the
    store in chunks, never held whole. A company token's upload belongs to its company."""
    caller = api.caller(request)
    company = request.query_params.get("company") or caller.company
    if company is not None:
        validate_company(company)
        caller.may_act_on(company)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MEDIA_REQUEST_MAX):
        raise WaportError(MEDIA_TOO_LARGE, f"a media upload is at most {MEDIA_REQUEST_MAX} bytes")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        if length is None:  # the form is spooled before it is read: its size must be known and bounded first
            raise WaportError(BAD_REQUEST, "a multipart upload needs a Content-Length")
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as exc:  # noqa: BLE001 - a malformed multipart body (no boundary, cut short, ...)
            raise WaportError(BAD_REQUEST, f"multipart: {exc}"[:200]) from None
        part = form.get("file")
        if part is None or isinstance(part, str):
            raise WaportError(BAD_REQUEST, "multipart: one part named `file` with the bytes")
        mimetype = part.content_type or "application/octet-stream"
        filename = part.filename
        chunks = iter_file(part)
    else:
        mimetype, filename = ctype or "application/octet-stream", request.query_params.get("filename")
        chunks = request.stream()
    upload, size, last = None, 0, b""
    try:
        async for chunk in rechunk(chunks):
            if last:
                result = await api.call("media_put", put_args(last, upload))
                upload = result["upload"]
            size += len(chunk)
            if size > MEDIA_REQUEST_MAX:
                raise WaportError(MEDIA_TOO_LARGE, f"a media upload is at most {MEDIA_REQUEST_MAX} bytes")
            last = chunk
        if not last:
            raise WaportError(BAD_REQUEST, "no bytes: an empty file is no media")
        result = await api.call("media_put", {**put_args(last, upload), "last": True, "mimetype": mimetype,
                                              "filename": filename, "company": company})
    finally:
        if ctype.startswith("multipart/form-data"):
            await form.close()
    return ok(result, 201)


async def iter_file(part: Any) -> Any:
    while chunk := await part.read(WIRE_CHUNK):
        yield chunk


async def rechunk(chunks: Any) -> Any:
    """Any sizes in, WIRE_CHUNK out (the last one shorter)."""
    buf = bytearray()
    async for piece in chunks:
        buf += piece
        while len(buf) >= WIRE_CHUNK:
            yield bytes(buf[:WIRE_CHUNK])
            del buf[:WIRE_CHUNK]
    if buf:
        yield bytes(buf)


async def get_media(api: Api, request: Request) -> Response:
    """`GET /v1/media/{media_id}`: the bytes, streamed chunk by chunk; a company token reads its company's."""
    import base64

    caller = api.caller(request)
    media_id = request.path_params["media_id"]
    args = {"media_id": media_id, "offset": 0, **({"company": caller.company} if caller.company else {})}
    first = await api.call("media_get", args)

    async def body() -> Any:
        reply = first
        while True:
            data = base64.b64decode(reply["data"])
            yield data
            if reply["eof"] or not data:
                return
            reply = await api.call("media_get", {**args, "offset": reply["offset"] + len(data)})

    return StreamingResponse(body(), media_type=first["mimetype"], headers={
        "Content-Length": str(first["size"]), "ETag": f'"{first["sha256"]}"', "Cache-Control": "private, max-age=86400",
        "X-Content-Type-Options": "nosniff", "Content-Disposition": "attachment"})


# ---------------------------------------------------------------- the app


def build(api: Api) -> FastAPI:
    app = FastAPI(title="waport", version=__version__, openapi_url="/v1/openapi.json", docs_url=None,
                  redoc_url=None, description=schemas.DESCRIPTION, webhooks=None)
    app.openapi_version = "3.1.0"

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = NOT_FOUND if exc.status_code == 404 else BAD_REQUEST
        if exc.status_code == 405:  # Allow names every method of the path (routes are one method each)
            allowed = sorted({m for r in app.routes if isinstance(r, APIRoute) and r.matches(request.scope)[0]
                              != Match.NONE for m in (r.methods or ())})
            return Response(dumps({"error": {"code": BAD_REQUEST, "message": "method not allowed"}}), 405,
                            media_type=JSON, headers={"Allow": ", ".join(allowed)})
        return error_response(WaportError(code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(WaportError(BAD_REQUEST, "invalid request"))

    def route(path: str, method: str, handler: Handler, op: schemas.Operation) -> None:
        app.add_api_route(path, guarded(api, handler), methods=[method], **op.fastapi())

    s = "/v1/sessions/{company}"
    route("/v1/health", "GET", health, schemas.HEALTH)
    route("/v1/sessions", "GET", list_sessions, schemas.LIST_SESSIONS)
    route(s, "PUT", put_session, schemas.PUT_SESSION)
    route(s, "GET", get_session, schemas.GET_SESSION)
    route(s, "DELETE", delete_session, schemas.DELETE_SESSION)
    for cmd in ("start", "stop", "restart", "logout"):
        route(f"{s}/{cmd}", "POST", lifecycle(cmd), schemas.lifecycle(cmd))
    route(f"{s}/diagnose", "GET", diagnose, schemas.DIAGNOSE)
    route(f"{s}/qr", "GET", qr, schemas.QR)
    route(f"{s}/pairing-code", "POST", pairing_code, schemas.PAIRING_CODE)
    route(f"{s}/messages", "POST", send_message, schemas.SEND)
    route(f"{s}/messages", "GET", list_messages, schemas.LIST_MESSAGES)
    route(f"{s}/messages/{{message_id}}", "GET", get_message, schemas.GET_MESSAGE)
    route("/v1/events", "GET", event_stream, schemas.EVENTS)
    route(f"{s}/webhook", "PUT", put_webhook, schemas.PUT_WEBHOOK)
    route(f"{s}/webhook", "GET", webhook_call("webhook_show"), schemas.GET_WEBHOOK)
    route(f"{s}/webhook", "DELETE", webhook_call("webhook_delete"), schemas.DELETE_WEBHOOK)
    route(f"{s}/webhook/rotate", "POST", webhook_call("webhook_rotate"), schemas.ROTATE_WEBHOOK)
    route(f"{s}/webhook/deliveries", "GET", webhook_deliveries, schemas.WEBHOOK_DELIVERIES)
    route(f"{s}/webhook/replay", "POST", replay_webhook, schemas.REPLAY_WEBHOOK)
    route(f"{s}/read", "POST", chat_action("read"), schemas.READ)
    route(f"{s}/typing", "POST", chat_action("typing"), schemas.TYPING)
    route("/v1/media", "POST", put_media, schemas.PUT_MEDIA)
    route("/v1/media/{media_id}", "GET", get_media, schemas.GET_MEDIA)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        doc = generate()
        doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "a token from `waportctl token create`"}
        return doc

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_HTML, headers={"Content-Security-Policy": DOCS_POLICY})

    consolepage.add_routes(app)  # §13: GET /console and its assets
    return app
