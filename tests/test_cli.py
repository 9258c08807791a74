"""waportctl against a scripted ZeroMQ control server: the exact requests sent, outputs, exit codes.

The fake daemon is a real ROUTER socket on a real ipc endpoint, answering from a table per
command and recording what it received, so these tests pin the wire contract of DESIGN.md §4.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from click.testing import CliRunner, Result

from cli import main as cli_main
from cli import render
from cli.client import Settings
from cli.main import cli
from ipc import events
from ipc.tokens import TokenReader

WAPORTCTL = str(Path(sys.executable).with_name("waportctl"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ISO_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
UNREACHABLE_RE = r"waportctl: cannot reach waportd at .*control\.sock .*is it running\?"


class Err:
    """An error reply in a fake daemon's table."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        self.error = {"code": code, "message": message, **extra}


class Raw:
    """A raw reply frame, for replies that are not valid JSON."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame


SILENT = object()  # the fake daemon never answers this command

Reply = dict[str, Any] | Err | Raw | object | Callable[[dict[str, Any]], Any]


class FakeDaemon:
    """A ROUTER on RUN_DIR/control.sock that answers per `replies` and records each request."""

    def __init__(self, run_dir: str, replies: dict[str, Reply]) -> None:
        self.replies = replies
        self.requests: list[dict[str, Any]] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"ipc://{run_dir}/control.sock")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            ident, frame = self._sock.recv_multipart()
            request = json.loads(frame)
            self.requests.append(request)
            reply = self.replies.get(request["cmd"], Err("bad_request", f"unknown command {request['cmd']}"))
            if callable(reply):
                reply = reply(request["args"])
            if reply is SILENT:
                continue
            if isinstance(reply, Raw):
                out = reply.frame
            elif isinstance(reply, Err):
                out = json.dumps({"id": request["id"], "ok": False, "error": reply.error}).encode()
            else:
                out = json.dumps({"id": request["id"], "ok": True, "result": reply}).encode()
            self._sock.send_multipart([ident, out])

    def sent(self) -> list[tuple[str, dict[str, Any]]]:
        """(cmd, args) of every request received."""
        return [(r["cmd"], r["args"]) for r in self.requests]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


@pytest.fixture
def run_dir() -> Iterator[str]:
    # ipc paths are limited to ~107 bytes: pytest's tmp_path can be longer than that.
    path = tempfile.mkdtemp(prefix="wctl", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(run_dir: str) -> Iterator[Callable[..., FakeDaemon]]:
    started: list[FakeDaemon] = []

    def start(**replies: Reply) -> FakeDaemon:
        fake = FakeDaemon(run_dir, replies)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


def ctl(run_dir: str, *args: str, input: str | None = None) -> Result:
    """Run waportctl in-process with --run-dir."""
    return CliRunner().invoke(cli, ["--run-dir", run_dir, *args], input=input, prog_name="waportctl")


def ctl_proc(run_dir: str, *args: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
    """Run the installed waportctl console script as a real process."""
    return subprocess.run(
        [WAPORTCTL, "--run-dir", run_dir, *args], capture_output=True, text=True, timeout=timeout
    )


def record(company: str = "acme", **fields: Any) -> dict[str, Any]:
    base = dict.fromkeys(render.RECORD_FIELDS)
    base.update(company=company, state="connected", restarts=0, queued=0)
    base.update(fields)
    return base


# --- basic verbs -------------------------------------------------------------------------


def test_ping_as_a_real_process(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(ping={"pong": True, "pid": 42, "version": "0.1.0"})
    proc = ctl_proc(run_dir, "ping")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "pong from waportd 0.1.0 (pid 42)\n", "")
    assert fake.sent() == [("ping", {})]
    assert re.fullmatch(r"[0-9a-f]{32}", fake.requests[0]["id"])


def test_version(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(version={"version": "0.1.0", "protocol": 1, "backend": "sim"})
    result = ctl(run_dir, "version")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "waportd 0.1.0 (protocol 1, backend sim)"


def test_list_prints_an_aligned_table(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    now = time.time()
    sessions = [
        record("beta", state="backoff", reason="crash", since=now - 5, restarts=3, next_restart_at=now + 30),
        record("acme", pid=4242, since=now - 200, connected_at=now - 200, phone="15551234567"),
    ]
    fake = daemon(list={"sessions": sessions})
    result = ctl(run_dir, "list")
    assert result.exit_code == 0, result.output
    header, acme, beta = result.stdout.splitlines()
    assert header.split() == list(render.SESSION_COLUMNS)
    assert acme.split() == ["acme", "connected", "-", "4242", "3m20s", "0", "-", "15551234567"]
    assert re.fullmatch(r"beta backoff crash - \d\.\ds 3 in (29|30)s -", " ".join(beta.split()))
    for column in render.SESSION_COLUMNS:  # every cell starts where its header starts
        start = header.index(column)
        assert all(row[start] != " " and row[start - 1 : start] in ("", " ") for row in (acme, beta))
    assert fake.sent() == [("list", {})]


def test_list_json_is_the_result(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    sessions = [record("acme", since=1.5)]
    daemon(list={"sessions": sessions})
    result = ctl(run_dir, "--json", "list")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"sessions": sessions}


def test_global_options_after_the_verb_and_run_dir_from_env(
    run_dir: str, daemon: Callable[..., FakeDaemon]
) -> None:
    daemon(list={"sessions": []})
    result = CliRunner().invoke(cli, ["list", "--json"], env={"WAPORT_RUN_DIR": run_dir})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"sessions": []}
    assert ctl("/nonexistent", "list", "--run-dir", run_dir).stdout == "no sessions\n"


def test_status_without_company_is_list(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(list={"sessions": []})
    result = ctl(run_dir, "status")
    assert (result.exit_code, result.stdout) == (0, "no sessions\n")
    assert fake.sent() == [("list", {})]


def test_status_prints_a_key_value_block(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    now = time.time()
    rec = record(pid=7, since=now - 65, rss_bytes=50 * 1024 * 1024, last_error="boom", extra_field=[1])
    fake = daemon(status=rec)
    result = ctl(run_dir, "status", "acme")
    assert result.exit_code == 0
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert list(lines) == [*render.RECORD_FIELDS, "extra_field"]
    assert {k: v.strip() for k, v in lines.items() if k in ("state", "pid", "last_error", "reason")} == {
        "state": "connected",
        "pid": "7",
        "last_error": "boom",
        "reason": "-",
    }
    assert re.fullmatch(rf" +{ISO_RE} \(1m0[45]s ago\)", lines["since"])
    assert lines["rss_bytes"].strip() == "50.0 MiB (52428800)"
    assert fake.sent() == [("status", {"company": "acme"})]


@pytest.mark.parametrize("verb", ["start", "stop", "restart", "logout"])
def test_lifecycle_verbs_print_the_new_state(
    run_dir: str, daemon: Callable[..., FakeDaemon], verb: str
) -> None:
    fake = daemon(**{verb: record(state="starting")})
    result = ctl(run_dir, verb, "acme")
    assert (result.exit_code, result.stdout) == (0, "acme: starting\n")
    assert fake.sent() == [(verb, {"company": "acme"})]


def test_send_with_and_without_idempotency_key(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(send={"message_id": "3EB0AB", "status": "queued"})
    result = ctl(run_dir, "send", "acme", "+1 555 0100", "hello there", "--idempotency-key", "k1")
    assert (result.exit_code, result.stdout) == (0, "acme: queued 3EB0AB\n")
    assert ctl(run_dir, "send", "acme", "15550100", "hi").exit_code == 0
    assert fake.sent() == [
        ("send", {"company": "acme", "to": "+1 555 0100", "text": "hello there", "idempotency_key": "k1"}),
        ("send", {"company": "acme", "to": "15550100", "text": "hi"}),
    ]


def test_pair_prints_the_code(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(pair_code={"company": "acme", "code": "ABCD-1234"})
    result = ctl(run_dir, "pair", "acme", "+1 555 0100")
    assert (result.exit_code, result.stdout) == (0, "ABCD-1234\n")
    assert fake.sent() == [("pair_code", {"company": "acme", "phone": "+1 555 0100"})]


def test_metrics_table(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    metrics = [
        {"name": "waport_sessions", "labels": {"state": "connected"}, "value": 2.0},
        {"name": "waport_heartbeat_age_seconds", "labels": {"company": "acme"}, "value": 0.25},
        {"name": "waport_up", "labels": {}, "value": 1},
    ]
    fake = daemon(metrics={"metrics": metrics})
    result = ctl(run_dir, "metrics")
    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows == [
        ["NAME", "LABELS", "VALUE"],
        ["waport_sessions", "state=connected", "2"],
        ["waport_heartbeat_age_seconds", "company=acme", "0.25"],
        ["waport_up", "-", "1"],
    ]
    assert fake.sent() == [("metrics", {})]


def test_diagnose_prints_record_and_lists(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    diagnosis = {
        "company": "acme",
        "record": record(state="failed", reason="pairing_timeout"),
        "findings": ["pairing timed out after 170 s"],
        "recommendations": ["run `waportctl restart acme` and scan the QR code"],
        "heartbeat_age": 1.5,
    }
    fake = daemon(diagnose=diagnosis)
    result = ctl(run_dir, "diagnose", "acme")
    assert result.exit_code == 0
    out = result.stdout
    assert out.startswith("company: acme\nrecord:\n  company:")
    assert "  state:           failed\n" in out
    assert "findings:\n  - pairing timed out after 170 s\n" in out
    assert "recommendations:\n  - run `waportctl restart acme` and scan the QR code\n" in out
    assert "details:\n  heartbeat_age: 1.5" in out
    assert fake.sent() == [("diagnose", {"company": "acme"})]


def test_reload(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(reload={"started": ["acme", "beta"], "stopped": []})
    result = ctl(run_dir, "reload")
    assert (result.exit_code, result.stdout) == (0, "started: acme, beta\nstopped: -\n")


# --- delete confirmation ------------------------------------------------------------------


def test_delete_without_tty_or_yes_refuses(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(delete={})
    result = ctl(run_dir, "delete", "acme")
    assert result.exit_code == 2
    assert "pass --yes" in result.stderr
    assert fake.sent() == []


def test_delete_with_yes(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(delete={"company": "acme", "deleted": True})
    result = ctl(run_dir, "delete", "-y", "acme")
    assert (result.exit_code, result.stdout) == (0, "acme: deleted\n")
    assert fake.sent() == [("delete", {"company": "acme"})]


@pytest.mark.parametrize(("answer", "code", "sent"), [("y\n", 0, 1), ("n\n", 1, 0)])
def test_delete_asks_on_a_tty(
    run_dir: str,
    daemon: Callable[..., FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    code: int,
    sent: int,
) -> None:
    monkeypatch.setattr(cli_main, "stdin_is_tty", lambda: True)
    fake = daemon(delete={"company": "acme"})
    result = ctl(run_dir, "delete", "acme", input=answer)
    assert result.exit_code == code
    assert "Delete 'acme'" in result.stderr
    assert len(fake.requests) == sent


# --- errors and exit codes ----------------------------------------------------------------


def test_error_reply_exits_1_with_the_message(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(status=Err("unknown_company", "no such company 'zzz'"))
    result = ctl(run_dir, "status", "zzz")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "error: unknown_company: no such company 'zzz'\n"


def test_error_reply_as_a_real_process_with_json(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(start=Err("invalid_company_id", "invalid company id 'bad id!'"))
    proc = ctl_proc(run_dir, "--json", "start", "bad id!")
    assert proc.returncode == 1
    error = {"code": "invalid_company_id", "message": "invalid company id 'bad id!'"}
    assert json.loads(proc.stdout) == error
    assert proc.stderr == "error: invalid_company_id: invalid company id 'bad id!'\n"
    assert fake.sent() == [("start", {"company": "bad id!"})]  # passed through, not validated locally


def test_rate_limited_mentions_retry_after(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(send=Err("rate_limited", "too many messages", retry_after_ms=1500))
    result = ctl(run_dir, "send", "acme", "15550100", "hi")
    assert result.exit_code == 1
    assert result.stderr == "error: rate_limited: too many messages (retry after 1.5 s)\n"


def test_malformed_reply_is_an_error_not_a_traceback(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(ping=Raw(b"not json"))
    result = ctl(run_dir, "ping")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: internal: malformed reply from waportd")


def test_a_reply_nested_too_deeply_is_an_error_not_a_traceback(
    run_dir: str, daemon: Callable[..., FakeDaemon]
) -> None:
    daemon(ping=Raw(b"[" * 100_000), version=Raw(b"[1, 2]"))
    result = ctl(run_dir, "ping")
    assert result.exit_code == 1
    assert result.stderr == "error: internal: malformed reply from waportd: JSON nested too deeply\n"
    result = ctl(run_dir, "version")
    assert result.exit_code == 1 and "reply is not a JSON object" in result.stderr


def test_missing_socket_exits_3(run_dir: str) -> None:
    result = ctl(run_dir, "list")
    assert result.exit_code == 3
    assert re.match(UNREACHABLE_RE, result.stderr)
    assert "(socket file missing)" in result.stderr


def test_silent_daemon_exits_3_after_timeout(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(ping=SILENT)
    started = time.monotonic()
    proc = ctl_proc(run_dir, "--timeout", "0.5", "ping")
    assert proc.returncode == 3
    assert re.match(UNREACHABLE_RE, proc.stderr)
    assert "(no reply within 0.5 s)" in proc.stderr
    assert time.monotonic() - started < 5  # the 0.5 s asked for and the CLI's start, not the default 10 s
    assert fake.sent() == [("ping", {})]


def test_usage_errors_exit_2(run_dir: str) -> None:
    assert ctl(run_dir, "send", "acme").exit_code == 2
    assert ctl(run_dir, "frobnicate").exit_code == 2
    assert ctl(run_dir, "--timeout", "0", "ping").exit_code == 2


# --- QR codes -------------------------------------------------------------------------------


def test_qr_draws_the_code_and_writes_a_png(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(qr={"company": "acme", "state": "pairing", "code": "SIMQR:abc123"})
    png = os.path.join(run_dir, "qr.png")
    result = ctl(run_dir, "qr", "acme", "--png", png)
    assert result.exit_code == 0, result.output
    assert any(block in result.stdout for block in "█▀▄")
    assert result.stdout.splitlines()[-1] == "SIMQR:abc123"
    with open(png, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    assert fake.sent() == [("qr", {"company": "acme"})]


def test_qr_without_code_says_why(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(qr={"company": "acme", "state": "connected", "code": None})
    png = os.path.join(run_dir, "qr.png")
    result = ctl(run_dir, "qr", "acme", "--png", png)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "no QR code: session state is connected\n"
    assert not os.path.exists(png)


def test_qr_json(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    reply = {"company": "acme", "state": "pairing", "code": "SIMQR:x"}
    daemon(qr=reply)
    result = ctl(run_dir, "--json", "qr", "acme")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == reply


# --- events ---------------------------------------------------------------------------------


class Publisher:
    """A PUB on RUN_DIR/events.sock that publishes a batch every few ms until stopped.

    Publishing repeatedly is how the tests wait for the subscriber: a SUB only receives what
    is published after its subscription reaches the PUB, so a single publish could be lost.
    """

    def __init__(self, run_dir: str, batch: list[dict[str, Any]]) -> None:
        self.batch = batch
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"ipc://{run_dir}/events.sock")

    def publish(self) -> None:
        for event in self.batch:
            self._sock.send_multipart(events.frames(event))

    def run_until(self, stop: threading.Event) -> None:
        while not stop.wait(0.01):
            self.publish()

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()


BATCH = [
    events.make("beta", "state", {"state": "connecting"}, ts=1_700_000_000.0),
    events.make("acme", "state", {"state": "connected"}, ts=1_700_000_001.5),
    events.make("acme", "message", {"from": "15550100", "text": "hi"}, ts=1_700_000_002.0),
    events.make("beta", "message", {"from": "15550101", "text": "yo"}, ts=1_700_000_003.0),
]


@pytest.fixture
def publisher(run_dir: str) -> Iterator[Publisher]:
    pub = Publisher(run_dir, BATCH)
    yield pub
    pub.close()


def test_events_count_as_a_real_process(run_dir: str, publisher: Publisher) -> None:
    proc = subprocess.Popen(
        [WAPORTCTL, "--run-dir", run_dir, "events", "-c", "acme", "--count", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 5
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            publisher.publish()
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    expected = {"state": '{"state":"connected"}', "message": '{"from":"15550100","text":"hi"}'}
    for line in lines:
        match = re.fullmatch(rf"{ISO_RE} acme (state|message) (.*)", line)
        assert match and match[2] == expected[match[1]], line


def test_events_type_filter_json(run_dir: str, publisher: Publisher) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=publisher.run_until, args=(stop,), daemon=True)
    thread.start()
    try:
        result = ctl(run_dir, "--json", "events", "-t", "message", "--count", "3")
    finally:
        stop.set()
        thread.join(2)
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(got) == 3
    assert all(e["type"] == "message" and e in BATCH for e in got)


def test_events_ctrl_c_exits_0(run_dir: str, publisher: Publisher) -> None:
    proc = subprocess.Popen(
        [WAPORTCTL, "--run-dir", run_dir, "events"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True)
    reader.start()
    try:
        first = None
        deadline = time.monotonic() + 5
        while first is None and time.monotonic() < deadline:
            publisher.publish()
            try:
                first = lines.get(timeout=0.02)
            except queue.Empty:
                pass
        assert first is not None, "no event printed"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=3) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_events_without_socket_exits_3(run_dir: str) -> None:
    result = ctl(run_dir, "events")
    assert result.exit_code == 3
    assert "cannot reach waportd events at" in result.stderr
    assert "events.sock (socket file missing)" in result.stderr


# --- rendering ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0.0s"), (4.21, "4.2s"), (42.9, "42s"), (184, "3m04s"), (7500, "2h05m"), (273600, "3d04h")],
)
def test_duration(seconds: float, text: str) -> None:
    assert render.duration(seconds) == text


def test_until_and_since() -> None:
    assert render.until(104.2, now=100) == "in 4.2s"
    assert render.until(99, now=100) == "due"
    assert render.until(None, now=100) == "-"
    assert render.since(None, now=100) == "-"


def test_event_line() -> None:
    event = events.make("acme", "sent", {"id": "X", "to": "1555"}, ts=1_700_000_000.25)
    line = render.event_line(event)
    assert re.fullmatch(rf"{ISO_RE} acme sent " + re.escape('{"id":"X","to":"1555"}'), line)
    assert line.startswith(render.iso_time(1_700_000_000.25))


def test_worker_bound_commands_wait_longer_unless_told() -> None:
    assert Settings().timeout_for("ping") == 10
    assert Settings().timeout_for("stop") == Settings().timeout_for("send") == 60
    assert Settings(timeout=0.5).timeout_for("stop") == 0.5


# --- API tokens -----------------------------------------------------------------------------

TOKEN = "wp_" + "k" * 43


def test_token_create_prints_the_token_once_on_stdout(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(token_create={"id": "tok_0123456789ab", "token": TOKEN, "company": "acme",
                                "created_at": 1_700_000_000.0, "expires_at": 1_702_592_000.0})
    result = ctl(run_dir, "token", "create", "--company", "acme", "--expires", "30d")
    assert (result.exit_code, result.stdout) == (0, TOKEN + "\n")
    assert result.stderr.startswith("tok_0123456789ab: for company acme, expires 2023-12-1")
    assert "the only time the token is shown" in result.stderr
    assert ctl(run_dir, "token", "create", "--expires", "1.5").exit_code == 0
    assert ctl(run_dir, "token", "create").exit_code == 0
    assert fake.sent() == [("token_create", {"company": "acme", "expires": 2592000}),
                           ("token_create", {"expires": 1.5}), ("token_create", {})]


def test_token_create_json_is_the_result(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    created = {"id": "tok_0123456789ab", "token": TOKEN, "company": None, "created_at": 1.0, "expires_at": None}
    daemon(token_create=created)
    result = ctl(run_dir, "token", "create", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == created


@pytest.mark.parametrize("expires", ["soon", "0", "-1d", "1w"])
def test_token_create_refuses_a_bad_duration_before_asking(
    run_dir: str, daemon: Callable[..., FakeDaemon], expires: str
) -> None:
    fake = daemon()
    result = ctl(run_dir, "token", "create", "--expires", expires)
    assert result.exit_code == 2 and "--expires" in result.stderr
    assert fake.sent() == []


def test_token_list_and_revoke(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    tokens = [
        {"id": "tok_aaaaaaaaaaaa", "company": "acme", "created_at": 1_700_000_000.0, "expires_at": None,
         "revoked_at": None, "state": "active"},
        {"id": "tok_bbbbbbbbbbbb", "company": None, "created_at": 1_700_000_000.0, "expires_at": 1_700_003_600.0,
         "revoked_at": 1_700_000_100.0, "state": "revoked"},
    ]
    fake = daemon(token_list={"tokens": tokens}, token_revoke={**tokens[1], "state": "revoked"})
    lines = ctl(run_dir, "token", "list").stdout.splitlines()
    assert lines[0].split() == ["ID", "COMPANY", "STATE", "CREATED", "EXPIRES", "REVOKED"]
    assert lines[1].split()[:3] == ["tok_aaaaaaaaaaaa", "acme", "active"] and lines[1].split()[4:] == ["never", "-"]
    assert lines[2].split()[:3] == ["tok_bbbbbbbbbbbb", "(all)", "revoked"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", cell) for cell in lines[2].split()[3:])
    result = ctl(run_dir, "token", "revoke", "tok_bbbbbbbbbbbb")
    assert (result.exit_code, result.stdout) == (0, "tok_bbbbbbbbbbbb: revoked\n")
    assert fake.sent() == [("token_list", {}), ("token_revoke", {"id": "tok_bbbbbbbbbbbb"})]
    assert render.tokens_table([]) == "no API tokens"


def test_token_round_trip_against_a_real_daemon(daemon_factory: Callable[..., Any], short_tmp: str) -> None:
    d = daemon_factory(sim_endpoint=f"ipc://{short_tmp}/no-simnet.sock").start()
    env = {**os.environ, "WAPORT_RUN_DIR": d.run_dir}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([WAPORTCTL, *args], env=env, capture_output=True, text=True, timeout=30)

    out = run("token", "create", "--company", "acme", "--expires", "30d")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert re.fullmatch(r"wp_[A-Za-z0-9_-]{43}", token) and "only time the token is shown" in out.stderr
    match = re.match(r"(tok_[0-9a-f]{12}): for company acme, expires ", out.stderr)
    assert match, out.stderr
    token_id = match.group(1)
    out = run("--json", "token", "create")
    admin = json.loads(out.stdout)
    assert admin["company"] is None and admin["expires_at"] is None and admin["token"].startswith("wp_")

    path = os.path.join(d.state_dir, "api-tokens.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as fh:
        stored = fh.read()
    assert token not in stored and admin["token"] not in stored
    reader = TokenReader(path)  # what the API process does
    assert reader.verify(token, time.time()).company == "acme"

    out = run("token", "list")
    assert out.returncode == 0 and token not in out.stdout
    rows = {line.split()[0]: line.split()[1:3] for line in out.stdout.splitlines()[1:]}
    assert rows == {token_id: ["acme", "active"], admin["id"]: ["(all)", "active"]}

    out = run("token", "revoke", token_id)
    assert (out.returncode, out.stdout) == (0, f"{token_id}: revoked\n")
    assert reader.verify(token, time.time()) is None
    assert reader.verify(admin["token"], time.time()) is not None
    listed = json.loads(run("--json", "token", "list").stdout)["tokens"]
    assert {t["id"]: t["state"] for t in listed} == {token_id: "revoked", admin["id"]: "active"}

    out = run("token", "revoke", "tok_000000000000")
    assert out.returncode == 1 and "bad_request: no API token 'tok_000000000000'" in out.stderr
    out = run("token", "create", "--company", "bad id!")
    assert out.returncode == 1 and "invalid_company_id" in out.stderr
    assert run("token", "create", "--expires", "soon").returncode == 2
    logs = d.logs()
    assert token_id in logs and token not in logs and admin["token"] not in logs


SECRET = "whsec_" + "A" * 43 + "="


def test_webhook_set_prints_the_secret_once_and_sends_the_events(run_dir: str,
                                                                 daemon: Callable[..., FakeDaemon]) -> None:
    endpoint = {"company": "acme", "url": "https://h/x", "events": ["message", "sent"], "scope": "company",
                "disabled": None, "previous_secret_valid_until": None}
    fake = daemon(webhook_set={**endpoint, "secret": SECRET, "created": True}, webhook_show=endpoint,
                  webhook_replay={"company": "acme", "replayed": 3})
    result = ctl(run_dir, "webhook", "set", "acme", "https://h/x", "--events", "message,sent")
    assert (result.exit_code, result.stdout) == (0, SECRET + "\n")
    assert "only time the secret is shown" in result.stderr
    shown = ctl(run_dir, "webhook", "show", "acme")
    assert "https://h/x (own)" in shown.stdout and "enabled" in shown.stdout and SECRET not in shown.stdout
    assert ctl(run_dir, "webhook", "replay", "acme", "--since", "1h").stdout == "acme: 3 events to deliver again\n"
    assert ctl(run_dir, "webhook", "replay", "acme").exit_code == 2  # say what to replay
    assert fake.sent() == [("webhook_set", {"company": "acme", "url": "https://h/x", "events": "message,sent"}),
                           ("webhook_show", {"company": "acme"}),
                           ("webhook_replay", {"company": "acme", "dead": False, "since": "1h"})]


def test_webhook_secret_is_made_here_and_deliveries_are_a_table(run_dir: str,
                                                                daemon: Callable[..., FakeDaemon]) -> None:
    made = ctl(run_dir, "webhook", "secret").stdout.strip()
    assert made.startswith("whsec_") and made != ctl(run_dir, "webhook", "secret").stdout.strip()
    daemon(webhook_deliveries={"company": "acme", "endpoint": None, "counts": {"pending": 1, "ok": 0, "dead": 0},
                               "events": [{"id": "evt_1", "seq": 7, "type": "message", "status": "pending",
                                           "attempts": 2, "last_attempt_at": 1_700_000_000.0, "last_status": None,
                                           "last_error": "no answer within 15 s",
                                           "next_attempt_at": 1_700_000_030.0}]})
    lines = ctl(run_dir, "webhooks", "acme").stdout.splitlines()
    assert lines[0] == "acme: no webhook endpoint; pending 1, dead 0, delivered 0"
    assert lines[1].split()[:4] == ["SEQ", "TYPE", "STATUS", "ATTEMPTS"]
    assert lines[2].split()[:4] == ["7", "message", "pending", "2"] and "no answer" in lines[2]


def test_read_and_typing_send_what_was_asked(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(read={"company": "acme", "chat": "15550100001", "read": 2},
                  typing={"company": "acme", "chat": "15550100001", "state": "paused"})
    assert ctl(run_dir, "read", "acme", "+15550100001", "A", "B").stdout == "acme: 2 marked read\n"
    assert ctl(run_dir, "typing", "acme", "15550100001", "--state", "paused").stdout == "acme: paused\n"
    assert ctl(run_dir, "read", "acme", "15550100001").exit_code == 2  # a message id at least
    assert fake.sent() == [("read", {"company": "acme", "chat": "+15550100001", "message_ids": ["A", "B"]}),
                           ("typing", {"company": "acme", "chat": "15550100001", "state": "paused"})]


def test_send_with_a_file_stores_it_first_then_sends_it_by_id(run_dir: str, daemon: Callable[..., FakeDaemon],
                                                               tmp_path: Any) -> None:
    media_id = "ab" * 32
    fake = daemon(media_put={"media_id": media_id, "size": 5, "mimetype": "audio/ogg", "sha256": media_id},
                  send={"message_id": "3EB0A", "status": "queued"})
    voice = tmp_path / "note.ogg"
    voice.write_bytes(b"OggS!")
    result = ctl(run_dir, "send", "acme", "15550100001", "--audio", str(voice), "--voice", "--reply-to", "WA-1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "acme: queued 3EB0A\n"
    (put, put_args), (send, send_args) = fake.sent()
    assert (put, put_args["last"], put_args["mimetype"], put_args["company"]) == (
        "media_put", True, "audio/ogg", "acme")
    assert base64.b64decode(put_args["data"]) == b"OggS!"
    assert (send, send_args) == ("send", {"company": "acme", "to": "15550100001", "type": "audio", "media": media_id,
                                          "voice": True, "reply_to": "WA-1"})


def test_send_location_and_reaction_and_their_usage_errors(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(send={"message_id": "3EB0B", "status": "queued"})
    assert ctl(run_dir, "send", "acme", "15550100001", "The salon", "--location", "52.52,13.405").exit_code == 0
    assert ctl(run_dir, "send", "acme", "15550100001", "--react", "WA-1", "👍").exit_code == 0
    assert fake.sent() == [
        ("send", {"company": "acme", "to": "15550100001", "type": "location", "latitude": 52.52, "longitude": 13.405,
                  "name": "The salon"}),
        ("send", {"company": "acme", "to": "15550100001", "type": "reaction", "message_id": "WA-1", "emoji": "👍"})]
    for args in (["--location", "north"], ["--location", "1,2", "--react", "A", "x"], ["--voice", "hi"], []):
        result = ctl(run_dir, "send", "acme", "15550100001", *args)
        assert result.exit_code == 2, (args, result.output)
    assert len(fake.sent()) == 2  # nothing more was asked of the daemon


def test_media_fetch_says_where_the_file_went_or_why_not(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    outcomes = iter([{"status": "stored", "id": "cd" * 32, "size": 9, "mimetype": "image/jpeg"},
                     {"status": "failed", "id": None, "error": "timeout: slow"}])
    daemon(media_fetch=lambda args: {"company": "acme", "message_id": args["message_id"], "media": next(outcomes)})
    stored = ctl(run_dir, "media", "fetch", "acme", "WA-1")
    assert (stored.exit_code, stored.stdout) == (0, f"WA-1: stored as {'cd' * 32} (9 bytes, image/jpeg)\n")
    failed = ctl(run_dir, "media", "fetch", "acme", "WA-1")
    assert (failed.exit_code, failed.stdout) == (1, "WA-1: failed: timeout: slow\n")


def test_a_message_cell_names_its_kind_before_its_text() -> None:
    assert render.content({"type": "text", "text": "see you\nat 8"}) == "see you at 8"
    assert render.content({"type": "image", "text": "menu", "media": {"status": "stored", "id": "ab" * 32}}) == (
        "[image stored abababababab] menu")
    assert render.content({"type": "audio", "media": {"status": "failed", "id": None}}) == "[audio failed]"
    assert render.content({"type": "document", "media": "cd" * 32, "text": ""}) == "[document cdcdcdcdcdcd]"
    assert render.content({"type": "location", "latitude": 1.5, "longitude": 2.0, "text": "salon"}) == (
        "[location 1.5,2.0] salon")
    assert render.content({"type": "reaction", "emoji": "", "reaction_to": "WA-1"}) == "[reaction (removed) to WA-1]"


def test_start_with_a_proxy_of_its_own(run_dir: str, daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(start=record(state="starting"))
    assert ctl(run_dir, "start", "acme", "--proxy", "socks5://10.0.0.5:1080").exit_code == 0
    assert ctl(run_dir, "start", "acme", "--proxy", "direct").exit_code == 0
    assert fake.sent() == [("start", {"company": "acme", "proxy": "socks5://10.0.0.5:1080"}),
                           ("start", {"company": "acme", "proxy": "direct"})]
