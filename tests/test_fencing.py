"""Fencing (DESIGN §12): a worker stops its session before the lease deadline its supervisor's heartbeats
carry, even when no supervisor speaks any more; the daemon stops, never restarts, a fenced company.

Unit tests for the decision, the frame validation, the sender's halt and the company's rules (tests/fakes.py);
end-to-end tests drive a real worker against the standalone simulated network, with the test playing the
supervisor (the FakeSupervisor of test_worker.py) that falls silent as a frozen or cut-off one would.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from conftest import wait_for
from fakes import rig
from test_outbox import Inline, Scripted, inline_sender, queue, sender_for, statuses
from test_worker import FakeSupervisor, spawn_worker

from ipc import exitcodes, protocol
from ipc import journal as J
from ipc import states as S
from workers.fencing import Fence, fence_due

MARGIN = protocol.FENCE_MARGIN


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("now,deadline,due", [
    (100.0, None, False),  # no deadline (single host): never
    (100.0, 110.0, False),
    (108.99, 110.0, False),
    (109.0, 110.0, True),  # exactly the margin before it
    (110.0, 110.0, True),
    (500.0, 110.0, True),  # long past (a worker that was itself stopped)
])
def test_fence_is_due_from_the_margin_before_the_deadline(now, deadline, due):
    assert fence_due(now, deadline, MARGIN) is due


def test_the_newest_deadline_counts_and_a_beat_without_one_never_lifts_it():
    fence = Fence()
    assert fence.seconds_left(0.0) is None and not fence.due(1e9)
    fence.heard(None)
    assert fence.deadline is None
    fence.heard(110.0)
    assert fence.seconds_left(100.0) == pytest.approx(9.0)
    fence.heard(120.0)  # renewed: later
    assert not fence.due(115.0)
    fence.heard(105.0)  # the supervisor knows best: an earlier one is taken too
    assert fence.due(104.0)
    fence.heard(None)  # says nothing about the lease
    assert fence.deadline == 105.0 and fence.seconds_left(200.0) == 0.0


# --------------------------------------------------------------------------- the frame


def heartbeat(raw_body: bytes) -> protocol.Message:
    return protocol.decode([protocol.HEADER, protocol.HEARTBEAT.encode(), raw_body])


def test_a_heartbeat_carries_a_valid_lease_deadline_as_a_float():
    assert heartbeat(b'{"lease_deadline": 1234.5}').body == {"lease_deadline": 1234.5}
    msg = heartbeat(b'{"lease_deadline": 1234}')
    assert msg.body["lease_deadline"] == 1234.0 and isinstance(msg.body["lease_deadline"], float)
    assert msg.dropped == 0
    for body in (b"{}", b'{"lease_deadline": null}', b'{"state": "connected", "queued": 3}'):
        msg = heartbeat(body)
        assert msg.body == json.loads(body) and msg.dropped == 0  # single host: unchanged
    assert protocol.decode(protocol.encode(protocol.HEARTBEAT, {"lease_deadline": 99.25})).body["lease_deadline"] \
        == 99.25


@pytest.mark.parametrize("raw", [b'"soon"', b"true", b"[]", b"{}", b"NaN", b"Infinity", b"-Infinity", b"-5",
                                 b"0", b"1" + b"0" * 400])
def test_a_malformed_lease_deadline_is_dropped_and_counted_never_raised(raw):
    msg = heartbeat(b'{"lease_deadline": ' + raw + b', "x": 1}')
    assert msg.type == protocol.HEARTBEAT and msg.body == {"x": 1} and msg.dropped == 1


def test_the_fenced_exit_code_is_new_and_named():
    codes = [v for k, v in vars(exitcodes).items() if k.isupper() and isinstance(v, int)]
    assert len(codes) == len(set(codes))
    assert exitcodes.describe(exitcodes.FENCED) == "fenced"
    assert exitcodes.REASON_TO_CODE["fenced"] == exitcodes.FENCED
    assert exitcodes.FENCED not in exitcodes.TERMINAL  # handled by its own rule: stopped, not failed


# --------------------------------------------------------------------------- no new window after the decision


def test_a_halted_sender_takes_no_new_window(tmp_path):
    journal = J.Journal(str(tmp_path / "journal.db"))
    backend = Scripted(window=2)
    queue(journal, "a", "b")
    sender, _ = sender_for(journal, backend)
    sender.halt()
    sender.drain(journal)
    assert backend.windows == [] and set(statuses(journal).values()) == {J.QUEUED}

    inline_journal = J.Journal(str(tmp_path / "inline.db"))
    inline = Inline(window=2)
    queue(inline_journal, "c", "d", "e")
    sender2, _ = inline_sender(inline_journal, inline)
    sender2.nudge(connected=True)
    assert inline.windows == [["c", "d"]]
    sender2.halt()
    inline.answer()  # the window in flight is settled; nothing new goes out
    sender2.nudge()
    assert inline.windows == [["c", "d"]] and statuses(inline_journal) == {"c": J.SENT, "d": J.SENT, "e": J.QUEUED}


def test_the_workers_fence_decision_halts_its_sender_and_names_the_reason(short_tmp, caplog):
    from workers.worker import Worker, parse_args

    sup = FakeSupervisor(short_tmp)
    os.makedirs(os.path.join(short_tmp, "sess"))
    w = Worker(parse_args(["--company", "acme", "--endpoint", sup.endpoint, "--session-dir",
                           os.path.join(short_tmp, "sess"), "--backend", "sim",
                           "--options", json.dumps({"sim_endpoint": f"ipc://{short_tmp}/nobody.sock"})]))
    try:
        w.journal.enqueue("acme", "15557654321", "hello", None)
        now = time.monotonic()
        assert not w.fenced(now)  # no deadline heard: as before
        w.fence.heard(now + MARGIN + 5)
        assert not w.fenced(now) and w.exit is None
        w.fence.heard(now + MARGIN - 0.1)
        with caplog.at_level(logging.WARNING, logger="waport.worker"):
            assert w.fenced(now)
        assert w.exit["reason"] == "fenced" and "lease" in w.exit["message"]
        assert [r.levelno for r in caplog.records if "fenced" in r.getMessage()] == [logging.WARNING]
        w.sender.nudge(connected=True)  # the session still says connected: no window all the same
        assert w.sender.in_flight is None and w.journal.pending() == 1
    finally:
        w.sock.close(0)
        w.pool.shutdown()
        w.journal.close()
        sup.close()


# --------------------------------------------------------------------------- the daemon's side


@pytest.fixture
def r(tmp_path):
    return rig(tmp_path, heartbeat_interval=5.0, stop_timeout=10.0, reconnect_timeout=300.0)


def test_heartbeats_carry_the_lease_deadline_the_cluster_gives(r):
    company = r.arbiter.roster.want("acme")
    company.start()
    r.ready()
    r.advance(5.0)
    assert [body for _, body in r.system.sent(protocol.HEARTBEAT)] == [{}]  # single host: none

    deadlines = iter([140.5, 150.5])
    company.lease_deadline = lambda: next(deadlines)
    r.advance(5.0)
    assert company.beat()  # the cluster may push one right after a renewal
    assert [body for _, body in r.system.sent(protocol.HEARTBEAT)][1:] == [{"lease_deadline": 140.5},
                                                                         {"lease_deadline": 150.5}]

    def broken() -> float:
        raise RuntimeError("no lease")

    company.lease_deadline = broken  # a bug there costs the deadline (the worker fences), not the daemon
    r.advance(5.0)
    assert r.system.sent(protocol.HEARTBEAT)[-1][1] == {}
    assert r.services.counters[("loop_errors",)] == 1


def test_a_worker_hears_its_deadline_at_ready_in_cluster_mode(r):
    company = r.arbiter.roster.want("acme")
    company.lease_deadline = lambda: 130.0
    company.start()
    r.ready()
    assert [body for _, body in r.system.sent(protocol.HEARTBEAT)] == [{"lease_deadline": 130.0}]


@pytest.mark.parametrize("state", [S.CONNECTED, S.DISCONNECTED, S.PAIRING, S.STARTING])
def test_a_fenced_company_is_stopped_not_restarted(r, state):
    company = r.arbiter.roster.want("acme")
    company.start()
    if state != S.STARTING:
        r.ready()
        r.report("acme", state)
    r.hear("acme", protocol.EVENT, {"type": "exit", "ts": r.clock.wall,
                                    "data": {"reason": "fenced", "message": "no newer lease deadline"}})
    r.exit("acme", exitcodes.FENCED)
    assert company.state == S.STOPPED and company.session.reason == exitcodes.FENCED_REASON
    assert company.record()["reason"] == "fenced: lease lost" and company.session.next_restart_at is None
    assert company.lock is None  # freed: the cluster decides where it runs next
    assert company.session.failures == 0
    r.advance(3600)
    assert len(r.spawner.children) == 1 and company.state == S.STOPPED
    assert not [k for k in r.services.counters if k[0] == "refused_transition"]
    assert r.services.counters[("exit", "acme", "fenced")] == 1
    company.start()  # the cluster (or a person) starts it again when it holds the lease
    assert len(r.spawner.children) == 2 and company.state == S.STARTING


# --------------------------------------------------------------------------- a real worker


def connected(simnet) -> bool:
    return simnet.connections().get("acme", 0) == 1


def beat(sup: FakeSupervisor, body: dict) -> None:
    sup.send(*protocol.encode(protocol.HEARTBEAT, body))


@pytest.fixture
def sup(short_tmp):
    s = FakeSupervisor(short_tmp)
    yield s
    s.close()


def test_a_worker_whose_supervisor_falls_silent_fences_before_its_deadline(short_tmp, sup, simnet):
    # heartbeat_interval 5 s: `supervisor_lost` would come after 15 s; the lease says 3 s.
    proc = spawn_worker(short_tmp, sup, simnet.endpoint, heartbeat_interval="5")
    try:
        sup.wait(protocol.READY)
        wait_for(lambda: connected(simnet), what="acme connected")
        deadline = time.monotonic() + 3.0
        beat(sup, {"lease_deadline": deadline})  # then silence: a SIGSTOPped or cut-off supervisor
        last_connected = time.monotonic()
        while time.monotonic() < deadline + 5:  # polled: when did the network see the session end?
            if not connected(simnet):
                break
            last_connected = time.monotonic()
            sup.pump(20)
        gone_at = time.monotonic()
        assert gone_at < deadline, f"still connected {gone_at - deadline:.2f} s after the lease deadline"
        assert last_connected >= deadline - MARGIN - 0.5, "fenced long before it was due"
        assert proc.wait(10) == exitcodes.FENCED
        sup.pump()
        exits = [m.body["data"] for m in sup.got if m.type == protocol.EVENT and m.body["type"] == "exit"]
        assert [(e["reason"], e["code"]) for e in exits] == [("fenced", exitcodes.FENCED)]
        warnings = [m.body["msg"] for m in sup.got if m.type == protocol.LOG and "fenced" in m.body["msg"]]
        assert len(warnings) == 1 and "lease" in warnings[0]
        assert simnet.stats().get("replaced", 0) == 0
    finally:
        proc.kill()
        proc.wait(10)


def test_a_worker_whose_deadline_keeps_moving_stays_connected_past_the_first(short_tmp, sup, simnet):
    proc = spawn_worker(short_tmp, sup, simnet.endpoint, heartbeat_interval="5")
    try:
        sup.wait(protocol.READY)
        wait_for(lambda: connected(simnet), what="acme connected")
        first = time.monotonic() + 3.0
        beat(sup, {"lease_deadline": first})
        while time.monotonic() < first + 1.0:  # renewed every ~0.3 s, as a live supervisor would
            sup.pump(300)
            beat(sup, {"lease_deadline": time.monotonic() + 3.0})
        assert proc.poll() is None and connected(simnet)
        sup.send(*protocol.encode(protocol.STOP, {"reason": "test"}))
        assert proc.wait(10) == exitcodes.OK
    finally:
        proc.kill()
        proc.wait(10)


def test_a_worker_without_lease_deadlines_runs_as_before(short_tmp, sup, simnet):
    """Single host: heartbeats without a deadline (or with a malformed one, dropped) never fence."""
    proc = spawn_worker(short_tmp, sup, simnet.endpoint, heartbeat_interval="1")
    try:
        sup.wait(protocol.READY)
        wait_for(lambda: connected(simnet), what="acme connected")
        until = time.monotonic() + 4
        bodies = [{}, {"lease_deadline": None}, {"lease_deadline": "soon"}, {"lease_deadline": -1}]
        turn = 0
        while time.monotonic() < until:  # beats keep it from `supervisor_lost` (3 x 1 s)
            beat(sup, bodies[turn % len(bodies)])
            turn += 1
            sup.pump(200)
        assert proc.poll() is None and connected(simnet)
        warnings = [m.body["msg"] for m in sup.got if m.type == protocol.LOG and "lease_deadline" in m.body["msg"]]
        assert warnings, "a malformed deadline is said"
        sup.send(*protocol.encode(protocol.STOP, {"reason": "test"}))
        assert proc.wait(10) == exitcodes.OK
    finally:
        proc.kill()
        proc.wait(10)
