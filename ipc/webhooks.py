"""Webhook policy (DESIGN.md §10), pure: secrets, signatures, the retry schedule, what a response means.

Standard Webhooks (standardwebhooks.com): the signed content is ``{id}.{timestamp}.{body}``, the
key is the secret's base64 part decoded, the header lists ``v1,<base64 HMAC-SHA256>`` separated by
spaces (two while a rotated secret is still valid).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import email.utils
import hashlib
import hmac
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ipc import events
from ipc.errors import BAD_REQUEST, WaportError

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # generated; 24-64 accepted from a user
DEFAULT_EVENTS = (events.MESSAGE, events.RECEIPT, events.SENT, events.SEND_FAILED, events.STATE)
# Delays after the 1st, 2nd, ... failed attempt; the last repeats. About, with jitter (DESIGN.md §10).
SCHEDULE = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0)
JITTER = 0.1
OLD_SECRET_VALID = 24 * 3600.0  # `webhook rotate` keeps the previous secret this long
MAX_URL = 2048
GLOBAL = "*"  # the endpoint row of `webhook_url` in the store: every company without one of its own
# waport_webhook_delivery_seconds (event -> 2xx): the delivery process counts, waportd exports.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0, 21600.0, 86400.0)

# Attempt outcomes (metric label `outcome` of waport_webhook_deliveries_total).
OK, RETRY, DEAD, DISABLED = "ok", "retry", "dead", "disabled"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str, key: str = "webhook_secret") -> bytes:
    """The HMAC key of a `whsec_` secret; a malformed one is refused with the key named."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise WaportError(BAD_REQUEST, f"{key}: must be {SECRET_PREFIX!r} followed by base64 of 24-64 random bytes")
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise WaportError(BAD_REQUEST, f"{key}: the part after {SECRET_PREFIX!r} is not base64") from None
    if not 24 <= len(raw) <= 64:
        raise WaportError(BAD_REQUEST, f"{key}: decodes to {len(raw)} bytes; 24-64 are accepted")
    return raw


def validate_url(url: Any, key: str = "webhook_url") -> str:
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise WaportError(BAD_REQUEST, f"{key}: an http:// or https:// URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise WaportError(BAD_REQUEST, f"{key}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WaportError(BAD_REQUEST, f"{key}: {url!r} is not an http:// or https:// URL with a host")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise WaportError(BAD_REQUEST, f"{key}: no spaces or control characters in a URL")
    return url


def validate_events(value: Any, key: str = "events") -> tuple[str, ...]:
    """A list (or comma-separated string) of §4 event types; empty or absent means the defaults."""
    if value is None or value == "" or value == []:
        return DEFAULT_EVENTS
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise WaportError(BAD_REQUEST, f"{key}: a list of event types")
    wanted = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    unknown = [i for i in wanted if i not in events.TYPES]
    if unknown:
        raise WaportError(BAD_REQUEST, f"{key}: unknown event type {unknown[0]!r}; known: "
                                       f"{', '.join(sorted(events.TYPES))}")
    return wanted or DEFAULT_EVENTS


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,` signature per valid key."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(k, content, hashlib.sha256).digest()).decode() for k in keys)


def event_id(company: str, type_: str, data: dict[str, Any]) -> str:
    """`evt_…`: derived from what makes the event itself (a message's id), so the same inbound message or
    send outcome heard again after a crash is the same event, not a second one; otherwise random."""
    natural = None
    if type_ == events.MESSAGE and isinstance(data.get("id"), str):
        natural = data["id"]
    elif type_ in (events.SENT, events.SEND_FAILED) and isinstance(data.get("message_id"), str):
        natural = data["message_id"]
    if natural is None:
        return "evt_" + secrets.token_hex(12)
    digest = hashlib.sha256(f"{company}\0{type_}\0{natural}".encode()).hexdigest()
    return "evt_" + digest[:24]


def retry_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after `failures` failed ones (1 = the first failure)."""
    base = SCHEDULE[min(max(failures, 1), len(SCHEDULE)) - 1]
    return base * (1 + (rng or random).uniform(-JITTER, JITTER))


@dataclass(frozen=True)
class Verdict:
    """What one attempt's answer means: done, try again (when), or the endpoint is gone."""

    outcome: str  # OK | RETRY | DISABLED
    endpoint_trouble: bool = False  # the endpoint, not this event, failed: pause its other events too
    retry_after: float | None = None  # the receiver said when (429/503 Retry-After)


def judge(status: int | None, retry_after: str | None = None) -> Verdict:
    """`status` None: no answer (connect error, timeout)."""
    if status is not None and 200 <= status < 300:
        return Verdict(OK)
    if status == 410:
        return Verdict(DISABLED, endpoint_trouble=True)
    if status in (429, 503):
        return Verdict(RETRY, endpoint_trouble=True, retry_after=parse_retry_after(retry_after))
    # No answer, a 5xx, or a redirect (not followed: the signature is for this URL): the endpoint is in trouble.
    # Another 4xx is about this event (too large, refused): the next events still go out.
    trouble = status is None or status >= 500 or status < 400
    return Verdict(RETRY, endpoint_trouble=trouble)


def parse_retry_after(value: str | None, now: float | None = None, cap: float = 24 * 3600.0) -> float | None:
    """Seconds from `Retry-After`: delta-seconds or an HTTP date; anything else is ignored."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip()).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)


def bucket_of(seconds: float) -> int:
    """Index into LATENCY_BUCKETS (len(LATENCY_BUCKETS) for +Inf) of the first bound >= seconds."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)
