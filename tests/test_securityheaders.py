"""The security headers of the API process (api/securityheaders.py): pure, no process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

from api.docs import DOCS_HTML
from api.securityheaders import CONSOLE_POLICY, HEADERS, SecurityHeaders, inline_policy, missing


def sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_an_inline_page_gets_exactly_its_own_script_and_style() -> None:
    page = "<style>p{color:red}</style><p>hi</p><script>alert(1)</script>"
    policy = inline_policy(page)
    assert f"script-src 'self' {sha('alert(1)')};" in policy
    assert f"style-src 'self' {sha('p{color:red}')};" in policy
    assert sha("alert(2)") not in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy


def test_the_docs_policy_names_the_docs_script() -> None:
    script = DOCS_HTML.split("<script>", 1)[1].split("</script>", 1)[0]
    assert sha(script) in inline_policy(DOCS_HTML)


def test_a_page_without_inline_code_keeps_the_plain_policy() -> None:
    assert inline_policy("<p>nothing inline</p>") == CONSOLE_POLICY


def test_headers_an_answer_sets_itself_are_kept() -> None:
    own = [(b"Content-Security-Policy", b"default-src 'none'"), (b"content-type", b"text/plain")]
    added = dict(missing(own))
    assert b"content-security-policy" not in added
    assert added[b"x-frame-options"] == b"DENY" and added[b"referrer-policy"] == b"no-referrer"
    assert len(missing([])) == len(HEADERS)


def run(app: Any, scope_type: str = "http") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(SecurityHeaders(app)({"type": scope_type}, receive, send))
    return sent


def test_every_http_answer_gets_them_once_and_its_body_is_untouched() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-content-type-options", b"nosniff")]})
        await send({"type": "http.response.body", "body": b"{}"})

    start, body = run(app)
    names = [name for name, _ in start["headers"]]
    assert names.count(b"x-content-type-options") == 1
    assert set(names) == {k.encode() for k in HEADERS}
    assert body == {"type": "http.response.body", "body": b"{}"}


def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    assert run(app, "lifespan") == [] and seen == ["lifespan"]
