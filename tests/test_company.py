"""A company's life by the rules — start, exit, backoff, stop, restart, liveness, requests —
on the real Company and Arbiter with a fake clock, spawner and signals (tests/fakes.py): no process."""

import signal

import pytest
from fakes import rig

from ipc import exitcodes, protocol
from ipc import states as S
from ipc.errors import NOT_CONNECTED, TIMEOUT
from waportd.company import ABORT_GRACE, LOCK_RETRY, MISSED_HEARTBEATS, STARTUP_GRACE
from waportd.locks import FileLock


@pytest.fixture
def r(tmp_path):
    return rig(tmp_path, heartbeat_interval=5.0, stop_timeout=10.0, reconnect_timeout=300.0)


def started(r, name="acme", connect=True):
    company = r.arbiter.roster.want(name)
    company.start()
    r.ready(name)
    if connect:
        r.report(name, S.CONNECTED, phone="15550100001")
    return company


def test_a_start_spawns_one_worker_holding_the_session_lock(r, tmp_path):
    company = started(r)
    assert len(r.spawner.children) == 1
    assert company.state == S.CONNECTED and company.session.pid == r.spawner.children[0].pid
    assert r.states() == [S.STARTING, S.CONNECTED]
    assert "connected" in r.types()
    assert company.lock is not None and company.lock.held
    args = r.spawner.children[0].args
    assert args[args.index("--company") + 1] == "acme"
    company.start()  # a second start while it runs changes nothing
    assert len(r.spawner.children) == 1


def test_ready_asks_the_worker_for_its_outbox_and_heartbeats_follow(r):
    company = started(r, connect=False)
    assert [ident for ident, _ in r.system.sent(protocol.OUTBOX)] == [company.worker.routing_id]
    r.advance(5.0)
    assert r.system.sent(protocol.HEARTBEAT)


def test_a_crash_backs_off_by_the_policy_then_restarts(r):
    company = started(r)
    r.exit("acme", -9)
    assert company.state == S.BACKOFF and company.worker is None and company.session.pid is None
    assert company.session.last_error == "killed by SIGKILL"
    assert company.session.next_restart_at == pytest.approx(r.clock.wall + 1.0)
    r.advance(0.9)
    assert len(r.spawner.children) == 1  # not yet
    r.advance(0.2)
    assert len(r.spawner.children) == 2 and company.state == S.STARTING
    assert company.session.restarts == 1
    assert r.services.counters[("restarts", "acme", "killed by SIGKILL")] == 1
    assert "restart" in r.types()


def test_consecutive_crashes_double_the_delay_and_then_give_up(r):
    company = started(r)
    delays = []
    for _ in range(3):
        r.exit("acme", 1)
        assert company.state == S.BACKOFF
        delays.append(company.session.next_restart_at - r.clock.wall)
        r.advance(delays[-1])
        r.ready()
    assert delays == [1.0, 2.0, 4.0]
    r.exit("acme", 1)
    assert company.state == S.FAILED and company.session.reason.startswith("crash loop: 4 consecutive failures")
    assert company.due is None
    r.advance(3600)
    assert len(r.spawner.children) == 4  # gave up: only a person restarts it


@pytest.mark.parametrize("code,state", [(exitcodes.LOGGED_OUT, S.LOGGED_OUT), (exitcodes.REPLACED, S.REPLACED),
                                        (exitcodes.OUTDATED, S.OUTDATED)])
def test_terminal_exits_never_restart_by_themselves(r, code, state):
    company = started(r)
    r.exit("acme", code)
    assert company.state == state
    r.advance(3600)
    assert len(r.spawner.children) == 1
    assert state in r.types() or state == S.OUTDATED  # logged_out / replaced are events of their own


def test_a_ban_restarts_when_it_expires(r):
    company = started(r)
    r.hear("acme", protocol.EVENT, {"type": "exit", "data": {"reason": "banned", "until": r.clock.wall + 60},
                                    "ts": r.clock.wall})
    r.exit("acme", exitcodes.BANNED)
    assert company.state == S.BANNED
    r.advance(59)
    assert len(r.spawner.children) == 1
    r.advance(1.5)
    assert len(r.spawner.children) == 2


def test_a_stop_terms_the_worker_then_kills_it_after_stop_timeout(r):
    company = started(r)
    pid = company.worker.pid
    company.stop()
    assert company.state == S.STOPPING and r.system.signals == [(pid, signal.SIGTERM)]
    r.advance(9.9)
    assert (pid, signal.SIGKILL) not in r.system.signals
    r.advance(0.2)
    assert r.system.signals[-1] == (pid, signal.SIGKILL)
    r.exit("acme", -9)
    assert company.state == S.STOPPED and company.session.reason == "stopped on request"
    assert company.lock is None  # released: another process may take the session now
    r.advance(3600)
    assert len(r.spawner.children) == 1


def test_a_late_state_report_from_a_stopping_worker_is_ignored(r):
    company = started(r)
    company.stop()
    r.report("acme", S.CONNECTED)
    assert company.state == S.STOPPING
    assert not r.services.counters[("refused_transition", S.STOPPING, S.CONNECTED)]


def test_exit_waiters_hear_once_the_worker_has_gone(r):
    company = started(r)
    heard = []
    company.stop()
    company.when_exited(lambda: heard.append(company.state))
    assert heard == []
    r.exit("acme", 0)
    assert heard == [S.STOPPED]
    company.when_exited(lambda: heard.append("at once"))
    assert heard == [S.STOPPED, "at once"]


