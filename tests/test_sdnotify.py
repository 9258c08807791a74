"""sd_notify against real datagram sockets: the notifier alone, then a real waportd with NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid

import pytest
from conftest import wait_for

from waportd.sdnotify import Notifier, address_of, status_text

# Linux's SO_TIMESTAMPNS (the same number as its control message type; not exported by Python's socket module).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


class Listener:
    """What systemd does: a bound AF_UNIX datagram socket; collects every notification, each with the time
    the kernel queued it (not when this test got round to reading it: the gaps are the sender's)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address_of(address))
        self.sock.settimeout(0.05)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.kernel_stamps = True
        except OSError:
            self.kernel_stamps = False
        self.messages: list[tuple[float, list[str]]] = []

    def pump(self) -> list[list[str]]:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
            except (TimeoutError, BlockingIOError):
                return [m for _, m in self.messages]
            stamp = time.monotonic()
            if self.kernel_stamps:
                (sec, nsec), = [struct.unpack("qq", raw[:16]) for level, kind, raw in ancdata
                                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS]
                stamp = sec + nsec / 1e9
            self.messages.append((stamp, data.decode().split("\n")))

    def first(self, prefix: str) -> int | None:
        return next((i for i, (_, m) in enumerate(self.messages) if any(f.startswith(prefix) for f in m)), None)

    def close(self) -> None:
        self.sock.close()


def test_status_text_counts_connected_first():
    assert status_text([]) == "no sessions"
    states = ["failed"] + ["connected"] * 42 + ["backoff"] * 3
    assert status_text(states) == "42 connected, 3 backoff, 1 failed"
    assert status_text(["pairing", "stopped"]) == "1 stopped, 1 pairing"


def test_address_forms():
    assert address_of("/run/systemd/notify") == "/run/systemd/notify"
    assert address_of("@abstract/name") == b"\0abstract/name"


def test_notifier_without_socket_is_silent():
    n = Notifier(None)
    assert not n.enabled and not n.send("READY=1")
    n.watchdog(0)
    n.close()


def test_from_env_reads_and_removes_the_variables():
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/h"}
    n = Notifier.from_env(env)
    assert n.address == "/x" and n.watchdog_interval == 1.5
    assert env == {"HOME": "/h"}  # workers must not inherit them
    other = Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is someone else's


@pytest.mark.parametrize("abstract", [False, True])
def test_messages_arrive_in_order_with_throttled_status(tmp_path, abstract):
    address = f"@waport-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    listener = Listener(address)
    n = Notifier(address, watchdog_usec=200_000)
    try:
        n.ready("no sessions")
        n.watchdog(10.0)
        n.watchdog(10.05)  # not due yet: half of 0.2 s has not passed
        n.watchdog(10.1)
        n.status("1 starting", 20.0)
        n.status("1 connecting", 20.2)  # too soon: kept as pending
        n.status("1 connecting", 20.3)
        n.flush_status(21.1)  # due now: the last change goes out
        n.status("1 connecting", 22.0)  # unchanged: nothing
        n.stopping("stopping 1 workers")
        got = wait_for(lambda: len(listener.pump()) >= 6 and listener.pump(), what="six datagrams")
        assert got[0] == ["READY=1", "STATUS=no sessions", f"MAINPID={os.getpid()}"]
        assert got[1:] == [["WATCHDOG=1"], ["WATCHDOG=1"], ["STATUS=1 starting"], ["STATUS=1 connecting"],
                           ["STOPPING=1", "STATUS=stopping 1 workers"]]
    finally:
        n.close()
        listener.close()


def test_a_gone_listener_does_not_hurt(tmp_path):
    n = Notifier(str(tmp_path / "nobody.sock"))
    assert not n.send("READY=1")
    n.ready("x")
    n.close()


def test_daemon_notifies_ready_status_watchdog_and_stopping(daemon_factory, simnet, short_tmp, monkeypatch):
    path = os.path.join(short_tmp, "notify.sock")
    listener = Listener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WATCHDOG=1 every 0.5 s
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme", "bistro"])
    try:
        d.start(wait=False)

        # READY=1 comes once the sockets are bound: the control socket answers at once.
        wait_for(lambda: listener.pump() and listener.first("READY=1") is not None, timeout=15, what="READY=1")
        assert d.ctl("ping", timeout=5)["pid"] == d.proc.pid  # (the first worker's spawn may be under way)
        ready = listener.messages[listener.first("READY=1")][1]
        assert f"MAINPID={d.proc.pid}" in ready

        wait_for(lambda: listener.pump() and listener.first("STATUS=2 connected") is not None, timeout=20,
                 what="STATUS=2 connected")
        wait_for(lambda: sum(m == ["WATCHDOG=1"] for m in listener.pump()) >= 5, what="watchdog pings")
        pings = [t for t, m in listener.messages if m == ["WATCHDOG=1"]]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < 1.0, gaps  # within WATCHDOG_USEC, from the main loop

        # The workers did not inherit the variables (only the main process may notify).
        pid = d.status("acme")["pid"]
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert not [v for v in env if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]

        assert d.terminate() == 0
        listener.pump()
        stopping = listener.first("STOPPING=1")
        assert stopping is not None
        order = [listener.first("READY=1"), listener.first("STATUS=2 connected"), stopping]
        assert order == sorted(order) and order[0] == 0, listener.messages
        assert not any("READY=1" in m for _, m in listener.messages[1:])
    finally:
        listener.close()
