"""What the OpenAPI document says of each route: bodies, answers, errors, auth.

The models describe; the handlers do not run them on each request (api/app.py says why). A test
(`schemathesis`, tests/test_api.py) holds the live answers to these schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ipc.states import ALL

DESCRIPTION = """Run many WhatsApp sessions: one isolated worker per company.

Every route but `/v1/health`, `/v1/openapi.json` and `/docs` needs `Authorization: Bearer <token>`
(`waportctl token create`). A token made for one company acts on that company only."""

StateName = Literal[tuple(str(s) for s in ALL)]  # type: ignore[valid-type]
COMPANY_PATTERN = "^[A-Za-z0-9_-]{1,50}$"


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(Open):
    code: str = Field(description="bad_request, invalid_company_id, invalid_phone, unknown_company, not_connected, "
                                  "rate_limited, message_too_long, timeout, internal, unauthorized, forbidden, "
                                  "not_found, capacity, media_too_large, disk_full")
    message: str


class Error(BaseModel):
    error: ErrorDetail


class SessionRecord(Open):
    company: str
    state: StateName
    reason: str
    pid: int | None
    since: float
    connected_at: float | None
    phone: str | None
    restarts: int
    next_restart_at: float | None
    last_error: str | None
    rss_bytes: int | None
    queued: int


class Sessions(BaseModel):
    sessions: list[SessionRecord]


class Deleted(BaseModel):
    company: str
    deleted: bool


class Code(BaseModel):
    code: str


class PairingCodeRequest(BaseModel):
    phone: str = Field(description="7-15 digits; spaces, dashes, parentheses and one leading + allowed")


class SessionOptions(BaseModel):
    proxy: str | None = Field(None, max_length=2048, description="this company's own proxy to WhatsApp: "
                              "http://, https:// or socks5://HOST:PORT; \"direct\" for none; \"\" for the config's")


class SendRequest(BaseModel):
    """DESIGN.md §11: `type` and that type's fields; any type may carry `reply_to`."""

    to: str = Field(description="a phone number (7-15 digits) or a full JID (…@s.whatsapp.net, …@g.us)")
    type: Literal["text", "image", "video", "audio", "document", "location", "reaction"] = "text"
    text: str | None = Field(None, min_length=1, max_length=65536,
                             description="the message (type text), a caption (media) or a location's name")
    media: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="a media id from POST /v1/media")
    filename: str | None = Field(None, min_length=1, max_length=255)
    voice: bool | None = Field(None, description="audio only: a voice note")
    latitude: float | None = Field(None, ge=-90, le=90)
    longitude: float | None = Field(None, ge=-180, le=180)
    name: str | None = Field(None, max_length=1000)
    message_id: str | None = Field(None, min_length=1, max_length=128, description="reaction: the message")
    emoji: str | None = Field(None, max_length=16, description="reaction: the emoji; empty removes it")
    reply_to: str | None = Field(None, min_length=1, max_length=128, description="the message this answers")


class SendResult(Open):
    message_id: str
    status: Literal["queued", "sending", "sent", "send_failed", "uncertain"]


class Health(Open):
    status: Literal["ok", "degraded"]
    services: dict[str, str]
    counts: dict[str, int]
    sessions: int
    version: str


class Diagnosis(Open):
    company: str


class Messages(Open):
    company: str
    counts: dict[str, int]
    outbound: list[dict[str, Any]]
    inbound: list[dict[str, Any]]


class Message(Open):
    direction: Literal["out", "in"]
    message_id: str


class WebhookRequest(BaseModel):
    url: str = Field(description="http:// or https:// URL the company's events are POSTed to", max_length=2048)
    events: list[str] | None = Field(None, description="event types (default: message, receipt, sent, "
                                                       "send_failed, state)")


class WebhookEndpoint(Open):
    company: str
    url: str
    events: list[str]
    scope: Literal["company", "global"]
    disabled: dict[str, Any] | None = Field(None, description="set after the endpoint answered 410")


class WebhookSecret(WebhookEndpoint):
    secret: str = Field(description="whsec_…: shown this once; verify deliveries with it (Standard Webhooks)")


class WebhookDeliveries(Open):
    company: str
    endpoint: WebhookEndpoint | None
    counts: dict[str, int]
    events: list[dict[str, Any]]


class ReplayRequest(BaseModel):
    dead: bool = Field(False, description="the dead events")
    since: float | str | None = Field(None, description="every event since: a unix time, or a duration back (1h)")


class Replayed(BaseModel):
    company: str
    replayed: int


def error(description: str) -> dict[str, Any]:
    return {"model": Error, "description": description}


