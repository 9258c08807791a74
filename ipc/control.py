"""Control protocol (DESIGN.md §4): one JSON frame in, one JSON frame out.

Request ``{"id", "cmd", "args"}``; reply ``{"id", "ok": true, "result"}`` or
``{"id", "ok": false, "error": {"code", "message", ...}}``.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import zmq

from ipc import jsonsafe, paths
from ipc.errors import BAD_REQUEST, TIMEOUT, WaportError

COMMANDS = (
    "ping",
    "version",
    "list",
    "status",
    "start",
    "stop",
    "restart",
    "logout",
    "delete",
    "send",
    "qr",
    "pair_code",
    "metrics",
    "diagnose",
    "reload",
    "messages",
    "messages_purge",
    "cluster",
    "drain",
    "move",
    "health",
    "token_create",
    "token_list",
    "token_revoke",
    "webhook_set",
    "webhook_show",
    "webhook_rotate",
    "webhook_delete",
    "webhook_deliveries",
    "webhook_replay",
    "webhook_report",  # the delivery process's outcomes (internal)
    "media_put",
    "media_get",
    "media_fetch",
    "read",
    "typing",
    "export",  # a move: stop here, then bundle (waportd/transfer.py)
    "backup",
    "transfer_read",
    "transfer_done",
    "transfer_abort",
    "import_begin",
    "import_write",
    "import_commit",
    "import_abort",
)

MAX_REQUEST_BYTES = 1 << 20


@dataclass
class Request:
    id: str
    cmd: str
    args: dict[str, Any]


def parse_request(raw: bytes) -> Request:
    """Parse one request frame; anything malformed raises `bad_request`."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise WaportError(BAD_REQUEST, f"request of {len(raw)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        data = jsonsafe.loads(raw)
    except jsonsafe.InvalidJSON as exc:
        raise WaportError(BAD_REQUEST, f"request: {exc}") from None
    if not isinstance(data, dict):
        raise WaportError(BAD_REQUEST, "request must be a JSON object")
    req_id = data.get("id", "")
    if not isinstance(req_id, str):
        raise WaportError(BAD_REQUEST, "field 'id' must be a string")
    cmd = data.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise WaportError(BAD_REQUEST, "field 'cmd' must be a non-empty string", id=req_id)
    args = data.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise WaportError(BAD_REQUEST, "field 'args' must be an object", id=req_id)
    return Request(req_id, cmd, args)


def request_id_of(raw: bytes) -> str:
    """Best-effort id of a request that failed to parse, so the error reply still matches."""
    if len(raw) > MAX_REQUEST_BYTES:
        return ""
    try:
        data = jsonsafe.loads(raw)
    except jsonsafe.InvalidJSON:
        return ""
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        return data["id"]
    return ""


def ok_reply(req_id: str, result: dict[str, Any] | None = None) -> bytes:
    return _dump({"id": req_id, "ok": True, "result": result or {}})


def error_reply(req_id: str, error: WaportError) -> bytes:
    return _dump({"id": req_id, "ok": False, "error": error.to_dict()})


def encode_request(cmd: str, args: dict[str, Any], req_id: str) -> bytes:
    return _dump({"id": req_id, "cmd": cmd, "args": args})


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


class DaemonUnreachable(Exception):
    """No daemon answered on the control socket."""


class ControlClient:
    """A blocking client: one DEALER socket, one outstanding request at a time."""

    def __init__(self, run_dir: str, timeout: float = 10.0, endpoint: str | None = None) -> None:
        self.endpoint = endpoint or paths.endpoint(run_dir, paths.CONTROL_SOCK)
        self.timeout = timeout
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            path = paths.ipc_path(self.endpoint)
            if path is not None and not os.path.exists(path):
                raise DaemonUnreachable(f"no control socket at {path}: is waportd running?")
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def call_raw(self, frame: bytes, timeout: float | None = None) -> dict[str, Any]:
        """Send one frame, return the decoded reply; a reply that is no JSON object raises `InvalidJSON`."""
        sock = self._socket()
        sock.send(frame)
        wait_ms = int(1000 * (self.timeout if timeout is None else timeout))
        if not sock.poll(wait_ms):
            # The socket may hold a late reply; start afresh next time.
            self.close()
            raise DaemonUnreachable(f"no reply from {self.endpoint} within {wait_ms / 1000:g} s")
        reply = jsonsafe.loads(sock.recv())
        if not isinstance(reply, dict):
            raise jsonsafe.InvalidJSON(f"reply is not a JSON object: {type(reply).__name__}")
        return reply

    def call(self, cmd: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Return the reply's result, or raise the reply's error as `WaportError`."""
        req_id = uuid.uuid4().hex
        reply = self.call_raw(encode_request(cmd, args, req_id), timeout)
        if reply.get("id") != req_id:
            raise WaportError(BAD_REQUEST, f"reply id {reply.get('id')!r} does not match")
        if reply.get("ok"):
            return reply.get("result") or {}
        raise WaportError.from_dict(reply.get("error"))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def timeout_error(what: str, seconds: float) -> WaportError:
    return WaportError(TIMEOUT, f"{what} did not answer within {seconds:g} s")