def test_restart_keeps_the_lock_and_starts_fresh(r):
    company = started(r)
    for _ in range(2):
        r.exit("acme", 1)
        r.advance(10)
        r.ready()
    assert company.session.failures == 2
    lock = company.lock
    done = []
    company.restart(lambda: done.append(company.state))
    assert company.state == S.STOPPING and done == []
    r.exit("acme", 0)
    assert done == [S.STARTING] and company.session.failures == 0
    assert company.lock is lock and len(r.spawner.children) == 4
    assert r.states()[-3:] == [S.STOPPING, S.STOPPED, S.STARTING]


def test_a_hung_worker_gets_sigabrt_then_sigkill_then_restarts_as_hung(r):
    company = started(r)
    pid = company.worker.pid
    r.advance(MISSED_HEARTBEATS * 5.0 - 1)
    assert r.system.signals == []
    r.advance(1.5)
    assert r.system.signals == [(pid, signal.SIGABRT)]
    assert "health_check_failed" in r.types()
    r.advance(ABORT_GRACE + 0.1)
    assert r.system.signals[-1] == (pid, signal.SIGKILL)
    r.exit("acme", -9)
    assert company.state == S.BACKOFF and company.session.reason == "hung"


def test_a_fresh_worker_gets_a_grace_for_its_first_ready(r):
    company = r.arbiter.roster.want("acme")
    company.start()
    r.advance(MISSED_HEARTBEATS * 5.0 + STARTUP_GRACE - 1)
    assert r.system.signals == []
    r.advance(1.5)
    assert r.system.signals == [(company.worker.pid, signal.SIGABRT)]


def test_any_frame_counts_as_a_sign_of_life(r):
    company = started(r)
    for _ in range(10):
        r.advance(5.0)
        r.hear("acme", protocol.HEARTBEAT, {"queued": 3})
    assert r.system.signals == [] and company.session.queued == 3


def test_disconnected_past_reconnect_timeout_restarts_the_worker(r):
    company = started(r)
    r.report("acme", S.DISCONNECTED, reason="network")
    for _ in range(60):
        r.advance(5.0)
        r.hear("acme", protocol.HEARTBEAT, {})
    assert r.system.signals == []
    r.advance(5.0)
    assert r.system.signals == [(company.worker.pid, signal.SIGTERM)]
    r.exit("acme", 0)
    assert company.state == S.BACKOFF and company.session.reason == "reconnect_timeout"


def test_requests_time_out_and_an_exit_answers_the_rest(r):
    company = started(r)
    replies = []
    company.request("pair_code", {"phone": "1"}, 30.0, replies.append)
    company.request("logout", {}, 60.0, replies.append)
    (rid, _), = [(b["id"], b) for _, b in r.system.sent(protocol.REQUEST) if b["cmd"] == "pair_code"]
    r.advance(30.1)
    assert [x["error"]["code"] for x in replies] == [TIMEOUT]
    r.hear("acme", protocol.REPLY, {"id": rid, "ok": True, "result": {}})  # too late: nobody waits
    assert len(replies) == 1
    r.exit("acme", -9)
    assert [x["error"]["code"] for x in replies] == [TIMEOUT, NOT_CONNECTED]


def test_a_request_to_a_worker_that_is_not_ready_is_refused_at_once(r):
    company = r.arbiter.roster.want("acme")
    company.start()
    replies = []
    company.request("logout", {}, 30.0, replies.append)
    assert replies[0]["error"]["code"] == NOT_CONNECTED


def test_a_busy_session_lock_is_waited_for(r, tmp_path):
    other = FileLock(str(tmp_path / "state" / "sessions" / "acme" / "session.lock"))
    (tmp_path / "state" / "sessions" / "acme").mkdir(parents=True)
    other.acquire()
    company = r.arbiter.roster.want("acme")
    company.start()
    assert company.state == S.STARTING and company.session.reason.startswith("waiting for the session lock")
    assert r.spawner.children == []
    r.advance(LOCK_RETRY + 0.01)
    assert r.spawner.children == []
    other.release()
    r.advance(LOCK_RETRY + 0.01)
    assert len(r.spawner.children) == 1 and company.session.reason == ""


def test_a_failed_spawn_backs_off(r):
    r.spawner.fail = "fork server: no answer"
    company = r.arbiter.roster.want("acme")
    company.start()
    assert company.state == S.BACKOFF and "spawn failed" in company.session.last_error
    r.spawner.fail = None
    r.advance(1.1)
    assert company.state == S.STARTING and len(r.spawner.children) == 1


def test_a_refused_transition_changes_nothing_and_is_counted(r, caplog):
    company = r.arbiter.roster.want("acme")
    assert company.set_state(S.CONNECTED, "impossible") is False
    assert company.state == S.STOPPED
    assert r.services.counters[("refused_transition", S.STOPPED, S.CONNECTED)] == 1
    assert "refused state change stopped -> connected" in caplog.text
    assert r.states() == []


def test_a_worker_of_another_protocol_version_is_restarted_and_not_believed(r):
    company = r.arbiter.roster.want("acme")
    company.start()
    w = company.worker
    r.hear("acme", protocol.READY, {"company": "acme", "pid": w.pid, "version": protocol.VERSION + 1,
                                    "generation": w.generation})
    assert not company.ready and r.system.signals == [(w.pid, signal.SIGTERM)]
    r.report("acme", S.CONNECTED)
    assert company.state == S.STARTING
    r.exit("acme", 0)
    assert company.state == S.BACKOFF and company.session.reason.startswith("protocol_mismatch")


def test_a_stop_while_a_restart_waits_for_the_worker_cancels_the_restart(r):
    company = started(r)
    answers = []
    company.restart(lambda: answers.append(company.state))
    company.stop()
    r.exit("acme", 0)
    assert answers == [S.STOPPED] and company.state == S.STOPPED
    assert company.lock is None and len(r.spawner.children) == 1
    r.advance(3600)
    assert company.worker is None
