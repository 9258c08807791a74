import pytest

from ipc import exitcodes
from ipc import states as S
from waportd.backoff import RestartPolicy
from waportd.session import Session, exit_outcome
from waportd.transitions import InvalidTransition

P = RestartPolicy(base_delay=1, factor=2, max_delay=8, jitter=0, reset_after=60, max_restarts=3)


def session(failures=0, spawned_at=1000.0):
    return Session("acme", state=S.CONNECTED, failures=failures, spawned_at=spawned_at)


def test_crash_goes_to_backoff_with_the_computed_delay():
    out = exit_outcome(P, session(failures=2), -9, None, now=1001.0)
    assert out.state == S.BACKOFF and out.failures == 3 and out.delay == 4
    assert out.restart_at == 1005.0 and out.reason == "killed by SIGKILL"


def test_a_long_run_resets_the_count():
    out = exit_outcome(P, session(failures=3), 1, None, now=1000.0 + 61)
    assert out.state == S.BACKOFF and out.failures == 1 and out.delay == 1


def test_crash_loop_gives_up():
    out = exit_outcome(P, session(failures=3), 1, None, now=1001.0)
    assert out.state == S.FAILED and out.restart_at is None
    assert out.reason.startswith("crash loop: 4 consecutive failures")


def test_network_failures_retry_forever_at_the_cap():
    out = exit_outcome(P, session(failures=50), exitcodes.TEMPFAIL,
                       {"reason": "connect_failed", "message": "dns"}, now=1001.0)
    assert out.state == S.BACKOFF and out.delay == 8 and out.reason == "connect_failed: dns"


@pytest.mark.parametrize(
    "code,state,reason",
    [
        (exitcodes.LOGGED_OUT, S.LOGGED_OUT, "logged_out"),
        (exitcodes.REPLACED, S.REPLACED, "replaced"),
        (exitcodes.OUTDATED, S.OUTDATED, "outdated"),
        (exitcodes.PAIRING_TIMEOUT, S.FAILED, "pairing_timeout"),
    ],
)
def test_terminal_exits_do_not_restart(code, state, reason):
    out = exit_outcome(P, session(failures=1), code, None, now=1001.0)
    assert (out.state, out.reason, out.restart_at, out.failures) == (state, reason, None, 1)


def test_ban_restarts_at_its_expiry():
    out = exit_outcome(P, session(), exitcodes.BANNED, {"reason": "banned", "until": 1500.0}, now=1001.0)
    assert out.state == S.BANNED and out.restart_at == 1500.0 and out.delay == 499.0


def test_a_worker_we_killed_is_reported_as_such():
    out = exit_outcome(P, session(), -9, {"reason": "crash"}, now=1001.0, killed_reason="hung")
    assert out.state == S.BACKOFF and out.reason == "hung"


def test_state_changes_follow_the_table():
    s = Session("acme")
    with pytest.raises(InvalidTransition, match="stopped -> connected"):  # no worker, no connection
        s.set_state(S.CONNECTED, "", 1.0)
    assert s.state == S.STOPPED and s.history == []
    assert not s.set_state(S.STOPPED, "", 1.0)  # no change: nothing to say
    assert s.set_state(S.STARTING, "", 1.0) and s.set_state(S.CONNECTED, "", 2.0)
    assert s.connected_at == 2.0 and s.record()["state"] == S.CONNECTED
    assert s.set_state(S.DISCONNECTED, "connection lost", 3.0) and s.connected_at == 2.0
    assert [h[1] for h in s.history] == [S.STARTING, S.CONNECTED, S.DISCONNECTED]
