"""Worker <-> supervisor protocol over ZeroMQ ROUTER (supervisor) / DEALER (worker).

In the spirit of Majordomo / Paranoid Pirate: every multipart message is
``[HEADER, type, json-body]`` (the ROUTER side sees the routing id first).
Both sides heartbeat; requests carry an id and an absolute deadline. Anything
that does not parse raises `ProtocolError`, which callers count and drop.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ipc import jsonsafe

HEADER = b"WAP1"
VERSION = 2  # 2: EVENTS; the supervisor restarts a worker that speaks another version
# Worker options that must not show in its arguments (a proxy's password; ps shows arguments to
# everyone): the supervisor puts them in this variable of the worker's environment as JSON, and the
# worker reads and removes it at once.
SECRETS_ENV = "WAPORT_WORKER_SECRETS"

READY = "READY"  # worker -> supervisor: {company, pid, generation, version}
HEARTBEAT = "HEARTBEAT"  # both ways: {} (worker adds {state, queued}; supervisor may add {lease_deadline})
REQUEST = "REQUEST"  # supervisor -> worker: {id, cmd, args, deadline}
REPLY = "REPLY"  # worker -> supervisor: {id, ok, result | error}
EVENT = "EVENT"  # worker -> supervisor: {type, ts, data}
EVENTS = "EVENTS"  # worker -> supervisor: {events: [EVENT body, ...]}; a loop turn's events in one frame
STOP = "STOP"  # supervisor -> worker: {reason}; the worker stops and exits 0
OUTBOX = "OUTBOX"  # supervisor -> worker: {}; the journal has new queued messages
ACK = "ACK"  # supervisor -> worker: {ids}; these inbound messages reached every sink
LOG = "LOG"  # worker -> supervisor: {level, name, msg, ts, file?, line?, func?, event?}; re-emitted by the supervisor

TYPES = frozenset({READY, HEARTBEAT, REQUEST, REPLY, EVENT, EVENTS, STOP, OUTBOX, ACK, LOG})

# Required body fields and their types, per message type.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    READY: {"company": str, "pid": int, "generation": int, "version": int},
    HEARTBEAT: {},
    REQUEST: {"id": str, "cmd": str, "args": dict, "deadline": (int, float)},
    REPLY: {"id": str, "ok": bool},
    EVENT: {"type": str, "ts": (int, float), "data": dict},
    EVENTS: {"events": list},
    STOP: {"reason": str},
    OUTBOX: {},
    ACK: {"ids": list},
    LOG: {"level": int, "name": str, "msg": str, "ts": (int, float)},
}

# Cluster mode (DESIGN §12): a supervisor's HEARTBEAT may carry `lease_deadline`, an absolute
# time.monotonic() value (CLOCK_MONOTONIC is system-wide on Linux: the same clock in both processes).
# The worker stops its session FENCE_MARGIN seconds before it, whether or not its supervisor still talks.
LEASE_DEADLINE = "lease_deadline"
FENCE_MARGIN = 1.0

MAX_FRAME_BYTES = 1 << 20
BATCH_BYTES = MAX_FRAME_BYTES // 2  # an EVENTS frame larger than this is split in two


class ProtocolError(ValueError):
    """A frame that is not a valid protocol message; count it and drop it."""


@dataclass
class Message:
    type: str
    body: dict[str, Any] = field(default_factory=dict)
    dropped: int = 0  # EVENTS: malformed items left out (the others still count); HEARTBEAT: a bad lease_deadline


def encode(type_: str, body: dict[str, Any] | None = None) -> list[bytes]:
    if type_ not in TYPES:
        raise ValueError(f"unknown message type {type_!r}")
    return [HEADER, type_.encode(), json.dumps(body or {}, separators=(",", ":")).encode()]


def encode_events(bodies: list[dict[str, Any]], limit: int = BATCH_BYTES) -> list[list[bytes]]:
    """A turn's events in as few frames as fit: each frame costs a send, a wakeup and a read on both sides."""
    if len(bodies) <= 1:
        return [encode(EVENT, body) for body in bodies]
    frames = encode(EVENTS, {"events": bodies})
    if len(frames[2]) <= limit:
        return [frames]
    half = len(bodies) // 2
    return encode_events(bodies[:half], limit) + encode_events(bodies[half:], limit)


def decode(frames: list[bytes]) -> Message:
    """Parse the three protocol frames (routing id already removed)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    header, raw_type, raw_body = frames
    if header != HEADER:
        raise ProtocolError(f"bad header {bytes(header[:16])!r}")
    try:
        type_ = bytes(raw_type).decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("message type is not UTF-8") from exc
    if type_ not in TYPES:
        raise ProtocolError(f"unknown message type {type_[:32]!r}")
    if len(raw_body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"body of {len(raw_body)} bytes is too large")
    try:
        body = jsonsafe.loads(bytes(raw_body))
    except jsonsafe.InvalidJSON as exc:
        raise ProtocolError(f"body: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("body is not a JSON object")
    _check(type_, body)
    if type_ == EVENTS:  # one bad item costs that item only, as it did when each event had its own frame
        items = [item for item in body["events"] if _valid_event(item)]
        dropped = len(body["events"]) - len(items)
        return Message(type_, {**body, "events": items}, dropped)
    if type_ == HEARTBEAT and body.get(LEASE_DEADLINE) is not None:
        deadline = valid_deadline(body[LEASE_DEADLINE])
        if deadline is None:  # the value is left out and counted; the beat itself still counts
            return Message(type_, {k: v for k, v in body.items() if k != LEASE_DEADLINE}, 1)
        return Message(type_, {**body, LEASE_DEADLINE: deadline})
    return Message(type_, body)


def valid_deadline(value: Any) -> float | None:
    """A `lease_deadline` as a float, or None when it is no finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        deadline = float(value)
    except OverflowError:  # an integer of 400 digits
        return None
    return deadline if math.isfinite(deadline) and deadline > 0 else None


def _valid_event(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    try:
        _check(EVENT, item)
    except ProtocolError:
        return False
    return True


def _check(type_: str, body: dict[str, Any]) -> None:
    for name, kind in _SCHEMA[type_].items():
        value = body.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"{type_}: field {name!r} missing or of the wrong type")


def unbatch(msg: Message) -> list[Message]:
    """An EVENTS frame as the EVENT messages it carries; any other message as itself."""
    if msg.type == EVENTS:
        return [Message(EVENT, item) for item in msg.body["events"]]
    return [msg]


HEARTBEAT_GRID = 0.1  # seconds: periodic frames leave on a shared wall-clock grid


def aligned_delay(interval: float, now_wall: float | None = None, grid: float = HEARTBEAT_GRID) -> float:
    """Seconds until the next periodic frame: `interval` from now, rounded up to the shared grid.

    A thousand workers beating at random phases wake their peer 200 times a second; on a grid
    their beats arrive together and are read in a few loop turns.
    """
    now_wall = time.time() if now_wall is None else now_wall
    return math.ceil((now_wall + interval) / grid) * grid - now_wall


def routing_id(company: str, generation: int) -> bytes:
    """Unique per worker incarnation, so a lingering old pipe never receives a new worker's traffic."""
    return f"{company}/{generation}".encode()