AUTH_ERRORS = {401: error("no token, or an unknown, revoked or expired one"),
               403: error("a company token acting on another company")}
COMPANY_ERRORS = {400: error("invalid company id or input"), **AUTH_ERRORS,
                  404: error("unknown company (start it with PUT first)"), 504: error("waportd did not answer in time"),
                  500: error("internal error")}
COMPANY = {"name": "company", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": COMPANY_PATTERN, "maxLength": 50},
           "description": f"company id, {COMPANY_PATTERN} (anything else: 400 invalid_company_id)"}


@dataclass
class Operation:
    operation_id: str
    summary: str
    answers: dict[int, Any]  # status -> model or {"model", "description"} or {"description", "content"}
    parameters: list[dict[str, Any]] = field(default_factory=list)
    body: type[BaseModel] | None = None
    secured: bool = True
    raw_body: dict[str, Any] | None = None  # a request body's content map, when it is not one JSON model
    body_required: bool = True
    tags: list[str] = field(default_factory=lambda: ["sessions"])

    def fastapi(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.parameters:
            extra["parameters"] = self.parameters
        if self.body is not None:
            extra["requestBody"] = {"required": self.body_required, "content": {"application/json": {
                "schema": self.body.model_json_schema(ref_template="#/components/schemas/{model}")}}}
        if self.raw_body is not None:
            extra["requestBody"] = {"required": True, "content": self.raw_body}
        if self.secured:
            extra["security"] = [{"bearer": []}]
        responses = {status: (a if isinstance(a, dict) else {"model": a}) for status, a in self.answers.items()}
        first = min(self.answers)
        return {"operation_id": self.operation_id, "summary": self.summary, "responses": responses,
                "openapi_extra": extra, "response_model": None, "status_code": first, "tags": self.tags}


HEALTH = Operation("health", "The daemon's health (the /healthz body)",
                   {200: Health, 503: {"model": Health, "description": "degraded: something needs a person"},
                    504: error("waportd did not answer within 3 s")}, secured=False, tags=["daemon"])
LIST_SESSIONS = Operation("listSessions", "Every session (a company token sees its own)",
                          {200: Sessions, 401: AUTH_ERRORS[401], 504: error("waportd did not answer")})
PUT_SESSION = Operation("putSession", "Create and start a session (201), or start a known one (200)",
                        {200: SessionRecord, 201: SessionRecord, **COMPANY_ERRORS,
                         409: error("capacity: max_companies reached")}, [COMPANY], SessionOptions,
                        body_required=False)
GET_SESSION = Operation("getSession", "The session record", {200: SessionRecord, **COMPANY_ERRORS}, [COMPANY])
DELETE_SESSION = Operation("deleteSession", "Unlink, stop and delete the session with its data",
                           {200: Deleted, **COMPANY_ERRORS}, [COMPANY])


def lifecycle(cmd: str) -> Operation:
    return Operation(f"{cmd}Session", f"{cmd.capitalize()} the session", {200: SessionRecord, **COMPANY_ERRORS,
                     409: error("not_connected: logout needs a running worker")}, [COMPANY])


DIAGNOSE = Operation("diagnoseSession", "Health of one session, with recommendations", {200: Diagnosis,
                     **COMPANY_ERRORS}, [COMPANY])
QR = Operation("getQr", "The QR code waiting to be scanned (Accept: image/png for the image)",
               {200: {"model": Code, "description": "the code; a PNG with Accept: image/png",
                      "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                **COMPANY_ERRORS, 404: error("unknown company, or no code waiting")}, [COMPANY])
PAIRING_CODE = Operation("pairingCode", "Pair by phone number: a code to type on the phone",
                         {200: Code, **COMPANY_ERRORS, 409: error("not_connected: no worker is pairing")},
                         [COMPANY], PairingCodeRequest)
SEND = Operation("sendMessage", "Send a message: durable (journaled) once answered",
                 {202: SendResult, **COMPANY_ERRORS, 409: error("not_connected: stopped or needs a person"),
                  404: error("unknown company, media or message (reply_to, reaction)"),
                  413: error("media_too_large"),
                  507: error("disk_full: the daemon's disk is full, nothing was written"),
                  429: {"model": Error, "description": "rate_limited", "headers": {"Retry-After": {
                      "description": "seconds to wait, at least 1", "schema": {"type": "integer"}}}}},
                 [COMPANY, {"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[ -~]+$"},
                            "description": "1-200 characters; a key seen before returns the first answer, "
                                           "and nothing is sent again"}], SendRequest, tags=["messages"])
LIST_MESSAGES = Operation("listMessages", "Recent messages, both directions",
                          {200: Messages, **COMPANY_ERRORS},
                          [COMPANY, {"name": "limit", "in": "query", "required": False,
                                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20}}],
                          tags=["messages"])
GET_MESSAGE = Operation("getMessage", "One message by id", {200: Message, **COMPANY_ERRORS,
                        404: error("unknown company or message")},
                        [COMPANY, {"name": "message_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                        tags=["messages"])
EVENTS = Operation("events", "Server-Sent Events: one DESIGN §4 event per `data:` line, each with an `id:`",
                   {200: {"description": "text/event-stream; reconnect with Last-Event-ID to miss nothing "
                                         "from the last 10 minutes",
                          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    400: error("invalid company or type"), **AUTH_ERRORS},
                   [{"name": "company", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "type", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}}],
                   tags=["events"])

WEBHOOK_ERRORS = {**COMPANY_ERRORS, 404: error("no webhook endpoint")}
PUT_WEBHOOK = Operation("putWebhook", "Set the company's webhook endpoint: a new secret, shown once (201 new, 200 "
                        "replaced; a disabled endpoint is enabled again)",
                        {200: WebhookSecret, 201: WebhookSecret, **COMPANY_ERRORS}, [COMPANY], WebhookRequest,
                        tags=["webhooks"])
GET_WEBHOOK = Operation("getWebhook", "Where the company's events go (its own endpoint or the global one)",
                        {200: WebhookEndpoint, **WEBHOOK_ERRORS}, [COMPANY], tags=["webhooks"])
DELETE_WEBHOOK = Operation("deleteWebhook", "Remove the company's own endpoint", {200: Deleted, **WEBHOOK_ERRORS},
                           [COMPANY], tags=["webhooks"])
ROTATE_WEBHOOK = Operation("rotateWebhook", "A new secret (shown once); the previous one signs too for 24 h",
                           {200: WebhookSecret, **WEBHOOK_ERRORS}, [COMPANY], tags=["webhooks"])
WEBHOOK_DELIVERIES = Operation("webhookDeliveries", "Pending, dead and recent deliveries with their last attempt",
                               {200: WebhookDeliveries, **COMPANY_ERRORS},
                               [COMPANY, {"name": "limit", "in": "query", "required": False,
                                          "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                     "default": 50}}], tags=["webhooks"])
REPLAY_WEBHOOK = Operation("replayWebhook", "Deliver events again (same webhook-id and seq): dead ones, or since a "
                           "time", {200: Replayed, **COMPANY_ERRORS}, [COMPANY], ReplayRequest, tags=["webhooks"])

class MediaStored(BaseModel):
    media_id: str = Field(description="the SHA-256 of the bytes, hex")
    size: int
    mimetype: str
    sha256: str


MEDIA_ID = {"name": "media_id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}
PUT_MEDIA = Operation("putMedia", "Store a file: multipart (a part named `file`) or the raw bytes with their "
                      "Content-Type; at most media_max_bytes (64 MiB)",
                      {201: MediaStored, 400: error("no bytes, or a bad MIME type"), **AUTH_ERRORS,
                       413: error("media_too_large"), 504: error("waportd did not answer in time"),
                       500: error("internal error")},
                      [{"name": "company", "in": "query", "required": False,
                        "schema": {"type": "string", "pattern": COMPANY_PATTERN},
                        "description": "the company that will send it (a company token: its own)"},
                       {"name": "filename", "in": "query", "required": False, "schema": {"type": "string"}}],
                      tags=["media"], raw_body={
                          "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                              "file": {"type": "string", "format": "binary"}}}},
                          "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})
GET_MEDIA = Operation("getMedia", "A stored file's bytes (a company token: media its company sent or received)",
                      {200: {"description": "the bytes", "content": {"application/octet-stream": {
                          "schema": {"type": "string", "format": "binary"}}}},
                       400: error("not a media id"), **AUTH_ERRORS, 404: error("no such media (or not yours)"),
                       504: error("waportd did not answer in time")}, [MEDIA_ID], tags=["media"])


class ReadRequest(BaseModel):
    chat: str = Field(description="a phone number or a JID")
    message_ids: list[str] = Field(min_length=1, max_length=100)


class TypingRequest(BaseModel):
    chat: str = Field(description="a phone number or a JID")
    state: Literal["composing", "recording", "paused"] = "composing"


READ = Operation("markRead", "Mark messages of a chat read", {200: Open, **COMPANY_ERRORS,
                 409: error("not_connected: the session is not connected")}, [COMPANY], ReadRequest,
                 tags=["messages"])
TYPING = Operation("typing", "Show typing, recording or paused to a chat", {200: Open, **COMPANY_ERRORS,
                   409: error("not_connected: the session is not connected")}, [COMPANY], TypingRequest,
                   tags=["messages"])
