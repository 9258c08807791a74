"""Security headers on every answer of the API process (DESIGN.md §13): the console is a page that
holds a token, so no other site may frame it, no script may come from anywhere but this server,
and no answer may be sniffed into something it is not.

An ASGI wrapper outside everything (the send fast path included), adding headers an answer does not
set itself: a page with inline code (`/docs`) sets its own policy, from `inline_policy`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

CONSOLE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                  "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                  "frame-ancestors 'none'")
HEADERS = {
    "content-security-policy": CONSOLE_POLICY,
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cross-origin-opener-policy": "same-origin",
}
ASGIApp = Any


def inline_policy(html: str) -> str:
    """The policy of a page whose scripts and styles are inline: exactly those, by their SHA-256, and
    nothing else (an injected `<script>` has another hash and does not run)."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in bodies)

    policy = CONSOLE_POLICY.replace("script-src 'self'", f"script-src 'self' {hashes('script')}".rstrip())
    return policy.replace("style-src 'self'", f"style-src 'self' {hashes('style')}".rstrip())


def missing(headers: list[tuple[bytes, bytes]], wanted: dict[str, str] = HEADERS) -> list[tuple[bytes, bytes]]:
    """The security headers an answer lacks (one it sets itself wins)."""
    present = {name.lower() for name, _ in headers}
    return [(k.encode(), v.encode()) for k, v in wanted.items() if k.encode() not in present]


class SecurityHeaders:
    """Adds the headers to every HTTP answer of `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                message = {**message, "headers": headers + missing(headers)}
            await send(message)

        await self.app(scope, receive, send_with_headers)
