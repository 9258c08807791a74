"""Public events (DESIGN.md §4): ZeroMQ PUB, topic `<company>.<type>`, one JSON frame."""

from __future__ import annotations

import json
import time
from typing import Any

STATE = "state"
QR = "qr"
PAIR_CODE = "pair_code"
CONNECTED = "connected"
DISCONNECTED = "disconnected"
MESSAGE = "message"
RECEIPT = "receipt"
SENT = "sent"
SEND_FAILED = "send_failed"
LOGGED_OUT = "logged_out"
REPLACED = "replaced"
ERROR = "error"
RESTART = "restart"
RECONNECT_FAILED = "reconnect_failed"
HEALTH_CHECK_FAILED = "health_check_failed"
RATE_LIMITED = "rate_limited"
WEBHOOK_DISABLED = "webhook_disabled"  # an endpoint answered 410 (DESIGN.md §10)
LEASE_ACQUIRED = "lease_acquired"  # this host now runs the company (DESIGN.md §12)
LEASE_LOST = "lease_lost"  # it does not any more: another host holds a newer epoch, or this one was cut off

TYPES = frozenset(
    {
        STATE,
        QR,
        PAIR_CODE,
        CONNECTED,
        DISCONNECTED,
        MESSAGE,
        RECEIPT,
        SENT,
        SEND_FAILED,
        LOGGED_OUT,
        REPLACED,
        ERROR,
        RESTART,
        RECONNECT_FAILED,
        HEALTH_CHECK_FAILED,
        RATE_LIMITED,
        WEBHOOK_DISABLED,
        LEASE_ACQUIRED,
        LEASE_LOST,
    }
)


def make(company: str, type_: str, data: dict[str, Any], ts: float | None = None) -> dict[str, Any]:
    return {"type": type_, "company": company, "ts": time.time() if ts is None else ts, "data": data}


def topic(company: str, type_: str) -> bytes:
    return f"{company}.{type_}".encode()


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def frames(event: dict[str, Any]) -> list[bytes]:
    return [topic(event["company"], event["type"]), body(event)]


def topic_prefix(company: str | None, type_: str | None) -> bytes:
    """The SUB prefix for a filter; a type without a company needs client-side filtering."""
    if company and type_:
        return f"{company}.{type_}".encode()
    if company:
        return f"{company}.".encode()
    return b""
