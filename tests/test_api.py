"""The HTTP API (DESIGN.md §9) as its users meet it: a real waportd running the API as its child process
on a TCP port, a real simulated network, real HTTP requests (httpx) and a real SSE client.

Every wait is a poll with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from conftest import Daemon, SimNetProcess, WebhookReceiver, api_pid, free_port, wait_for

pytestmark = pytest.mark.e2e

PHONE = "15550100001"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATES = {"stopped", "starting", "pairing", "connecting", "connected", "disconnected", "backoff", "stopping",
          "failed", "logged_out", "replaced", "banned", "outdated"}


# ---------------------------------------------------------------- a daemon with its HTTP API


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Api:
    """A waportd with `http_listen` set, its simulated network, and an HTTP client holding an admin token."""

    def __init__(self, d: Daemon, net: SimNetProcess) -> None:
        self.d = d
        self.net = net
        self.url = f"http://{d.config['http_listen']}"
        # Lifecycle routes may wait on a worker (stop_timeout, SIGKILL): the read timeout leaves them room.
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(15.0, read=75.0))
        wait_for(self.healthy, timeout=20, what="GET /v1/health to answer 200")
        self.admin = d.ctl("token_create")
        self.auth = bearer(self.admin["token"])

    def healthy(self) -> bool:
        try:
            return self.client.get("/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, path, headers={**self.auth, **(headers or {})}, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def send(self, company: str, text: str, to: str = PHONE, **kwargs: Any) -> httpx.Response:
        return self.post(f"/v1/sessions/{company}/messages", json={"to": to, "text": text}, **kwargs)

    def record(self, company: str) -> dict[str, Any]:
        r = self.get(f"/v1/sessions/{company}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_state(self, company: str, *states: str, timeout: float = 15) -> dict[str, Any]:
        return wait_for(lambda: (r := self.record(company))["state"] in states and r, timeout=timeout,
                        what=f"GET /v1/sessions/{company} to say {states}")

    def create(self, *companies: str) -> None:
        """PUT each company and wait until it is connected."""
        for company in companies:
            r = self.put(f"/v1/sessions/{company}")
            assert r.status_code == 201, r.text
        for company in companies:
            self.wait_state(company, "connected")

    def wait_message(self, company: str, message_id: str, status: str = "sent") -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            r = self.get(f"/v1/sessions/{company}/messages/{message_id}")
            assert r.status_code == 200, r.text
            return r.json() if r.json()["status"] == status else None

        return wait_for(done, timeout=15, what=f"message {message_id} to be {status}")

    def network_got(self, company: str) -> list[str]:
        """The texts the simulated network received from `company`, in order."""
        return [m["text"] for m in self.net.call("sent", company=company)["messages"]]

    def api_pid(self) -> int | None:
        return api_pid(self.d)

    def full_log(self) -> str:
        """waportd's log with its children's (the API's included): all of it, not a tail."""
        with open(self.d.log_path, errors="replace") as fh:
            return fh.read()

    def metric(self, name: str) -> float:
        samples = [s for s in self.d.ctl("metrics")["metrics"] if s["name"] == name]
        assert samples, f"no metric {name}"
        return sum(s["value"] for s in samples)


@pytest.fixture
def api_factory(daemon_factory: Callable[..., Daemon], short_tmp: str) -> Iterator[Callable[..., Api]]:
    """`make(auto_pair=True, **config)`: a standalone simulated network, and a daemon (config on top of the
    test defaults) serving the HTTP API on a free port, answering GET /v1/health, with an admin token."""
    made: list[Api] = []
    nets: list[SimNetProcess] = []

    def make(auto_pair: bool = True, **config: Any) -> Api:
        net = SimNetProcess(short_tmp, auto_pair=auto_pair)
        nets.append(net)
        d = daemon_factory(sim_endpoint=net.endpoint, http_listen=f"127.0.0.1:{free_port()}", **config).start()
        api = Api(d, net)
        made.append(api)
        return api

    yield make
    for api in made:
        api.client.close()
        api.d.cleanup()  # the daemon (and with it the API and the workers) before its network
    for net in nets:
        net.stop()


@pytest.fixture
def api(api_factory: Callable[..., Api]) -> Api:
    return api_factory()


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The §9 error body of a response that must have `status` and `code`; never a traceback."""
    assert r.status_code == status, f"expected {status} {code}, got {r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


# ---------------------------------------------------------------- 1. what a user runs


def test_a_session_over_http_from_creation_to_deletion(api: Api) -> None:
    r = api.put("/v1/sessions/acme")
    assert r.status_code == 201, r.text
    assert r.json()["company"] == "acme" and r.json()["state"] in STATES
    r = api.put("/v1/sessions/acme")
    assert r.status_code == 200, r.text  # known: started (again), not created
    record = api.wait_state("acme", "connected")
    assert record["phone"] and record["pid"]
    assert [s["company"] for s in api.get("/v1/sessions").json()["sessions"]] == ["acme"]

    r = api.send("acme", "hello over http", to="+1 555 010 0001")
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"message_id", "status"}
    assert r.json()["status"] in ("queued", "sending", "sent")
    hello = r.json()["message_id"]

    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    first = api.send("acme", "your order has shipped", headers=key)
    again = api.send("acme", "your order has shipped", headers=key)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert first.json()["message_id"] == again.json()["message_id"]
    shipped = first.json()["message_id"]
    assert shipped != hello

    for message_id in (hello, shipped):
        message = api.wait_message("acme", message_id, "sent")
        assert message["message_id"] == message_id and message["direction"] == "out"
    got = api.network_got("acme")
    assert got.count("hello over http") == 1 and got.count("your order has shipped") == 1, got
    assert api.net.call("sent", company="acme")["messages"][0]["to"].startswith(PHONE)

    listing = api.get("/v1/sessions/acme/messages", params={"limit": 5})
    assert listing.status_code == 200, listing.text
    outbound = listing.json()["outbound"]
    assert 2 <= len(outbound) <= 5 and {hello, shipped} <= {m["message_id"] for m in outbound}, outbound
    assert len(api.get("/v1/sessions/acme/messages", params={"limit": 1}).json()["outbound"]) == 1

    r = api.post("/v1/sessions/acme/stop")
    assert r.status_code == 200 and r.json()["state"] == "stopped" and r.json()["pid"] is None, r.text
    assert api.record("acme")["state"] == "stopped"
    r = api.post("/v1/sessions/acme/start")
    assert r.status_code == 200 and r.json()["state"] != "stopped", r.text
    api.wait_state("acme", "connected")
    r = api.get("/v1/sessions/acme/diagnose")
    assert r.status_code == 200 and r.json()["company"] == "acme", r.text

    r = api.delete("/v1/sessions/acme")
    assert r.status_code == 200 and r.json() == {"company": "acme", "deleted": True}, r.text
    error_of(api.get("/v1/sessions/acme"), 404, "unknown_company")
    error_of(api.post("/v1/sessions/acme/start"), 404, "unknown_company")  # start acts on known ones; PUT creates
    assert api.get("/v1/sessions").json() == {"sessions": []}


# ---------------------------------------------------------------- 2. pairing


def png_modules(png: bytes, expected: list[list[bool]]) -> list[list[bool]]:
    """The dark/light modules read back from a QR PNG (Pillow: a real image decoder), on the grid of
    `expected` (the module matrix the code should have)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    image = image.convert("L")
    width, height = image.size
    assert width == height, image.size
    size = len(expected)
    # The quiet zone is light and as wide on every side: the symbol is the dark bounding box.
    left, top, right, bottom = image.point(lambda v: 255 if v < 128 else 0).getbbox()
    assert (right - left) == (bottom - top) and (right - left) % size == 0, (left, top, right, bottom, size)
    scale = (right - left) // size
    return [[image.getpixel((left + x * scale + scale // 2, top + y * scale + scale // 2)) < 128
             for x in range(size)] for y in range(size)]


def assert_qr_png_of(png: bytes, code: str) -> None:
    """The PNG is a QR code of `code`: decoded if a QR decoder is installed, else its modules read back
    with Pillow (an image decoder) and held to the QR matrix of `code`; with neither, only the header."""
    decoded = decode_qr_png(png)
    if decoded is not None:
        assert decoded == code
        return
    try:
        import PIL  # noqa: F401
        import segno
    except ImportError:
        return
    expected = [[bool(v) for v in row] for row in segno.make(code, error="m").matrix]
    assert png_modules(png, expected) == expected


def decode_qr_png(png: bytes) -> str | None:
    """The text in a QR image, if a QR decoder is installed (zbarimg or pyzbar); else None."""
    try:
        from PIL import Image
        from pyzbar.pyzbar import decode  # type: ignore[import-not-found]

        return decode(Image.open(io.BytesIO(png)))[0].data.decode()
    except ImportError:
        pass
    exe = shutil.which("zbarimg")
    if exe is None:
        return None
    out = subprocess.run([exe, "--quiet", "--raw", "-"], input=png, capture_output=True, timeout=30, check=True)
    return out.stdout.decode().strip()


def test_pairing_by_qr_code_and_by_pairing_code(api_factory: Callable[..., Api]) -> None:
    api = api_factory(auto_pair=False)
    assert api.put("/v1/sessions/acme").status_code == 201

    def waiting_code() -> str | None:
        r = api.get("/v1/sessions/acme/qr")
        if r.status_code == 404:
            error_of(r, 404, "not_found")  # not pairing yet
            return None
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
        return r.json()["code"]

    code = wait_for(waiting_code, timeout=15, what="GET .../qr to answer a code")
    assert code.startswith("SIMQR:")
    assert api.record("acme")["state"] == "pairing"

    r = api.get("/v1/sessions/acme/qr", headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.headers
    png = r.content
    assert png[:8] == PNG_MAGIC and len(png) > 100
    assert waiting_code() == code  # the image is of the code still waiting
    assert_qr_png_of(png, code)

    scanned = api.net.call("scan", qr=code, phone="15550107777")
    assert scanned["company"] == "acme"
    assert api.wait_state("acme", "connected")["phone"] == "15550107777"
    error_of(api.get("/v1/sessions/acme/qr"), 404, "not_found")
    error_of(api.get("/v1/sessions/acme/qr", headers={"Accept": "image/png"}), 404, "not_found")

    # Pairing by phone number: a code to type on the phone, while the company pairs.
    assert api.put("/v1/sessions/bistro").status_code == 201
    wait_for(lambda: api.get("/v1/sessions/bistro/qr").status_code == 200, timeout=15, what="bistro pairing")
    error_of(api.post("/v1/sessions/bistro/pairing-code", json={"phone": "12"}), 400, "invalid_phone")
    error_of(api.post("/v1/sessions/bistro/pairing-code", json={"phone": 15550100001}), 400, "invalid_phone")
    r = api.post("/v1/sessions/bistro/pairing-code", json={"phone": "+1 555 010 0001"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"code"} and isinstance(r.json()["code"], str) and r.json()["code"]
    api.net.call("scan", qr=r.json()["code"])
    assert api.wait_state("bistro", "connected")["phone"]


# ---------------------------------------------------------------- 3. auth


def test_tokens_admit_whom_they_should_and_no_one_else(api: Api) -> None:
    api.create("acme", "bistro")
    unauthorized = [
        api.client.get("/v1/sessions"),
        api.client.get("/v1/sessions", headers={"Authorization": "Bearer wp_" + "x" * 43}),
        api.client.get("/v1/sessions", headers={"Authorization": "Bearer"}),
        api.client.get("/v1/sessions", headers={"Authorization": "Basic " + api.admin["token"]}),
        api.client.get("/v1/sessions", headers={"Authorization": api.admin["token"]}),
        api.client.get("/v1/sessions", headers={"Authorization": "Bearer " + "wp_" + "y" * 5000}),
        api.client.post("/v1/sessions/acme/messages", json={"to": PHONE, "text": "x"}),
        api.client.get("/v1/events"),
    ]
    for r in unauthorized:
        error_of(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].lower().startswith("bearer"), r.headers
    assert api.network_got("acme") == []  # the unauthorized send sent nothing

    # A token that worked stops working when revoked.
    doomed = api.d.ctl("token_create")
    assert api.client.get("/v1/sessions", headers=bearer(doomed["token"])).status_code == 200
    api.d.ctl("token_revoke", id=doomed["id"])
    wait_for(lambda: api.client.get("/v1/sessions", headers=bearer(doomed["token"])).status_code == 401,
             timeout=10, what="a revoked token to be refused")
    error_of(api.client.get("/v1/sessions", headers=bearer(doomed["token"])), 401, "unauthorized")

    # ... and when it expires (one that has not yet works).
    lasting = api.d.ctl("token_create", expires="1h")
    assert api.client.get("/v1/sessions", headers=bearer(lasting["token"])).status_code == 200
    brief = api.d.ctl("token_create", expires="1s")
    assert brief["expires_at"] is not None
    wait_for(lambda: api.client.get("/v1/sessions", headers=bearer(brief["token"])).status_code == 401,
             timeout=10, what="an expired token to be refused")
    error_of(api.client.get("/v1/sessions", headers=bearer(brief["token"])), 401, "unauthorized")

    # A company token sees and acts on its company only.
    acme = api.d.ctl("token_create", company="acme")
    assert acme["company"] == "acme"
    mine = bearer(acme["token"])
    r = api.client.get("/v1/sessions", headers=mine)
    assert r.status_code == 200 and [s["company"] for s in r.json()["sessions"]] == ["acme"], r.text
    assert api.client.get("/v1/sessions/acme", headers=mine).status_code == 200
    r = api.client.post("/v1/sessions/acme/messages", headers=mine, json={"to": PHONE, "text": "from acme's token"})
    assert r.status_code == 202, r.text
    forbidden = [
        api.client.get("/v1/sessions/bistro", headers=mine),
        api.client.put("/v1/sessions/bistro", headers=mine),
        api.client.put("/v1/sessions/otherco", headers=mine),
        api.client.delete("/v1/sessions/bistro", headers=mine),
        api.client.post("/v1/sessions/bistro/stop", headers=mine),
        api.client.post("/v1/sessions/bistro/messages", headers=mine, json={"to": PHONE, "text": "not mine"}),
        api.client.get("/v1/sessions/bistro/messages", headers=mine),
        api.client.get("/v1/sessions/bistro/qr", headers=mine),
        api.client.get("/v1/events", params={"company": "bistro"}, headers=mine),
    ]
    for r in forbidden:
        error_of(r, 403, "forbidden")
    assert api.record("bistro")["state"] == "connected"  # untouched
    # A company token may be made before its company, and creates it.
    newco = bearer(api.d.ctl("token_create", company="newco")["token"])
    assert api.client.put("/v1/sessions/newco", headers=newco).status_code == 201
    error_of(api.client.get("/v1/sessions/acme", headers=newco), 403, "forbidden")
    assert api.network_got("bistro") == []
    error_of(api.get("/v1/sessions/otherco"), 404, "unknown_company")  # the refused PUT created nothing

    # What holds no data needs no token.
    r = api.client.get("/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    r = api.client.get("/v1/openapi.json")
    assert r.status_code == 200 and r.json()["openapi"].startswith("3.1"), r.text[:200]
    r = api.client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text  # loads nothing from the internet

    # The store keeps hashes, and no token ever reaches a log.
    store_path = os.path.join(api.d.state_dir, "api-tokens.json")
    assert os.stat(store_path).st_mode & 0o777 == 0o600
    with open(store_path) as fh:
        store = fh.read()
    log = api.full_log()
    assert "api[" in log  # the API's own lines are in this log
    for token in (api.admin, doomed, lasting, brief, acme):
        assert token["token"] not in store
        assert token["token"] not in log, f"token {token['id']} in the log"
        assert token["token"][3:] not in log

    # A damaged token file fails closed: no token works (500, naming no path), until it is repaired.
    with open(store_path, "w") as fh:
        fh.write('{"format": 1, "tokens": [')
    wait_for(lambda: api.get("/v1/sessions").status_code == 500, timeout=10, what="the damaged store to be noticed")
    error = error_of(api.get("/v1/sessions"), 500, "internal")
    assert store_path not in error["message"]
    assert api.client.get("/v1/health").status_code == 200  # holds no data: no token to check
    with open(store_path, "w") as fh:
        fh.write(store)
    wait_for(lambda: api.get("/v1/sessions").status_code == 200, timeout=10, what="the repaired store to be read")


# ---------------------------------------------------------------- 4. errors


def test_every_error_has_its_status_and_body_and_nothing_breaks(api_factory: Callable[..., Api]) -> None:
    api = api_factory(max_companies=1, rate_limit_max=2)
    api.create("acme")
    send = "/v1/sessions/acme/messages"

    for company in ("bad..id", "ação", "a" * 51, "sp ace", "semi;colon", "%00", "%F0%9F%98%80"):
        for method, path in (("GET", ""), ("PUT", ""), ("DELETE", ""), ("POST", "/stop"), ("GET", "/qr"),
                             ("POST", "/messages")):
            r = api.request(method, f"/v1/sessions/{company}{path}", json={"to": PHONE, "text": "x"})
            error_of(r, 400, "invalid_company_id")
    error_of(api.get("/v1/events", params={"company": "bad..id"}), 400, "invalid_company_id")

    error_of(api.post(send, json={"to": "12", "text": "x"}), 400, "invalid_phone")
    error_of(api.post(send, json={"to": "1555010000112345678", "text": "x"}), 400, "invalid_phone")
    # A `to` of the wrong type is refused as a phone number (as on the control socket): 400 either way.
    for to in (5, None, ["15550100001"], {"phone": PHONE}):
        r = api.post(send, json={"to": to, "text": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] in ("bad_request", "invalid_phone"), r.text
    r = api.post(send)  # no body at all
    assert r.status_code == 400 and r.json()["error"]["code"] in ("bad_request", "invalid_phone"), r.text
    error_of(api.post(send, json={"to": PHONE, "text": "x" * 65_537}), 400, "message_too_long")
    bad_bodies: list[dict[str, Any]] = [
        {"content": b"not json", "headers": {"Content-Type": "application/json"}},
        {"content": b'{"to": "15550100001", "text": "x"', "headers": {"Content-Type": "application/json"}},
        {"json": [{"to": PHONE, "text": "x"}]},
        {"json": "a string"},
        {"content": b"null"},
        {"content": b"12"},
        {"json": {"to": PHONE, "text": 5}},
        {"json": {"to": PHONE}},
        {"json": {"to": PHONE, "text": ""}},
        {"json": {"to": PHONE, "text": "x" * 300 * 1024}},  # a body over 256 KiB
        {"content": b"[" * 100_000 + b"]" * 100_000},
        {"content": b'{"to": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001},
        {"content": b"\xff\xfe\x00garbage"},
    ]
    for kwargs in bad_bodies:
        error_of(api.post(send, **kwargs), 400, "bad_request")
    error_of(api.post(send, json={"to": PHONE, "text": "x"}, headers={"Idempotency-Key": "k" * 201}),
             400, "bad_request")
    for limit in ("0", "1001", "-1", "five", "1.5", ""):
        error_of(api.get(send, params={"limit": limit}), 400, "bad_request")
    error_of(api.get("/v1/events", params={"type": "nonsense"}), 400, "bad_request")
    error_of(api.post("/v1/sessions/acme/pairing-code", content=b"[]"), 400, "bad_request")

    error_of(api.get("/v1/sessions/nobody"), 404, "unknown_company")
    error_of(api.post("/v1/sessions/nobody/messages", json={"to": PHONE, "text": "x"}), 404, "unknown_company")
    error_of(api.get("/v1/sessions/nobody/qr"), 404, "unknown_company")
    error_of(api.post("/v1/sessions/nobody/start"), 404, "unknown_company")  # PUT creates; start and restart
    error_of(api.post("/v1/sessions/nobody/restart"), 404, "unknown_company")  # act on known sessions only
    error_of(api.get("/v1/sessions/acme/messages/NO-SUCH-ID"), 404, "not_found")
    error_of(api.get("/v1/nothing-here"), 404, "not_found")

    # Path traversal, sent byte for byte (an HTTP client would normalise the dots away).
    for method, path in (("GET", "/v1/sessions/..%2F..%2Fetc/passwd"), ("GET", "/v1/sessions/%2e%2e/qr"),
                         ("GET", "/v1/sessions/%2e%2e%2f%2e%2e%2f"), ("GET", "/v1/sessions/.."),
                         ("GET", "/v1/sessions/../../etc/passwd"), ("GET", "/v1/../v1/sessions"),
                         ("DELETE", "/v1/sessions/%2E%2E"), ("POST", "/v1/sessions/%2E%2E/stop"),
                         ("GET", "/v1/sessions/acme/messages/..%2F..%2F..%2Fwaportd.toml")):
        status, body = raw_request(api, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                        f"Authorization: Bearer {api.admin['token']}\r\nConnection: close\r\n\r\n")
        assert status in (400, 404), (path, status, body)
        assert json.loads(body)["error"]["code"] in ("not_found", "invalid_company_id"), (path, body)
        assert "root:" not in body

    assert api.send("acme", "first").status_code == 202
    assert api.send("acme", "second").status_code == 202
    limited = api.send("acme", "third")
    error_of(limited, 429, "rate_limited")
    assert limited.headers["retry-after"].isdigit() and int(limited.headers["retry-after"]) >= 1, limited.headers
    assert api.send("acme", "to someone else", to="15550100002").status_code == 202  # per recipient

    error_of(api.put("/v1/sessions/bistro"), 409, "capacity")
    error_of(api.get("/v1/sessions/bistro"), 404, "unknown_company")  # refused, not half-made

    assert api.post("/v1/sessions/acme/stop").json()["state"] == "stopped"
    error_of(api.send("acme", "while stopped", to="15550100003"), 409, "not_connected")
    error_of(api.post("/v1/sessions/acme/logout"), 409, "not_connected")

    # After all of it: both processes serve, and the supervisor's loop caught nothing.
    assert api.post("/v1/sessions/acme/start").status_code == 200
    api.wait_state("acme", "connected")
    assert api.client.get("/v1/health").status_code == 200
    assert api.d.ctl("ping")
    assert api.metric("waport_loop_errors_total") == 0
    log = api.full_log()
    assert "Traceback" not in log, log[-3000:]


def raw_request(api: Api, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, str]:
    """One HTTP/1.1 request written byte for byte; the status and the body of its answer."""
    host, port = api.d.config["http_listen"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), rest.decode(errors="replace")


def test_huge_request_heads_are_refused_quickly_and_the_api_keeps_serving(api: Api) -> None:
    """A head (URL and headers) past the bound is a 4xx (431) with the §9 body, or at worst a closed
    connection: never a hang, a 5xx, or a request served with all of it kept in memory."""
    heads = {
        "one 100 KB header": {"X-Filler": "a" * 100_000},
        "one 1 MB header": {"X-Filler": "a" * 1_000_000},
        "10,000 small headers": {f"X-H{i:05d}": "v" * 10 for i in range(10_000)},
    }
    for what, headers in heads.items():
        started = time.monotonic()
        try:
            r = api.client.get("/v1/sessions", headers={**api.auth, **headers})
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            r = None  # the server closed the connection on us: refused too
        assert time.monotonic() - started < 10, what
        if r is not None:
            assert r.status_code in (400, 431), (what, r.status_code, r.text[:300])
            error_of(r, r.status_code, "bad_request")
    assert api.client.get("/v1/health").status_code == 200
    assert api.get("/v1/sessions").status_code == 200


def test_a_daemon_that_does_not_answer_is_a_504_and_the_api_recovers(api: Api) -> None:
    assert api.d.proc is not None
    os.kill(api.d.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        error_of(api.client.get("/v1/health"), 504, "timeout")  # a probe gets its answer within seconds
        assert time.monotonic() - started < 8
        error_of(api.get("/v1/sessions"), 504, "timeout")
        assert time.monotonic() - started < 30
    finally:
        os.kill(api.d.proc.pid, signal.SIGCONT)
    wait_for(lambda: api.get("/v1/sessions").status_code == 200, timeout=15, what="the API to answer again")
    # healthy again once the workers' heartbeats are fresh (a worker may have left on its own meanwhile:
    # it heard no heartbeat while the daemon was stopped)
    wait_for(lambda: api.client.get("/v1/health").status_code == 200, timeout=30, what="healthy again")


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(fh.read().split("VmHWM:")[1].split()[0])


def test_an_oversized_body_is_refused_without_being_held_in_memory(api: Api) -> None:
    """The 256 KiB bound holds on the send route (served before the framework) and on the framework's
    routes alike: 64 MB is refused without the API ever holding it."""
    pid = api.api_pid()
    assert pid is not None
    for path in ("/v1/sessions/acme/messages", "/v1/sessions/acme/pairing-code"):
        before = peak_rss_kib(pid)
        error_of(api.post(path, content=b"x" * 64 * 1024 * 1024), 400, "bad_request")
        assert peak_rss_kib(pid) - before < 32 * 1024, f"{path}: the API's peak memory grew by 32 MB or more"
    assert api.client.get("/v1/health").status_code == 200


def test_a_limit_that_is_no_number_is_a_400(api: Api) -> None:
    api.create("acme")
    for limit in ("²", "①", "0x10", "1e3"):  # str.isdigit() says yes to the first two; int() says no
        error_of(api.get("/v1/sessions/acme/messages", params={"limit": limit}), 400, "bad_request")
    assert api.get("/v1/sessions/acme/messages", params={"limit": "1000"}).status_code == 200


def test_health_of_a_degraded_daemon_is_a_503(api: Api) -> None:
    """As /healthz and the OpenAPI document say: a probe on /v1/health sees a daemon that needs a person."""
    api.create("acme")
    assert api.post("/v1/sessions/acme/logout").json()["state"] == "logged_out"  # needs a person
    r = api.client.get("/v1/health")
    assert r.status_code == 503, r.text
    assert r.json()["status"] == "degraded" and r.json()["attention"] == {"acme": "logged_out"}, r.text
    assert api.put("/v1/sessions/acme").status_code == 200  # pairs again (auto-pair): healthy again
    api.wait_state("acme", "connected")
    wait_for(api.healthy, timeout=10, what="GET /v1/health to answer 200 again")


def test_a_method_not_allowed_names_every_allowed_method(api: Api) -> None:
    r = api.request("PATCH", "/v1/sessions/acme")
    error_of(r, 405, "bad_request")
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "PUT", "DELETE"}, r.headers


# ---------------------------------------------------------------- 5. server-sent events


class EventStream:
    """GET /v1/events read as an SSE client reads it: frame by frame, each read bounded by the client's
    read timeout (the server sends a keep-alive every 15 s), the whole wait by a deadline."""

    def __init__(self, api: Api, headers: dict[str, str], params: dict[str, str] | None = None,
                 last_event_id: str | None = None) -> None:
        self.stack = ExitStack()
        if last_event_id is not None:
            headers = {**headers, "Last-Event-ID": last_event_id}
        self.response = self.stack.enter_context(api.client.stream(
            "GET", "/v1/events", params=params, headers={**headers, "Accept": "text/event-stream"},
            timeout=httpx.Timeout(10.0, read=20.0)))
        assert self.response.status_code == 200, self.response.read()
        assert self.response.headers["content-type"].startswith("text/event-stream"), self.response.headers
        self.lines = self.response.iter_lines()
        self.events: list[tuple[str, dict[str, Any]]] = []  # (id, event)
        first = self.frame()
        assert "retry" in first, first  # the hub sends it once the client is subscribed: from here, nothing is missed

    def frame(self) -> dict[str, str]:
        """The next frame's fields (comments, such as keep-alives, are skipped)."""
        fields: dict[str, str] = {}
        for line in self.lines:
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = fields[name] + "\n" + value.removeprefix(" ") if name in fields else value.removeprefix(" ")
        raise AssertionError(f"the event stream ended; events so far: {self.events}")

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15,
              what: str = "event") -> tuple[str, dict[str, Any]]:
        for event_id, event in self.events:
            if predicate(event):
                return event_id, event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.frame()
            assert "id" in fields and "data" in fields, fields
            event = json.loads(fields["data"])
            assert set(event) == {"type", "company", "ts", "data"}, event
            assert isinstance(event["ts"], (int, float)) and isinstance(event["data"], dict), event
            self.events.append((fields["id"], event))
            if predicate(event):
                return fields["id"], event
        raise AssertionError(f"no {what} within {timeout} s; saw {[e for _, e in self.events][-10:]}")

    def close(self) -> None:
        self.stack.close()


def is_(type_: str, company: str, **data: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (e["type"] == type_ and e["company"] == company
                      and all(e["data"].get(k) == v for k, v in data.items()))


def test_server_sent_events_deliver_replay_and_filter(api: Api) -> None:
    api.create("acme", "bistro")
    stream = EventStream(api, api.auth, {"company": "acme"})
    sent_only = EventStream(api, api.auth, {"company": "acme", "type": "sent"})
    acme_token = bearer(api.d.ctl("token_create", company="acme")["token"])
    scoped = EventStream(api, acme_token)  # a company token, no `company`: its company only
    everything = EventStream(api, api.auth)
    try:
        message_id = api.send("acme", "event me").json()["message_id"]
        first_id, sent = stream.until(is_("sent", "acme", message_id=message_id), what="acme's sent event")
        api.net.call("inbound", company="acme", **{"from": "15550100009"}, text="is 10:00 free?")
        _, inbound = stream.until(is_("message", "acme", text="is 10:00 free?"), what="acme's inbound message")
        assert inbound["data"]["from"] == "15550100009"
        ids = [event_id for event_id, _ in stream.events]
        assert len(set(ids)) == len(ids) and all(ids), ids

        # A client that comes back with the id of the first event gets everything after it again.
        again = EventStream(api, api.auth, {"company": "acme"}, last_event_id=first_id)
        try:
            later = stream.events[[i for i, _ in stream.events].index(first_id) + 1:]
            assert later
            again.until(is_("message", "acme", text="is 10:00 free?"), what="the replayed inbound message")
            assert again.events[:len(later)] == later
        finally:
            again.close()

        # Filters: bistro's events reach the unfiltered admin stream, never acme's token's stream.
        bistro_news = api.send("bistro", "bistro's news").json()["message_id"]
        everything.until(is_("sent", "bistro", message_id=bistro_news), what="bistro's sent event")
        acme_news = api.send("acme", "acme's news").json()["message_id"]
        everything.until(is_("sent", "acme", message_id=acme_news), what="acme's second sent event")
        scoped.until(is_("sent", "acme", message_id=acme_news), what="acme's second sent event")
        assert {e["company"] for _, e in scoped.events} == {"acme"}, scoped.events
        assert any(e["type"] == "message" for _, e in scoped.events)
        sent_only.until(is_("sent", "acme", message_id=acme_news), what="acme's second sent event")
        assert [e["data"]["message_id"] for _, e in sent_only.events] == [message_id, acme_news], sent_only.events
        assert {(e["type"], e["company"]) for _, e in sent_only.events} == {("sent", "acme")}, sent_only.events
        assert any(e["type"] == "message" for _, e in stream.events)  # there was something to filter out
    finally:
        for s in (stream, sent_only, scoped, everything):
            s.close()


# ---------------------------------------------------------------- 6. the API process dies


def test_waportd_restarts_a_killed_api_and_accepted_sends_are_delivered(api: Api) -> None:
    api.create("acme")
    worker = api.record("acme")["pid"]
    old = api.api_pid()
    assert old is not None
    texts = [f"accepted before the kill {i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:  # several in flight at once, as applications send
        answers = list(pool.map(lambda t: api.send("acme", t, to=f"155501{texts.index(t):05d}"), texts))
    assert [r.status_code for r in answers] == [202] * len(texts), [r.text for r in answers if r.status_code != 202]
    assert len({r.json()["message_id"] for r in answers}) == len(texts)
    os.kill(old, signal.SIGKILL)

    new = wait_for(lambda: (pid := api.api_pid()) not in (None, old) and pid, timeout=15,
                   what="waportd to start the API again")
    assert new != old
    wait_for(api.healthy, timeout=15, what="the restarted API to answer")
    wait_for(lambda: all(t in api.network_got("acme") for t in texts), timeout=15,
             what="every send accepted before the kill to reach the network")
    got = api.network_got("acme")
    assert all(got.count(t) == 1 for t in texts), got
    # The session did not notice; the token still works; sends go on.
    record = api.record("acme")
    assert record["state"] == "connected" and record["pid"] == worker
    r = api.send("acme", "after the restart")
    assert r.status_code == 202, r.text
    api.wait_message("acme", r.json()["message_id"], "sent")
    assert api.metric("waport_loop_errors_total") == 0


# ---------------------------------------------------------------- 7. the OpenAPI document holds


CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance"]


def test_webhook_routes_set_show_rotate_list_replay_delete(api: Api, receiver: WebhookReceiver) -> None:
    api.create("acme")
    company_token = api.d.ctl("token_create", company="acme")["token"]
    r = api.put("/v1/sessions/acme/webhook", headers=bearer(company_token),
                json={"url": receiver.url("acme"), "events": ["message"]})
    assert r.status_code == 201, r.text
    secret = r.json()["secret"]
    receiver.secrets("acme", secret)
    assert api.put("/v1/sessions/acme/webhook", json={"url": receiver.url("acme"), "events": ["message"]},
                   ).status_code == 200  # replaced: a new secret
    error_of(api.put("/v1/sessions/acme/webhook", json={"url": "file:///etc/passwd"}), 400, "bad_request")
    error_of(api.put("/v1/sessions/acme/webhook", json={"url": receiver.url("x"), "events": ["nope"]}), 400,
             "bad_request")
    error_of(api.put("/v1/sessions/beta/webhook", headers=bearer(company_token), json={"url": receiver.url("b")}),
             403, "forbidden")
    shown = api.get("/v1/sessions/acme/webhook").json()
    assert shown["url"] == receiver.url("acme") and "secret" not in shown
    rotated = api.post("/v1/sessions/acme/webhook/rotate").json()
    receiver.secrets("acme", rotated["secret"])
    api.net.call("inbound", company="acme", **{"from": "15550100001"}, text="hi", id="H-1")
    got = wait_for(lambda: receiver.delivered("acme"), what="the webhook")
    assert WebhookReceiver.all_valid(got) and got[0]["data"]["id"] == "H-1"
    listing = wait_for(lambda: (x := api.get("/v1/sessions/acme/webhook/deliveries").json())["counts"]["ok"] and x,
                       what="the delivery listed")
    assert listing["events"][0]["type"] == "message" and listing["events"][0]["last_status"] == 204
    error_of(api.post("/v1/sessions/acme/webhook/replay", json={}), 400, "bad_request")
    assert api.post("/v1/sessions/acme/webhook/replay", json={"since": "1h"}).json()["replayed"] == 1
    wait_for(lambda: len(receiver.delivered("acme")) == 2, what="the replay")
    assert len({r["id"] for r in receiver.delivered("acme")}) == 1  # the same webhook-id
    assert api.delete("/v1/sessions/acme/webhook").json() == {"company": "acme", "deleted": True}
    error_of(api.get("/v1/sessions/acme/webhook"), 404, "not_found")


def test_answers_conform_to_the_openapi_document(api: Api, short_tmp: str) -> None:
    """schemathesis against the live /v1/openapi.json: every operation but the endless event stream,
    with the admin token, on a known company (and random ones), a known message id and valid phones."""
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(exe):
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    api.create("acme")
    message_id = api.send("acme", "for schemathesis").json()["message_id"]
    config = os.path.join(short_tmp, "schemathesis.toml")
    with open(config, "w") as fh:
        fh.write(f"""
[auth.openapi.bearer]
bearer = "{api.admin['token']}"

[dictionaries.companies]
values = ["acme"]
[dictionaries.messages]
values = ["{message_id}"]
[dictionaries.phones]
values = ["{PHONE}", "+1 (555) 010-0002"]

[parameters]
"path.company" = {{ dictionary = "companies", probability = 0.5 }}
"path.message_id" = {{ dictionary = "messages", probability = 0.5 }}
"body.to" = {{ dictionary = "phones", probability = 0.5 }}
"body.phone" = {{ dictionary = "phones", probability = 0.5 }}

[generation]
database = "none"
""")
    seed = os.environ.get("WAPORT_SCHEMATHESIS_SEED", "20240601")
    cmd = [exe, "--config-file", config, "--no-color", "run", f"{api.url}/v1/openapi.json",
           "--checks", ",".join(CHECKS), "--max-examples", "40", "--seed", seed, "--workers", "1",
           "--exclude-path", "/v1/events", "--request-timeout", "75", "--phases", "examples,coverage,fuzzing"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=short_tmp)
    assert run.returncode == 0, f"schemathesis (seed {seed}) found mismatches:\n{run.stdout[-15000:]}\n{run.stderr}"
    assert "passed" in run.stdout
    assert api.client.get("/v1/health").status_code == 200
    assert api.metric("waport_loop_errors_total") == 0


def test_media_up_and_down_raw_and_multipart_scoped_to_a_company(api: Api) -> None:
    import hashlib
    import os as os_

    data = os_.urandom(2_000_000)
    company_token = api.d.ctl("token_create", company="acme")["token"]
    r = api.post("/v1/media", headers={**bearer(company_token), "Content-Type": "image/png"}, content=data)
    assert r.status_code == 201, r.text
    stored = r.json()
    assert stored == {"media_id": hashlib.sha256(data).hexdigest(), "size": len(data), "mimetype": "image/png",
                      "sha256": hashlib.sha256(data).hexdigest()}
    back = api.get(f"/v1/media/{stored['media_id']}", headers=bearer(company_token))
    assert back.status_code == 200 and back.content == data and back.headers["content-type"] == "image/png"
    other = api.d.ctl("token_create", company="beta")["token"]
    error_of(api.get(f"/v1/media/{stored['media_id']}", headers=bearer(other)), 404, "not_found")
    doc = b"%PDF-1.4 menu"
    r = api.post("/v1/media", files={"file": ("menu.pdf", doc, "application/pdf")})
    assert r.status_code == 201 and r.json()["mimetype"] == "application/pdf", r.text
    assert api.get(f"/v1/media/{r.json()['media_id']}").content == doc  # an admin reads any
    import http.client
    import json as json_

    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/media")
    for k, v in {**api.auth, "Content-Type": "image/png", "Content-Length": str(1 << 40)}.items():
        conn.putheader(k, v)
    conn.endheaders()  # a terabyte announced, nothing sent: refused before any byte is read
    answer = conn.getresponse()
    assert answer.status == 413 and json_.loads(answer.read())["error"]["code"] == "media_too_large"
    conn.close()
    error_of(api.post("/v1/media", headers={"Content-Type": "image/png"}, content=b""), 400, "bad_request")
    error_of(api.get("/v1/media/not-a-hash"), 400, "bad_request")
    error_of(api.post("/v1/media", headers={"Authorization": "Bearer nope"}, content=b"x"), 401, "unauthorized")


def test_read_and_typing_over_http(api: Api) -> None:
    api.create("acme")
    api.wait_state("acme", "connected")
    api.net.call("inbound", company="acme", **{"from": "15550100001"}, text="hi", id="WA-9")
    wait_for(lambda: api.get("/v1/sessions/acme/messages").json()["inbound"], what="the inbound message")
    r = api.post("/v1/sessions/acme/read", json={"chat": "15550100001", "message_ids": ["WA-9"]})
    assert r.status_code == 200 and r.json()["read"] == 1, r.text
    assert api.net.call("reads", company="acme")["reads"][0]["ids"] == ["WA-9"]
    assert api.post("/v1/sessions/acme/typing", json={"chat": "15550100001"}).json()["state"] == "composing"
    error_of(api.post("/v1/sessions/acme/typing", json={"chat": "15550100001", "state": "x"}), 400, "bad_request")
    error_of(api.post("/v1/sessions/acme/read", json={"chat": "15550100001", "message_ids": []}), 400,
             "bad_request")


def test_an_image_and_a_location_sent_over_http(api: Api) -> None:
    api.create("acme")
    api.wait_state("acme", "connected")
    token = bearer(api.d.ctl("token_create", company="acme")["token"])
    photo = b"\xff\xd8\xff" + bytes(range(256)) * 40
    stored = api.post("/v1/media", headers={**token, "Content-Type": "image/jpeg"}, content=photo).json()
    r = api.post("/v1/sessions/acme/messages", headers=token,
                 json={"to": PHONE, "type": "image", "media": stored["media_id"], "text": "today's cut"})
    assert r.status_code == 202, r.text
    image = r.json()["message_id"]
    r = api.post("/v1/sessions/acme/messages", json={"to": PHONE, "type": "location", "latitude": 48.85,
                                                       "longitude": 2.35, "name": "the salon"})
    assert r.status_code == 202, r.text
    api.wait_message("acme", image, "sent")
    sent = wait_for(lambda: len(m := api.net.call("sent", company="acme")["messages"]) == 2 and m, what="both sends")
    assert (sent[0]["type"], sent[0]["sha256"], sent[0]["text"]) == ("image", stored["sha256"], "today's cut")
    assert (sent[1]["type"], sent[1]["latitude"], sent[1]["name"]) == ("location", 48.85, "the salon")
    message = api.get(f"/v1/sessions/acme/messages/{image}").json()
    assert (message["type"], message["media"], message["mimetype"]) == ("image", stored["media_id"], "image/jpeg")
    error_of(api.post("/v1/sessions/acme/messages", json={"to": PHONE, "type": "image", "media": "0" * 64}),
             404, "not_found")
    error_of(api.post("/v1/sessions/acme/messages", json={"to": PHONE, "type": "location", "latitude": 100,
                                                          "longitude": 0}), 400, "bad_request")
