"""Input validation shared by every entry point: reject, never silently sanitize."""

from __future__ import annotations

import math
import re
from typing import Any

from ipc.errors import BAD_REQUEST, INVALID_COMPANY_ID, INVALID_PHONE, MESSAGE_TOO_LONG, WaportError

COMPANY_RE = re.compile(r"[A-Za-z0-9_-]{1,50}")
JID_RE = re.compile(r"[0-9A-Za-z.:_-]{1,64}@(s\.whatsapp\.net|g\.us|lid|broadcast|newsletter)")
MAX_TEXT_CHARS = 65536
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|min|m|h|d)?\s*")


def validate_company(company: object) -> str:
    """Return the company id unchanged, or raise `invalid_company_id`."""
    if not isinstance(company, str) or not COMPANY_RE.fullmatch(company):
        raise WaportError(
            INVALID_COMPANY_ID,
            f"invalid company id {company!r}: use 1-50 characters from A-Z a-z 0-9 _ -",
        )
    return company


def normalize_phone(phone: object) -> str:
    """Digits of a phone number, or a full JID unchanged; else `invalid_phone`.

    Spaces, dashes, parentheses and one leading `+` are removed; 7-15 digits remain.
    """
    if not isinstance(phone, str):
        raise WaportError(INVALID_PHONE, f"invalid phone {phone!r}: expected a string")
    text = phone.strip()
    if "@" in text:
        if JID_RE.fullmatch(text):
            return text
        raise WaportError(INVALID_PHONE, f"invalid JID {mask_phone(text)!r}")
    digits = re.sub(r"[\s\-()]", "", text)
    if digits.startswith("+"):
        digits = digits[1:]
    if not digits.isdigit() or not 7 <= len(digits) <= 15 or not digits.isascii():
        raise WaportError(
            INVALID_PHONE,
            "invalid phone number: expected 7-15 digits (spaces, dashes, parentheses "
            "and one leading + allowed) or a full JID",
        )
    return digits


def validate_text(text: object) -> str:
    if not isinstance(text, str) or not text:
        raise WaportError(BAD_REQUEST, "text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise WaportError(
            MESSAGE_TOO_LONG,
            f"message has {len(text)} characters; the limit is {MAX_TEXT_CHARS}",
            limit=MAX_TEXT_CHARS,
        )
    if not is_utf8(text):
        raise WaportError(BAD_REQUEST, "text is not valid Unicode (it holds a lone surrogate)")
    return text


def is_utf8(text: str) -> bool:
    """Whether `text` can be stored and sent: JSON's `"\\ud800"` escape (or a Redis field read with
    surrogateescape) gives a lone surrogate, which SQLite and every encoder refuse later, in a loop."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "500ms", "5 s", "2m", "12h", "30d"; else ValueError.

    One parser for config durations, `waportctl token create --expires` and the control commands.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration, got {value!r}" if isinstance(value, bool)
                         else f"expected a duration, got a {type(value).__name__}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("must be a finite number of seconds") from None
    else:
        m = _DURATION_RE.fullmatch(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration (examples: 5, \"500ms\", \"2m\", \"12h\", \"30d\")")
        seconds = float(m.group(1)) * DURATION_UNITS[m.group(2) or "s"]
    if seconds < 0:
        raise ValueError("must not be negative")
    if not math.isfinite(seconds):
        raise ValueError("must be a finite number of seconds")
    return seconds


def parse_listen(listen: str, key: str = "listen") -> tuple[str, int]:
    """`host:port` (`[v6]:port`, `:port` = every interface) -> (host, port); ValueError naming `key` if not.

    Shared by `metrics_listen` (the supervisor) and `http_listen` (config check, and the API process).
    """
    host, sep, port = listen.strip().rpartition(":")
    if not sep or not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise ValueError(f"{key} {listen!r}: expected host:port, e.g. 127.0.0.1:9477")
    return host.strip("[]"), int(port)


def mask_phone(phone: str) -> str:
    """Keep a phone number recognisable in logs without writing it in full."""
    user, at, server = phone.partition("@")
    if len(user) <= 4:
        return "*" * len(user) + at + server
    return user[:2] + "*" * (len(user) - 4) + user[-2:] + at + server


PRESENCE_STATES = ("composing", "recording", "paused")
MAX_READ_IDS = 100


def validate_message_ids(value: Any) -> list[str]:
    """1-100 WhatsApp message ids, each 1-128 characters: what one `read` marks."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_READ_IDS or not all(
            isinstance(v, str) and 0 < len(v) <= 128 and v.isprintable() for v in value):
        raise WaportError(BAD_REQUEST, f"message_ids: a list of 1-{MAX_READ_IDS} message ids")
    return list(dict.fromkeys(value))


def validate_presence(value: Any) -> str:
    if value not in PRESENCE_STATES:
        raise WaportError(BAD_REQUEST, f"state: one of {', '.join(PRESENCE_STATES)}")
    return str(value)


PROXY_SCHEMES = ("http", "https", "socks5")


def validate_proxy(value: Any, name: str = "proxy") -> str:
    """An `http://`, `https://` or `socks5://` URL with a host and a port ("" for none)."""
    from urllib.parse import urlsplit

    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > 2048 or any(c.isspace() for c in value):
        raise WaportError(BAD_REQUEST, f"{name}: a URL such as socks5://proxy.internal:1080")
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:
        raise WaportError(BAD_REQUEST, f"{name}: not a URL (a bad port?)") from None
    if url.scheme not in PROXY_SCHEMES or not url.hostname or port is None:
        raise WaportError(BAD_REQUEST, f"{name}: {'/'.join(PROXY_SCHEMES)}://HOST:PORT, with a port")
    return value


def mask_url(url: str) -> str:
    """A URL with its password hidden, for logs and listings."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"
