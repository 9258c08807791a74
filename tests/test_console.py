"""The operator console (DESIGN.md §13) in a real browser: Debian's chromium, headless, driven by Playwright,
against a real waportd serving the HTTP API and a real simulated network without auto-pair.

What an operator does and sees: sign in with a token, the sessions table, a new company's QR code (the
same image the API serves for the code waiting), a scan through the simulated network turning the row
`connected` without a reload, the buttons, a company token seeing one company, a wrong token refused, markup
in a push name shown as text, the event stream coming back by itself after the API process died. Every wait
is Playwright's `expect` or `wait_for` (polls with deadlines). Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import TESTS, Daemon, SimNetProcess, WebhookReceiver, api_pid, free_port, wait_for
from playwright.sync_api import expect, sync_playwright  # the test extra; its browser download is never used

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
# Never `playwright install`: the browser is Debian's (.ci/install-system-deps).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(TESTS, "artifacts")
WAIT_MS = 20_000
EVIL_NAME = "<script>window.__pwned = 1</script><b>Eve</b>"
EVIL_TEXT = '<img src=x onerror="window.__pwned = 2">is 10:00 free?'
# Watches the page from before its first script: CSP refusals, and markup that ran.
WATCH = """window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.__violations.push(
  `${e.violatedDirective} ${e.blockedURI}`));"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Site:
    """waportd with `http_listen`, its standalone network (manual pairing), and an admin HTTP client."""

    def __init__(self, d: Daemon, net: SimNetProcess) -> None:
        self.d, self.net = d, net
        self.url = f"http://{d.config['http_listen']}"
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(15.0, read=75.0))
        wait_for(self.healthy, timeout=20, what="GET /v1/health to answer 200")
        self.admin = d.ctl("token_create")["token"]

    def healthy(self) -> bool:
        try:
            return self.http.get("/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    def call(self, method: str, path: str, token: str | None = None, headers: dict[str, str] | None = None,
             **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, headers={**bearer(token or self.admin), **(headers or {})}, **kwargs)

    def record(self, company: str) -> dict[str, Any]:
        r = self.call("GET", f"/v1/sessions/{company}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_state(self, company: str, state: str) -> dict[str, Any]:
        return wait_for(lambda: (r := self.record(company))["state"] == state and r, timeout=20,
                        what=f"{company} to be {state}")

    def waiting_code(self, company: str) -> str | None:
        r = self.call("GET", f"/v1/sessions/{company}/qr")
        return r.json()["code"] if r.status_code == 200 else None

    def link(self, company: str, phone: str) -> None:
        """Create a company and pair it as its phone would (outside the console)."""
        assert self.call("PUT", f"/v1/sessions/{company}").status_code == 201
        code = wait_for(lambda: self.waiting_code(company), timeout=20, what=f"{company}'s QR code")
        self.net.call("scan", qr=code, phone=phone)
        self.wait_state(company, "connected")

    def api_pid(self) -> int | None:
        return api_pid(self.d)


@pytest.fixture
def site(daemon_factory: Callable[..., Daemon], short_tmp: str) -> Iterator[Site]:
    net = SimNetProcess(short_tmp, auto_pair=False)
    try:
        d = daemon_factory(sim_endpoint=net.endpoint, http_listen=f"127.0.0.1:{free_port()}").start()
        s = Site(d, net)
        yield s
        s.http.close()
        d.cleanup()  # the daemon (its API and workers with it) before its network
    finally:
        net.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("chromium is not installed: run .ci/install-system-deps")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """One browser tab on the console, keeping every URL it requested and every console error."""

    def __init__(self, browser: Any, site: Site, width: int = 1100, height: int = 900) -> None:
        self.site = site
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.add_init_script(WATCH)
        self.page = self.context.new_page()
        self.requested: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("dialog", lambda dialog: dialog.accept())  # "Log out acme?"
        self.page.goto(site.url + "/console")

    def sign_in(self, token: str) -> None:
        self.page.fill("#token", token)
        self.page.get_by_role("button", name="Sign in with this token").click()

    def cell(self, company: str, field: str) -> Any:
        return self.page.locator(f'tr[data-company="{company}"] [data-field="{field}"]')

    def button(self, name: str) -> Any:
        return self.page.get_by_role("button", name=name, exact=True)

    def shot(self, name: str) -> None:
        os.makedirs(ARTIFACTS, exist_ok=True)
        self.page.screenshot(path=os.path.join(ARTIFACTS, f"console-{name}.png"), full_page=True)

    def qr_png(self) -> bytes:
        """The QR image the page shows, as PNG bytes (drawn on a canvas: the page's own pixels)."""
        url = self.page.evaluate("""() => {
            const img = document.getElementById("qr");
            const c = document.createElement("canvas");
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            c.getContext("2d").drawImage(img, 0, 0);
            return c.toDataURL("image/png");
        }""")
        return base64.b64decode(url.split(",", 1)[1])

    def assert_clean(self) -> None:
        """Nothing came from elsewhere, the policy refused nothing, no markup of ours ran."""
        foreign = [u for u in self.requested if not u.startswith((self.site.url + "/", "blob:", "data:"))]
        assert not foreign, foreign
        assert self.page.evaluate("window.__violations") == [], self.page.evaluate("window.__violations")
        assert self.page.evaluate("window.__pwned") is None
        csp = [e for e in self.errors if "Content Security Policy" in e]
        assert not csp, csp

    def close(self) -> None:
        self.context.close()


def same_pixels(a: bytes, b: bytes) -> bool:
    from PIL import Image

    first, second = Image.open(io.BytesIO(a)).convert("L"), Image.open(io.BytesIO(b)).convert("L")
    return first.size == second.size and first.tobytes() == second.tobytes()


# ---------------------------------------------------------------- 1. linking a phone, running a company


def test_an_operator_links_a_phone_and_runs_the_company_from_the_console(site: Site, browser: Any,
                                                                        receiver: WebhookReceiver) -> None:
    site.link("bistro", "15550102222")
    tab = Tab(browser, site)
    page = tab.page
    expect(page.locator("#login")).to_be_visible()
    tab.sign_in(site.admin)
    expect(tab.cell("bistro", "state")).to_have_text("connected", timeout=WAIT_MS)
    expect(tab.cell("bistro", "phone")).to_have_text("15550102222")
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.length") == 1 and page.evaluate("document.cookie") == ""
    assert site.admin not in page.url
    page.evaluate("window.__same_page = true")  # gone if anything reloads the page

    # A new company: its QR code shows, the very image the API serves for the code waiting.
    page.fill("#new-company", "acme")
    page.get_by_role("button", name="Create and start the session of this company").click()
    expect(tab.cell("acme", "state")).to_have_text("pairing", timeout=WAIT_MS)
    expect(page.locator("#detail-title")).to_have_text("acme")
    qr = page.get_by_role("img", name="QR code to link a phone to acme")
    expect(qr).to_be_visible(timeout=WAIT_MS)
    assert qr.get_attribute("src").startswith("blob:")
    code = site.waiting_code("acme")
    assert code and code.startswith("SIMQR:")
    served = site.call("GET", "/v1/sessions/acme/qr", headers={"Accept": "image/png"})
    wait_for(lambda: same_pixels(tab.qr_png(), served.content), timeout=10,
             what="the page's QR image to be the API's image of the waiting code")
    tab.shot("pairing")

    # The phone scans it: the row turns connected by itself.
    site.net.call("scan", qr=code, phone="15550107777")
    expect(tab.cell("acme", "state")).to_have_text("connected", timeout=WAIT_MS)
    expect(tab.cell("acme", "phone")).to_have_text("15550107777", timeout=WAIT_MS)
    expect(qr).to_be_hidden()
    assert page.evaluate("window.__same_page") is True
    expect(page.locator("#webhook")).to_contain_text("No webhook endpoint")

    # Stop and start with the buttons: the API agrees with what the page shows.
    tab.button("Stop acme").click()
    expect(tab.cell("acme", "state")).to_have_text("stopped", timeout=WAIT_MS)
    assert site.record("acme")["state"] == "stopped"
    expect(tab.button("Stop acme")).to_be_disabled()
    tab.button("Start acme").click()
    expect(tab.cell("acme", "state")).to_have_text("connected", timeout=WAIT_MS)
    assert site.record("acme")["state"] == "connected"

    r = site.call("PUT", "/v1/sessions/acme/webhook", json={"url": receiver.url("acme"), "events": ["message"]})
    assert r.status_code == 201, r.text
    receiver.secrets("acme", r.json()["secret"])

    # Messages: counted live, listed in the detail, markup in a push name or a text shown as text.
    site.net.call("inbound", company="acme", **{"from": "15550109999"}, text=EVIL_TEXT, push_name=EVIL_NAME)
    expect(tab.cell("acme", "messages")).to_have_text("1 / 0", timeout=WAIT_MS)
    item = page.locator('#messages li[data-direction="in"]')
    expect(item).to_have_count(1, timeout=WAIT_MS)
    expect(item).to_contain_text(EVIL_NAME)
    expect(item).to_contain_text(EVIL_TEXT)
    assert page.locator("#messages script, #messages img, #messages b").count() == 0
    r = site.call("POST", "/v1/sessions/acme/messages", json={"to": "+1 555 010 9999", "text": "yes, 10:00 is free"})
    assert r.status_code == 202, r.text
    expect(tab.cell("acme", "messages")).to_have_text("1 / 1", timeout=WAIT_MS)
    expect(page.locator('#messages li[data-direction="out"]')).to_contain_text("yes, 10:00 is free",
                                                                               timeout=WAIT_MS)
    # The webhook's status: its endpoint, and the inbound message delivered to it.
    expect(page.locator('#webhook [data-field="url"]')).to_have_text(receiver.url("acme"), timeout=WAIT_MS)
    expect(page.locator('#webhook [data-field="delivered"]')).to_have_text("1", timeout=WAIT_MS)
    assert len(receiver.delivered("acme")) == 1
    tab.shot("connected")

    # Restart, then log out (the page asks first; the tab accepts): the device is unlinked.
    tab.button("Restart acme").click()
    expect(page.locator("#d-result")).to_have_text("restart: done", timeout=WAIT_MS)
    expect(tab.cell("acme", "state")).to_have_text("connected", timeout=WAIT_MS)
    tab.button("Log out acme").click()
    expect(tab.cell("acme", "state")).to_have_text("logged_out", timeout=WAIT_MS)
    assert site.record("acme")["state"] == "logged_out"
    assert page.evaluate("window.__same_page") is True
    tab.assert_clean()
    tab.close()


# ---------------------------------------------------------------- 2. who sees what


def test_a_company_token_sees_one_company_and_a_wrong_token_is_refused(site: Site, browser: Any) -> None:
    site.link("acme", "15550101111")
    site.link("bistro", "15550102222")
    tab = Tab(browser, site)
    page = tab.page

    tab.sign_in("wp_" + "x" * 43)
    expect(page.locator("#login-error")).to_contain_text("refused", timeout=WAIT_MS)
    expect(page.locator("#console")).to_be_hidden()
    expect(page.locator("#token")).to_have_value("")
    assert page.evaluate("sessionStorage.length") == 0
    tab.shot("refused")

    scoped = site.d.ctl("token_create", company="acme")["token"]
    tab.sign_in(scoped)
    expect(tab.cell("acme", "state")).to_have_text("connected", timeout=WAIT_MS)
    expect(page.locator("#sessions tbody tr")).to_have_count(1)
    expect(page.locator("#detail-title")).to_have_text("acme")  # the one company, opened at once
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    # bistro's life does not reach this tab; acme's does.
    site.net.call("inbound", company="bistro", **{"from": "15550109999"}, text="for bistro")
    site.net.call("inbound", company="acme", **{"from": "15550109999"}, text="for acme")
    expect(tab.cell("acme", "messages")).to_have_text("1 / 0", timeout=WAIT_MS)
    expect(page.locator('tr[data-company="bistro"]')).to_have_count(0)
    expect(page.locator('#messages li[data-direction="in"]')).to_contain_text("for acme", timeout=WAIT_MS)
    assert "for bistro" not in page.content()
    # The page has no powers beyond the token's: the same request from it is refused by the API.
    status = page.evaluate("""async (token) => (await fetch("/v1/sessions/bistro",
        {headers: {Authorization: "Bearer " + token}})).status""", scoped)
    assert status == 403
    tab.shot("company-token")

    # The token lives in this tab: a reload keeps it, another tab has to sign in.
    page.reload()
    expect(tab.cell("acme", "state")).to_have_text("connected", timeout=WAIT_MS)
    other = tab.context.new_page()
    other.goto(site.url + "/console")
    expect(other.locator("#login")).to_be_visible()
    other.close()
    # Revoked while open: the next answer is a 401 and the page forgets the token.
    site.d.ctl("token_revoke", id=next(t["id"] for t in site.d.ctl("token_list")["tokens"] if t["company"]))
    tab.button("Restart acme").click()
    expect(page.locator("#login-error")).to_contain_text("refused", timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.length") == 0
    tab.assert_clean()
    tab.close()


# ---------------------------------------------------------------- 3. live, also across a dead API


def test_the_event_stream_comes_back_by_itself_after_the_api_process_died(site: Site, browser: Any) -> None:
    site.link("acme", "15550101111")
    tab = Tab(browser, site)
    page = tab.page
    tab.sign_in(site.admin)
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    page.evaluate("window.__same_page = true")

    old = site.api_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    expect(page.locator("#live")).to_have_text("reconnecting…", timeout=WAIT_MS)
    wait_for(lambda: (pid := site.api_pid()) not in (None, old) and pid, timeout=20,
             what="waportd to start the API again")
    expect(page.locator("#live")).to_have_text("live", timeout=30_000)
    # Only the event stream says this: a message counted live after the reconnect.
    site.net.call("inbound", company="acme", **{"from": "15550109999"}, text="still there?")
    expect(tab.cell("acme", "messages")).to_have_text("1 / 0", timeout=WAIT_MS)
    assert page.evaluate("window.__same_page") is True
    tab.assert_clean()
    tab.close()


# ---------------------------------------------------------------- 4. small screens, headers, /docs


def test_a_400_pixel_window_and_the_security_headers(site: Site, browser: Any) -> None:
    site.link("salon_with_a_rather_long_company_name_42", "15550101111")
    assert site.call("PUT", "/v1/sessions/acme").status_code == 201
    tab = Tab(browser, site, width=400, height=800)
    page = tab.page
    tab.sign_in(site.admin)
    expect(tab.cell("acme", "state")).to_have_text("pairing", timeout=WAIT_MS)
    page.get_by_role("button", name="Open acme").click()
    expect(page.get_by_role("img", name="QR code to link a phone to acme")).to_be_visible(timeout=WAIT_MS)
    for name in ("Stop acme", "Restart acme", "Log out acme", "Get a pairing code for this phone number"):
        expect(tab.button(name)).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 400, "the page is wider than the window"
    page.fill("#pair-phone", "+1 555 010 0001")
    tab.button("Get a pairing code for this phone number").click()
    expect(page.locator("#pair-code")).to_have_text(re.compile(r"^SIMPC-\d{4}-\d{4}$"), timeout=WAIT_MS)
    code = page.locator("#pair-code").inner_text()
    site.net.call("scan", qr=code)
    expect(tab.cell("acme", "state")).to_have_text("connected", timeout=WAIT_MS)
    tab.shot("narrow")
    tab.assert_clean()

    # Every answer carries the headers: the page, its assets, the API's JSON, the send fast path, errors.
    want = {"x-frame-options": "DENY", "referrer-policy": "no-referrer", "x-content-type-options": "nosniff"}
    answers = {
        "/console": site.http.get("/console"),
        "/console/console.js": site.http.get("/console/console.js"),
        "/console/console.css": site.http.get("/console/console.css"),
        "/v1/sessions": site.call("GET", "/v1/sessions"),
        "401": site.http.get("/v1/sessions"),
        "404": site.http.get("/nothing/here"),
        "send": site.call("POST", "/v1/sessions/acme/messages", json={"to": "+1 555 010 9999", "text": "hi"}),
    }
    for what, r in answers.items():
        for name, value in want.items():
            assert r.headers.get(name) == value, (what, dict(r.headers))
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp, csp
    assert answers["/console"].headers["content-type"].startswith("text/html")
    assert answers["/console/console.js"].headers["content-type"].startswith("text/javascript")
    assert answers["/console/console.css"].headers["content-type"].startswith("text/css")
    assert answers["send"].status_code == 202 and answers["401"].status_code == 401
    etag = answers["/console/console.js"].headers["etag"]
    assert site.http.get("/console/console.js", headers={"If-None-Match": etag}).status_code == 304
    assert "<script>" not in answers["/console"].text and " style=" not in answers["/console"].text
    assert "http://" not in answers["/console"].text and "https://" not in answers["/console"].text

    # /docs keeps working under a policy of its own (its inline script allowed by its hash).
    docs = site.http.get("/docs")
    assert "'sha256-" in docs.headers["content-security-policy"], docs.headers
    assert "unsafe-inline" not in docs.headers["content-security-policy"]
    page.goto(site.url + "/docs")
    expect(page.locator(".op").first).to_be_visible(timeout=WAIT_MS)
    tab.assert_clean()
    tab.close()
