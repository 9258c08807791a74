"""The `sim` backend against a real simnet process: pairing, credentials, reconnects, faults as
exits, messages both ways, and the double-session detector (a kill is not a double session).

Each backend runs as in the worker: inside a loop (`InlineLoop`, on a thread of its own here) that
polls its sockets and calls `loop_step`; the test thread calls in as the worker's request threads do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from simnet_helpers import EventLog, InlineLoop, SimNetProcess, free_tcp_port, short_tmpdir, spawn_backend, wait_until

from ipc.errors import BAD_REQUEST, NOT_CONNECTED, TIMEOUT
from workers import sim_backend
from workers.backend import BackendError, WorkerContext
from workers.sim_backend import SimBackend

Factory = Callable[..., tuple[InlineLoop, EventLog]]


@pytest.fixture
def session_dir() -> Iterator[str]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_backend(session_dir: str) -> Iterator[Factory]:
    """Build backends started on loops of their own; every loop is stopped at the end of the test."""
    made: list[InlineLoop] = []

    def make(
        endpoint: str, company: str = "acme", directory: str | None = None, **options: Any
    ) -> tuple[InlineLoop, EventLog]:
        log = EventLog()
        ctx = WorkerContext(company, directory or session_dir, {"sim_endpoint": endpoint, **options})
        loop = InlineLoop(log)
        made.append(loop)
        loop.start(SimBackend(ctx, loop.emit))
        return loop, log

    yield make
    for loop in made:
        loop.stop()


def creds(session_dir: str) -> dict[str, Any] | None:
    path = os.path.join(session_dir, "sim-creds.json")
    if not os.path.exists(path):
        return None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        return json.load(f)


def child_connected(net: SimNetProcess, session_dir: str) -> bool:
    """The child is connected and has saved its credentials (the network marks it first)."""
    states = net.call("connections")["states"]
    return states == {"acme": "connected"} and os.path.exists(os.path.join(session_dir, "sim-creds.json"))


def test_auto_pair_saves_credentials_and_a_restart_reuses_them(
    auto_net: SimNetProcess, make_backend: Factory, session_dir: str
) -> None:
    sim, log = make_backend(auto_net.endpoint)
    connected = log.wait_state("connected")
    assert log.of("qr")[0]["code"].startswith("SIMQR:")
    assert log.states() == ["connecting", "pairing", "connected"]
    saved = creds(session_dir)
    assert saved is not None and saved["phone"] == connected["phone"]
    sim.stop()
    sim.backend.stop()  # idempotent
    # bye freed the session: no waiting out the network's liveness timeout (10 s)
    wait_until(lambda: auto_net.connections() == {}, 2.0, "the session freed by bye")
    again, log2 = make_backend(auto_net.endpoint)
    assert log2.wait_state("connected")["phone"] == connected["phone"]
    assert log2.of("qr") == [] and log2.states() == ["connecting", "connected"]
    assert auto_net.stats()["pairings"] == 1 and auto_net.stats()["connects"] == 2


def test_manual_pairing_by_scanning_the_qr(net: SimNetProcess, make_backend: Factory, session_dir: str) -> None:
    sim, log = make_backend(net.endpoint)
    qr = log.wait_for("qr")["code"]
    assert log.wait_state("pairing")["reason"] == "waiting for QR scan"
    assert creds(session_dir) is None
    net.call("scan", qr=qr, phone="15551112222")
    assert log.wait_state("connected")["phone"] == "15551112222"
    assert (creds(session_dir) or {}).get("phone") == "15551112222"


def test_pair_code_only_while_pairing(net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(net.endpoint)
    log.wait_state("pairing")
    code = sim.backend.pair_code("447700900123")
    assert log.of("pair_code") == [{"code": code}]
    net.call("scan", qr=code)
    assert log.wait_state("connected")["phone"] == "447700900123"
    with pytest.raises(BackendError) as err:
        sim.backend.pair_code("447700900123")
    assert err.value.code == BAD_REQUEST


def test_pairing_timeout(net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(net.endpoint, pairing_timeout=0.3)
    assert log.wait_for("exit")["reason"] == "pairing_timeout"
    assert log.states() == ["connecting", "pairing"]


def test_connect_failed_when_no_network(make_backend: Factory, session_dir: str) -> None:
    started = time.monotonic()
    sim, log = make_backend(f"ipc://{session_dir}/nobody.sock", connect_timeout=0.3)
    exit_ = log.wait_for("exit")
    assert exit_["reason"] == "connect_failed" and "0.3 s" in exit_["message"]
    assert time.monotonic() - started < 2
    with pytest.raises(BackendError) as err:
        sim.backend.send_text("15551234567", "hi")
    assert err.value.code == NOT_CONNECTED


def test_a_second_session_replaces_the_first_and_is_counted(
    auto_net: SimNetProcess, make_backend: Factory, session_dir: str
) -> None:
    first, log1 = make_backend(auto_net.endpoint)
    log1.wait_state("connected")
    second, log2 = make_backend(auto_net.endpoint)  # same session dir: same credentials
    log2.wait_state("connected")
    assert log1.wait_for("exit") == {"reason": "replaced"}
    assert auto_net.stats()["replaced"] == 1
    assert auto_net.connections() == {"acme": 1}
    assert creds(session_dir) is not None  # replaced is not logged out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_session_process_is_not_a_double_session(
    auto_net: SimNetProcess, make_backend: Factory, session_dir: str, sig: int
) -> None:
    child = spawn_backend(auto_net.endpoint, "acme", session_dir)
    try:
        wait_until(lambda: child_connected(auto_net, session_dir), 10, "the child's session")
    finally:
        child.send_signal(sig)
        child.wait(5)
    sim, log = make_backend(auto_net.endpoint)  # at once: no waiting for the network to notice
    log.wait_state("connected")
    assert log.of("qr") == []
    stats = auto_net.stats()
    assert stats["replaced"] == 0
    assert stats["disconnects"] == 1
    assert auto_net.connections() == {"acme": 1}


def test_a_stopped_process_over_tcp_goes_silent_and_is_forgotten(make_backend: Factory, session_dir: str) -> None:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    with SimNetProcess(auto_pair=True, endpoint=endpoint, liveness_timeout=1.0) as net:
        child = spawn_backend(endpoint, "acme", session_dir)
        try:
            wait_until(lambda: child_connected(net, session_dir), 10, "the child's session")
            child.send_signal(signal.SIGSTOP)
            wait_until(lambda: net.connections() == {}, 3, "the silent session to be forgotten")
            sim, log = make_backend(endpoint)
            log.wait_state("connected")
            assert net.stats()["replaced"] == 0 and net.stats()["timeouts"] == 1
        finally:
            child.kill()
            child.wait(5)


def test_drop_disconnects_then_reconnects(auto_net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    auto_net.call("drop", company="acme")
    assert log.wait_state("disconnected")["reason"] == "connection lost"
    log.wait_state("connected", nth=2)
    assert log.of("exit") == [] and log.of("reconnect_failed") == []
    assert auto_net.stats()["drops"] == 1 and auto_net.connections() == {"acme": 1}


def test_outage_fails_reconnects_until_it_ends(auto_net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    # Retries at about 0.2 s and 0.6 s after the loss, then 1.4 s: the outage lasts until two have failed.
    auto_net.call("outage", seconds=60)
    log.wait_state("disconnected")
    failed = log.wait_for("reconnect_failed")
    assert failed["attempt"] == 1 and "outage" in failed["error"]
    log.wait_for("reconnect_failed", lambda f: f["attempt"] == 2)
    auto_net.call("outage", seconds=0)
    log.wait_state("connected", nth=2, timeout=10)
    assert [f["attempt"] for f in log.of("reconnect_failed")][:2] == [1, 2]
    assert auto_net.stats()["outage_refusals"] >= 2
    assert log.of("exit") == []


def test_first_connect_refused_by_an_outage_is_connect_failed(auto_net: SimNetProcess, make_backend: Factory) -> None:
    auto_net.call("outage", seconds=30)
    sim, log = make_backend(auto_net.endpoint)
    assert log.wait_for("exit")["reason"] == "connect_failed"


def test_network_logout_fault_is_exit_logged_out(
    auto_net: SimNetProcess, make_backend: Factory, session_dir: str
) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    auto_net.call("logout", company="acme")
    assert log.wait_for("exit") == {"reason": "logged_out"}
    assert creds(session_dir) is None


def test_revoked_credentials_at_hello_are_exit_logged_out(
    auto_net: SimNetProcess, make_backend: Factory, session_dir: str
) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    sim.stop()
    auto_net.call("logout", company="acme")
    again, log2 = make_backend(auto_net.endpoint)
    assert log2.wait_for("exit")["reason"] == "logged_out"
    assert creds(session_dir) is None


def test_replace_fault_is_exit_replaced_but_not_a_double_session(
    auto_net: SimNetProcess, make_backend: Factory
) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    auto_net.call("replace", company="acme")
    assert log.wait_for("exit") == {"reason": "replaced"}
    stats = auto_net.stats()
    assert stats["replace_faults"] == 1 and stats["replaced"] == 0


def test_ban_is_exit_banned_and_refuses_until_it_ends(auto_net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    until = auto_net.call("ban", company="acme", seconds=60)["until"]
    assert log.wait_for("exit") == {"reason": "banned", "until": until}
    sim.stop()
    again, log2 = make_backend(auto_net.endpoint)
    exit_ = log2.wait_for("exit")
    assert exit_["reason"] == "banned" and exit_["until"] == until


def test_backend_logout_unlinks_the_device(auto_net: SimNetProcess, make_backend: Factory, session_dir: str) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    sim.backend.logout()
    assert creds(session_dir) is None
    assert log.wait_for("exit") == {"reason": "logged_out"}
    assert auto_net.call("accounts")["accounts"]["acme"]["linked"] is False
    assert auto_net.connections() == {}


def test_inbound_while_offline_is_delivered_after_connect(auto_net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    phone = log.wait_state("connected")["phone"]
    sim.stop()
    reply = auto_net.call("inbound", company="acme", **{"from": "15557654321"}, text="while away", id="IN1")
    assert reply["delivered"] is False
    again, log2 = make_backend(auto_net.endpoint)
    msg = log2.wait_for("message")
    assert msg == {
        "id": "IN1",
        "chat": "15557654321",
        "from": "15557654321",
        "push_name": "",
        "type": "text",
        "text": "while away",
        "ts": msg["ts"],
        "is_group": False,
    }
    assert auto_net.call("inbound", company="acme", **{"from": "15557654321"}, text="live")["delivered"]
    log2.wait_for("message", lambda m: m["text"] == "live")
    again.stop()
    # Both were acknowledged: a third connection gets nothing again.
    third, log3 = make_backend(auto_net.endpoint)
    assert log3.wait_state("connected")["phone"] == phone
    assert auto_net.stats()["redeliveries"] == 0
    assert log3.of("message") == []


def test_send_text_is_recorded_and_a_receipt_follows(auto_net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    result = sim.backend.send_text("15557654321", "hello", message_id="OUT1")
    assert result["message_id"] == "OUT1" and isinstance(result["ts"], float)
    receipt = log.wait_for("receipt")
    assert receipt == {"ids": ["OUT1"], "type": "delivered", "chat": "15557654321"}
    generated = sim.backend.send_text("15557654321", "again")["message_id"]
    assert generated.startswith("SIM")
    sent = auto_net.call("sent", company="acme")["messages"]
    assert [(m["id"], m["to"], m["text"]) for m in sent] == [
        ("OUT1", "15557654321", "hello"),
        (generated, "15557654321", "again"),
    ]
    with pytest.raises(BackendError) as err:
        sim.backend.send_text("not a phone", "x")
    assert err.value.code == "invalid_phone"


def test_send_text_when_not_connected(net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(net.endpoint)
    log.wait_state("pairing")
    with pytest.raises(BackendError) as err:
        sim.backend.send_text("15557654321", "hello")
    assert err.value.code == NOT_CONNECTED


def test_latency_delays_the_send_reply(auto_net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    auto_net.call("latency", ms=1000)
    started = time.monotonic()
    sim.backend.send_text("15557654321", "slow")
    assert time.monotonic() - started >= 1.0
    assert auto_net.call("ping")["pong"]  # the network itself was never blocked
    auto_net.call("latency", ms=0)
    started = time.monotonic()
    sim.backend.send_text("15557654321", "fast")
    assert time.monotonic() - started < 0.8


def test_a_send_cut_by_a_drop_has_an_unknown_outcome(auto_net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    auto_net.call("latency", ms=2000)
    errors: list[BackendError] = []

    def send() -> None:
        try:
            sim.backend.send_text("15557654321", "cut")
        except BackendError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: auto_net.stats()["messages_sent"] == 1, what="the send to reach the network")
    auto_net.call("drop", company="acme")
    sender.join(3)
    assert [e.code for e in errors] == [TIMEOUT]  # recorded by the network, unanswered: not resent blindly


def test_network_death_is_noticed_and_the_backend_reconnects(
    monkeypatch: pytest.MonkeyPatch, make_backend: Factory
) -> None:
    monkeypatch.setattr(sim_backend, "HEARTBEAT_INTERVAL", 0.2)
    monkeypatch.setattr(sim_backend, "SILENCE_TIMEOUT", 0.8)
    net = SimNetProcess(auto_pair=True)
    try:
        net.start()
        sim, log = make_backend(net.endpoint)
        log.wait_state("connected")
        net.stop(signal.SIGKILL)
        assert log.wait_state("disconnected")["reason"] == "connection lost: no answer from the network"
        net.start()  # the same state dir: the account and its token survive
        log.wait_state("connected", nth=2, timeout=4)
        assert log.of("exit") == []
    finally:
        net.cleanup()


def test_stop_is_prompt_and_idempotent(auto_net: SimNetProcess, make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    started = time.monotonic()
    sim.stop()
    sim.backend.stop()
    assert time.monotonic() - started < 2
    assert auto_net.connections() == {}
    with pytest.raises(BackendError):
        sim.backend.send_text("15557654321", "after stop")


def test_missing_endpoint_is_a_configuration_error(session_dir: str) -> None:
    with pytest.raises(ValueError):
        SimBackend(WorkerContext("acme", session_dir, {}), EventLog())


def test_the_network_forgets_a_message_only_once_it_is_journaled(auto_net: SimNetProcess,
                                                                 make_backend: Factory) -> None:
    sim, log = make_backend(auto_net.endpoint)
    log.wait_state("connected")
    sim.journal = False  # the worker has not committed it yet
    auto_net.call("inbound", company="acme", **{"from": "15550100001"}, text="hello", id="IN-1")
    wait_until(lambda: log.of("message"), 3, "the message")
    auto_net.call("drop", company="acme")  # a crash before the journal's commit, as the network sees it
    log.wait_state("connected", nth=2)
    # the network pushes what it kept right after its hello reply: the message follows "connected"
    wait_until(lambda: len(log.of("message")) >= 2, 3, "the message again")
    assert auto_net.stats()["redeliveries"] == 1 and len(log.of("message")) == 2  # it came again
    assert auto_net.call("pending", company="acme")["ids"] == ["IN-1"]
    sim.backend.journaled(["IN-1"])  # what the worker says after its commit
    wait_until(lambda: auto_net.call("pending", company="acme")["ids"] == [], 5, "the acknowledgement")
    auto_net.call("drop", company="acme")
    log.wait_state("connected", nth=3)
    assert auto_net.stats()["redeliveries"] == 1  # acknowledged: not sent again
