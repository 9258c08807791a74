"""Fuzz the control socket and the worker protocol of a live daemon: it answers or drops, and keeps serving."""

from __future__ import annotations

import json
import shutil
import tempfile

import pytest
import zmq
from conftest import Daemon, SimNetProcess, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc import control, protocol
from ipc.errors import CODES

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
requests = st.fixed_dictionaries(
    {"id": st.text(max_size=8), "cmd": st.sampled_from([*control.COMMANDS, "", "nope", "stop "])},
    optional={"args": st.dictionaries(st.sampled_from(["company", "to", "text", "phone", "idempotency_key",
                                                       "limit", "message_id", "x"]), json_values, max_size=4)},
)
SAFE = {"ping", "version", "list", "status", "qr", "metrics", "diagnose", "messages", "send", "pair_code", "health",
        "token_list"}


@pytest.fixture(scope="module")
def live():
    base = tempfile.mkdtemp(prefix="wf-", dir="/tmp")
    net = SimNetProcess(base)
    d = Daemon(base, sim_endpoint=net.endpoint, companies=["acme"], rate_limit_max=1_000_000)
    d.start()
    d.wait_state("acme", "connected")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{d.run_dir}/control.sock")
    yield d, sock
    sock.close(0)
    d.terminate()
    d.cleanup()
    net.stop()
    shutil.rmtree(base, ignore_errors=True)


def ask(sock: zmq.Socket, *frames: bytes) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(10_000), f"no reply to {frames!r}"
    reply = json.loads(sock.recv())
    assert isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert reply["error"]["code"] in CODES and reply["error"]["message"]
    return reply


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_random_bytes_on_the_control_socket(live, raw):
    _, sock = live
    reply = ask(sock, raw)
    assert reply["ok"] is False or raw.strip().startswith(b"{")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests)
def test_random_requests_on_the_control_socket(live, req):
    d, sock = live
    if req["cmd"] not in SAFE:  # lifecycle commands on real sessions are covered elsewhere
        req = {**req, "cmd": "status"}
    reply = ask(sock, json.dumps(req).encode())
    assert reply["id"] == (req["id"] if isinstance(req.get("id"), str) else "")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=64), min_size=0, max_size=5),
       ident=st.binary(min_size=1, max_size=16),
       typed=st.sampled_from(sorted(protocol.TYPES)), body=json_values)
def test_garbage_on_the_worker_socket(live, frames, ident, typed, body):
    d, sock = live
    worker = zmq.Context.instance().socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.setsockopt(zmq.ROUTING_ID, ident)
    worker.connect(f"ipc://{d.run_dir}/workers.sock")
    try:
        if frames:
            worker.send_multipart(frames)
        worker.send_multipart([protocol.HEADER, typed.encode(), json.dumps(body).encode()])
        worker.send_multipart([protocol.HEADER, typed.encode(), b"\xff{"])
    finally:
        worker.close(0)
    assert ask(sock, json.dumps({"id": "p", "cmd": "ping"}).encode())["ok"]


DEEP = (b"[" * 200_000, b'{"a":' * 100_000)


def metric(d: Daemon, name: str, **labels: str) -> float:
    samples = d.ctl("metrics")["metrics"]
    return sum(s["value"] for s in samples if s["name"] == name and labels.items() <= s["labels"].items())


def test_json_nested_too_deeply_on_both_sockets(live):
    """DESIGN.md §9: `bad_request` where someone can be answered, dropped and counted on the worker socket."""
    d, sock = live
    for raw in DEEP:
        reply = ask(sock, raw)
        assert reply["error"] == {"code": "bad_request", "message": "request: JSON nested too deeply"}
    malformed = metric(d, "waport_malformed_frames_total", socket="worker")
    worker = zmq.Context.instance().socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(f"ipc://{d.run_dir}/workers.sock")
    try:
        for raw in DEEP:
            worker.send_multipart([protocol.HEADER, protocol.HEARTBEAT.encode(), raw])
        wait_for(lambda: metric(d, "waport_malformed_frames_total", socket="worker") >= malformed + len(DEEP),
                 what="the deep frames counted as malformed")
    finally:
        worker.close(0)
    assert ask(sock, json.dumps({"id": "p", "cmd": "ping"}).encode())["ok"]


def test_the_daemon_survived_the_fuzzing(live):
    d, _ = live
    assert d.proc.poll() is None
    assert d.status("acme")["state"] == "connected"
    wait_for(lambda: d.ctl("ping")["pong"], what="ping")
    assert metric(d, "waport_loop_errors_total") == 0
