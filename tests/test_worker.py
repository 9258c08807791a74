"""The worker process against a supervisor played by the test: protocol, liveness, the lock."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import pytest
import zmq
from conftest import ROOT, wait_for

from ipc import exitcodes, protocol


class FakeSupervisor:
    """A ROUTER on workers.sock that records what the worker says."""

    def __init__(self, base: str) -> None:
        self.endpoint = f"ipc://{base}/workers.sock"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.ident: bytes | None = None
        self.got: list[protocol.Message] = []

    def pump(self, wait_ms: int = 50) -> None:
        while self.sock.poll(wait_ms):
            ident, *frames = self.sock.recv_multipart()
            self.ident = ident
            self.got += protocol.unbatch(protocol.decode(frames))  # as the supervisor reads them
            wait_ms = 0

    def wait(self, type_: str, pred=lambda body: True, timeout: float = 10) -> protocol.Message:
        def seen():
            self.pump()
            return next((m for m in self.got if m.type == type_ and pred(m.body)), None)

        return wait_for(seen, timeout=timeout, what=f"{type_} from the worker")

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.ident, *frames])

    def close(self) -> None:
        self.sock.close(0)


def spawn_worker(base: str, sup: FakeSupervisor, simnet_endpoint: str, **extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "workers", "--company", "acme", "--generation", "7",
           "--endpoint", sup.endpoint, "--session-dir", os.path.join(base, "sess"), "--backend", "sim",
           "--heartbeat-interval", "0.2", "--options", json.dumps({"sim_endpoint": simnet_endpoint})]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    return subprocess.Popen(cmd, cwd=ROOT)


@pytest.fixture
def sup(short_tmp):
    s = FakeSupervisor(short_tmp)
    yield s
    s.close()


def test_ready_heartbeats_and_requests(short_tmp, sup, simnet):
    # 3 s without a heartbeat before `supervisor_lost`: time to pair on a slow machine before the first one
    proc = spawn_worker(short_tmp, sup, simnet.endpoint, heartbeat_interval="1")
    try:
        ready = sup.wait(protocol.READY)
        assert ready.body == {"company": "acme", "pid": proc.pid, "generation": 7, "version": protocol.VERSION}
        assert sup.ident == b"acme/7"
        sup.wait(protocol.EVENT, lambda b: b["type"] == "state" and b["data"]["state"] == "connected")
        # Garbage from the supervisor is dropped; the worker keeps going.
        for junk in ([b"junk"], [b"WAP1", b"REQUEST", b"{}"], [b"WAP1", b"NOPE", b"{}"]):
            sup.send(*junk)
        sup.send(*protocol.encode(protocol.HEARTBEAT))
        request = {"id": "r1", "cmd": "ping", "args": {}, "deadline": time.time() + 10}
        sup.send(*protocol.encode(protocol.REQUEST, request))
        reply = sup.wait(protocol.REPLY, lambda b: b["id"] == "r1")
        assert reply.body["ok"] and reply.body["result"] == {"pong": True, "state": "connected"}
        expired = {**request, "id": "r2", "deadline": time.time() - 1}
        sup.send(*protocol.encode(protocol.REQUEST, expired))
        assert sup.wait(protocol.REPLY, lambda b: b["id"] == "r2").body["error"]["code"] == "timeout"
        assert proc.poll() is None
        sup.send(*protocol.encode(protocol.STOP, {"reason": "test"}))
        assert proc.wait(10) == exitcodes.OK
        sup.pump()
        assert [m.body["data"]["reason"] for m in sup.got if m.type == "EVENT" and m.body["type"] == "exit"] \
            == ["stopped"]
    finally:
        proc.kill()


def test_reports_behind_the_exit_report_keep_inbound_and_outcomes(short_tmp, sup):
    """A backend may report more after its exit report (neonize's callbacks run on Go's threads): an
    inbound message was acknowledged to the network already, and a send outcome is true."""
    from workers.worker import Worker, parse_args

    os.makedirs(os.path.join(short_tmp, "sess"))  # main() makes it before it builds the Worker
    w = Worker(parse_args(["--company", "acme", "--endpoint", sup.endpoint, "--session-dir",
                           os.path.join(short_tmp, "sess"), "--backend", "sim",
                           "--options", json.dumps({"sim_endpoint": f"ipc://{short_tmp}/nobody.sock"})]))
    try:
        def message(n):
            return {"id": f"in{n}", "chat": "15550001", "from": "15550001", "type": "text", "text": "hi", "ts": 1}

        w.emit("message", message(1))
        w.emit("exit", {"reason": "logged_out", "message": ""})
        w.emit("message", message(2))
        w.emit("exit", {"reason": "crash", "message": "later"})
        w.emit("state", {"state": "disconnected"})
        w.emit("sent", {"message_id": "m1", "to": "15550002", "ts": 1})
        w.flush_reports()
        assert w.exit["reason"] == "logged_out"
        sup.wait(protocol.EVENT, lambda b: b["type"] == "sent")
        assert [(m.body["type"], m.body["data"].get("id")) for m in sup.got if m.type == protocol.EVENT] \
            == [("message", "in1"), ("sent", None)]
        assert {m["id"] for m in w.journal.undelivered()} == {"in1", "in2"}  # in2 waits for the successor
    finally:
        w.sock.close(0)
        w.pool.shutdown()
        w.journal.close()


def test_worker_exits_when_the_supervisor_falls_silent(short_tmp, sup, simnet):
    proc = spawn_worker(short_tmp, sup, simnet.endpoint)
    try:
        sup.wait(protocol.READY)
        # No heartbeats from us: three missed intervals (0.6 s) and the worker gives up.
        assert proc.wait(10) == exitcodes.SUPERVISOR_LOST
    finally:
        proc.kill()


def test_worker_refuses_a_session_locked_by_another_process(short_tmp, sup, simnet):
    session_dir = os.path.join(short_tmp, "sess")
    os.makedirs(session_dir)
    fd = os.open(os.path.join(session_dir, "session.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = spawn_worker(short_tmp, sup, simnet.endpoint)
        assert proc.wait(10) == exitcodes.SESSION_LOCKED
        assert simnet.connections().get("acme", 0) == 0
    finally:
        os.close(fd)


def test_worker_with_a_dead_parent_exits_at_once(short_tmp, sup, simnet):
    # A parent pid that is not ours: the worker must not run orphaned.
    proc = spawn_worker(short_tmp, sup, simnet.endpoint, parent_pid="1")
    assert proc.wait(10) == exitcodes.SUPERVISOR_LOST


def test_backends_are_loaded_by_name():
    from workers.backends import load
    from workers.sim_backend import SimBackend

    assert load("sim") is SimBackend
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        load("bogus")
