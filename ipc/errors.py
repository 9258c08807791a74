"""Error codes of the control protocol (DESIGN.md §4) and the exception that carries them."""

from __future__ import annotations

import errno
from typing import Any

BAD_REQUEST = "bad_request"
INVALID_COMPANY_ID = "invalid_company_id"
INVALID_PHONE = "invalid_phone"
UNKNOWN_COMPANY = "unknown_company"
NOT_CONNECTED = "not_connected"
RATE_LIMITED = "rate_limited"
MESSAGE_TOO_LONG = "message_too_long"
TIMEOUT = "timeout"
INTERNAL = "internal"
NOT_IMPLEMENTED = "not_implemented"
CAPACITY = "capacity"  # max_companies reached (DESIGN.md §9: HTTP 409)
# The HTTP API's own (DESIGN.md §9).
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
MEDIA_TOO_LARGE = "media_too_large"
DISK_FULL = "disk_full"  # the state directory's file system is full: nothing was written (HTTP 507)

CODES = frozenset(
    {
        BAD_REQUEST,
        INVALID_COMPANY_ID,
        INVALID_PHONE,
        UNKNOWN_COMPANY,
        NOT_CONNECTED,
        RATE_LIMITED,
        MESSAGE_TOO_LONG,
        TIMEOUT,
        INTERNAL,
        NOT_IMPLEMENTED,
        CAPACITY,
        UNAUTHORIZED,
        FORBIDDEN,
        NOT_FOUND,
        MEDIA_TOO_LARGE,
        DISK_FULL,
    }
)


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(what: str = "nothing was written") -> WaportError:
    """The one wording of a full disk, wherever a write of ours meets it."""
    return WaportError(DISK_FULL, f"the state directory's disk is full: {what}; free space and try again")


class WaportError(Exception):
    """An error that reaches the user as `{"code", "message", ...}`; never a traceback."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.extra}

    @classmethod
    def from_dict(cls, data: Any) -> WaportError:
        if not isinstance(data, dict):
            return cls(INTERNAL, f"malformed error: {data!r}")
        extra = {k: v for k, v in data.items() if k not in ("code", "message")}
        return cls(str(data.get("code", INTERNAL)), str(data.get("message", "")), **extra)
