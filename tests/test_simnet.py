"""The simulated network server as a real process: control commands, malformed frames, the
session protocol spoken by a raw DEALER socket, liveness, persistence and shutdown."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from typing import Any

import zmq
from simnet_helpers import SimNetProcess, wait_until

from ipc.errors import BAD_REQUEST, INVALID_COMPANY_ID, INVALID_PHONE, NOT_CONNECTED, UNKNOWN_COMPANY


class RawSession:
    """The session protocol by hand: one DEALER socket, replies and pushes kept apart."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.pushes: list[dict[str, Any]] = []
        self._n = 0

    def send(self, cmd: str, **args: Any) -> str:
        """The request goes out; its id comes back (for a network this test drives itself, not waited on)."""
        self._n += 1
        req_id = f"r{self._n}"
        self.sock.send(json.dumps({"id": req_id, "cmd": cmd, "args": args}).encode())
        return req_id

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        req_id = self.send(cmd, **args)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                msg = json.loads(self.sock.recv())
                if "event" in msg:
                    self.pushes.append(msg)
                elif msg["id"] == req_id:
                    return msg
        raise AssertionError(f"no reply to {cmd}")

    def push(self, event: str, timeout: float = 3.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            while self.sock.poll(0):
                msg = json.loads(self.sock.recv())
                if "event" in msg:
                    self.pushes.append(msg)
            return next((p for p in self.pushes if p["event"] == event), None)

        return wait_until(find, timeout, f"push {event!r}; got {self.pushes}")["data"]

    def pushed(self, event: str) -> list[dict[str, Any]]:
        self.sock.poll(100)
        while self.sock.poll(0):
            msg = json.loads(self.sock.recv())
            if "event" in msg:
                self.pushes.append(msg)
        return [p["data"] for p in self.pushes if p["event"] == event]

    def close(self) -> None:
        self.sock.close(0)


def pair(net: SimNetProcess, company: str) -> tuple[RawSession, str]:
    """A raw session paired through a scanned QR; returns it with its token."""
    s = RawSession(net.endpoint)
    reply = s.request("hello", company=company)
    assert reply["result"]["status"] == "pairing"
    assert reply["result"]["qr"].startswith("SIMQR:")
    net.call("scan", qr=reply["result"]["qr"], phone="+1 (555) 000-1234")
    paired = s.push("paired")
    assert paired["phone"] == "15550001234"
    return s, paired["token"]


def test_control_commands_and_malformed_frames_get_error_replies(net: SimNetProcess) -> None:
    client = net.client
    assert client.call("ping")["pong"] is True
    for frame in (b"\xff\xfe\x00garbage", b"", b"[1, 2]", b'"text"', b"{}", b'{"id": 5, "cmd": "ping"}',
                  b"[" * 200_000, b'{"a":' * 100_000):
        reply = client.call_raw(frame)
        assert reply["ok"] is False and reply["error"]["code"] == BAD_REQUEST, frame
    reply = client.call_raw(b'{"id": "x1", "cmd": "nope"}')
    assert reply == {"id": "x1", "ok": False, "error": {"code": BAD_REQUEST, "message": "unknown command 'nope'"}}
    reply = client.call_raw(b'{"id": "x2", "cmd": "stats", "args": [1]}')
    assert reply["id"] == "x2" and reply["error"]["code"] == BAD_REQUEST
    # A REQ client gets the reply through its empty delimiter frame.
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(net.endpoint)
    req.send(b'{"id": "q", "cmd": "ping"}')
    assert req.poll(3000)
    assert json.loads(req.recv())["result"]["pong"] is True
    req.send(b"not json")
    assert req.poll(3000)
    assert json.loads(req.recv())["error"]["code"] == BAD_REQUEST
    req.close(0)
    assert client.call("ping")["pong"] is True
    stats = net.stats()
    assert stats["bad_requests"] >= 9
    for key in ("replaced", "replace_faults", "connects", "drops", "logouts", "bans", "outage_refusals"):
        assert stats[key] == 0
    assert stats["messages_sent"] == stats["messages_inbound"] == stats["live"] == 0


def test_argument_errors_use_the_protocol_codes(net: SimNetProcess) -> None:
    assert net.error("inbound", company="ghost", **{"from": "15551234567"}, text="hi").code == UNKNOWN_COMPANY
    assert net.error("inbound", company="bad id!", **{"from": "1"}, text="hi").code == INVALID_COMPANY_ID
    assert net.error("logout", company="ghost").code == UNKNOWN_COMPANY
    assert net.error("drop", company="ghost").code == NOT_CONNECTED
    assert net.error("replace", company="ghost").code == NOT_CONNECTED
    assert net.error("scan", qr="SIMQR:nope").code == BAD_REQUEST
    assert net.error("ban", company="acme", seconds="long").code == BAD_REQUEST
    assert net.error("outage", seconds=-1).code == BAD_REQUEST
    assert net.error("latency", ms=True).code == BAD_REQUEST
    assert net.error("sent", company="../x").code == INVALID_COMPANY_ID
    s = RawSession(net.endpoint)
    assert s.request("send", to="15551234567", text="hi")["error"]["code"] == NOT_CONNECTED
    assert s.request("hello", company="a b")["error"]["code"] == INVALID_COMPANY_ID
    s.close()
    s, _ = pair(net, "acme")
    assert net.error("inbound", company="acme", **{"from": "12"}, text="hi").code == INVALID_PHONE
    assert s.request("send", to="nope", text="hi")["error"]["code"] == INVALID_PHONE
    assert s.request("send", to="15551234567", text="")["error"]["code"] == BAD_REQUEST
    assert net.call("ping")["pong"] is True


def test_pairing_by_qr_then_token_login_and_double_session_is_counted(net: SimNetProcess) -> None:
    first, token = pair(net, "acme")
    assert net.call("accounts")["accounts"] == {"acme": {"phone": "15550001234", "linked": True}}
    assert net.connections() == {"acme": 1}
    second = RawSession(net.endpoint)
    reply = second.request("hello", company="acme", token=token)
    assert reply["result"] == {"status": "connected", "phone": "15550001234"}
    assert first.push("replaced") == {}
    assert net.stats()["replaced"] == 1
    assert net.connections() == {"acme": 1}
    assert first.request("heartbeat")["error"]["code"] == NOT_CONNECTED
    assert second.request("heartbeat")["ok"] is True
    bad = RawSession(net.endpoint)
    error = bad.request("hello", company="acme", token="forged")["error"]
    assert error["code"] == NOT_CONNECTED and error["reason"] == "logged_out"
    for s in (first, second, bad):
        s.close()


def test_closed_socket_ends_the_connection_without_counting_replaced(net: SimNetProcess) -> None:
    first, token = pair(net, "acme")
    first.close()  # asynchronous inside this process: wait for it (a dead process's fds close at once)
    wait_until(lambda: net.connections() == {}, 1.0, "the disconnect, long before any liveness timeout")
    second = RawSession(net.endpoint)
    assert second.request("hello", company="acme", token=token)["result"]["status"] == "connected"
    assert net.stats()["disconnects"] == 1
    assert net.stats()["replaced"] == 0
    assert net.connections() == {"acme": 1}
    second.request("bye")
    assert net.connections() == {}
    second.close()


def test_pair_code_then_scan_of_the_code() -> None:
    with SimNetProcess() as net:
        s = RawSession(net.endpoint)
        assert s.request("hello", company="acme")["result"]["status"] == "pairing"
        code = s.request("pair_code", phone="+44 7700 900123")["result"]["code"]
        assert code.startswith("SIMPC-") and len(code) == len("SIMPC-1234-5678")
        assert net.call("scan", qr=code) == {"company": "acme", "phone": "447700900123"}
        assert s.push("paired")["phone"] == "447700900123"
        assert s.request("pair_code", phone="447700900123")["error"]["code"] == NOT_CONNECTED
        s.close()


def test_inbound_is_queued_offline_and_redelivered_until_acknowledged(auto_net: SimNetProcess) -> None:
    s = RawSession(auto_net.endpoint)
    s.request("hello", company="acme")
    token = s.push("paired")["token"]
    s.request("bye")
    s.close()
    reply = auto_net.call("inbound", company="acme", **{"from": "15557654321"}, text="hello", id="M1")
    assert reply == {"id": "M1", "delivered": False}
    s = RawSession(auto_net.endpoint)
    s.request("hello", company="acme", token=token)
    msg = s.push("message")
    assert msg["id"] == "M1" and msg["from"] == "15557654321" and msg["text"] == "hello"
    s.close()  # gone without an ack: the network delivers it again
    s = RawSession(auto_net.endpoint)
    s.request("hello", company="acme", token=token)
    assert s.push("message")["id"] == "M1"
    assert auto_net.stats()["redeliveries"] == 1
    assert s.request("ack", company="acme", ids=["M1"])["ok"] is True
    reply = auto_net.call("inbound", company="acme", **{"from": "15557654321"}, text="again", id="M1")
    assert reply["delivered"] is True
    wait_until(lambda: len(s.pushed("message")) == 2, what="the repeated id delivered again")
    s.request("ack", company="acme", ids=["M1"])
    s.close()
    s = RawSession(auto_net.endpoint)
    s.request("hello", company="acme", token=token)
    assert s.pushed("message") == []
    assert auto_net.stats()["messages_inbound"] == 2
    s.close()


def test_send_is_recorded_and_acknowledged_with_a_receipt(auto_net: SimNetProcess) -> None:
    s = RawSession(auto_net.endpoint)
    s.request("hello", company="acme")
    s.push("paired")
    result = s.request("send", to="+1 555 765 4321", text="hi")["result"]
    assert result["id"].startswith("SIM")
    assert s.push("receipt") == {"ids": [result["id"]], "type": "delivered", "chat": "15557654321"}
    sent = auto_net.call("sent", company="acme")["messages"]
    assert sent == [{"company": "acme", "to": "15557654321", "text": "hi", "id": result["id"], "ts": result["ts"],
                     "type": "text"}]
    assert auto_net.call("sent", company="other")["messages"] == []
    assert auto_net.stats()["messages_sent"] == 1
    s.close()


def test_silent_connection_is_dropped_after_the_liveness_timeout() -> None:
    with SimNetProcess(auto_pair=True, liveness_timeout=0.5) as net:
        s = RawSession(net.endpoint)
        s.request("hello", company="acme")
        assert s.push("dropped", timeout=3) == {"reason": "timeout"}
        assert net.connections() == {}
        assert net.stats()["timeouts"] == 1
        s.close()


def test_state_survives_restart_and_sigterm_exits_cleanly() -> None:
    net = SimNetProcess(auto_pair=True)
    try:
        net.start()
        s = RawSession(net.endpoint)
        s.request("hello", company="acme")
        token = s.push("paired")["token"]
        s.close()
        assert net.stop(signal.SIGTERM) == 0
        sock_path = net.endpoint[len("ipc://") :]
        assert not os.path.exists(sock_path)
        state_file = os.path.join(net.state_dir, "simnet.json")
        assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
        net.start()
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        s = RawSession(net.endpoint)
        assert s.request("hello", company="acme", token=token)["result"]["status"] == "connected"
        s.close()
        assert net.stop(signal.SIGINT) == 0
    finally:
        net.cleanup()


def test_a_second_server_does_not_steal_a_live_endpoint(net: SimNetProcess) -> None:
    cmd = [sys.executable, "-m", "workers.simnet", "--endpoint", net.endpoint, "--state-dir", net.state_dir]
    second = subprocess.run(cmd, capture_output=True, timeout=10)
    assert second.returncode == 1
    assert b"already listens" in second.stderr
    assert net.call("ping")["pong"] is True


def test_a_hello_read_after_its_socket_closed_makes_no_session(short_tmp: str) -> None:
    """A worker that says hello and dies before the answer (killed with its daemon, under load): the network
    reads the hello after the socket closed. No session: its successor's hello is no double session."""
    from workers.simnet import SimNet

    endpoint = f"ipc://{short_tmp}/net.sock"
    net = SimNet(endpoint, short_tmp, auto_pair=True)
    net.bind()
    try:
        dying = RawSession(endpoint)
        dying.send("hello", company="acme")
        wait_until(lambda: net._router.poll(0), 5.0, "the hello at the network")
        wait_until(lambda: net._drain_monitor() or net._fd_gen, 5.0, "the connection seen")
        dying.close()
        # the network's loop sees the close before it reads the hello: the order this test pins down
        wait_until(lambda: net._drain_monitor() or not net._fd_gen, 5.0, "the close seen")
        net._drain_router()
        assert "acme" not in net.live and net.stats.pairings == 0

        successor = RawSession(endpoint)
        successor.send("hello", company="acme")

        def answered() -> bytes | None:
            net._drain_monitor()
            net._drain_router()
            return successor.sock.recv() if successor.sock.poll(0) else None

        assert json.loads(wait_until(answered, 5.0, "the successor's hello answered"))["ok"]
        assert net.live["acme"] and net.stats.replaced == 0
        successor.close()
    finally:
        net.close()
