import pytest

from ipc import states as S
from waportd import transitions as states


def test_every_state_has_a_row():
    assert set(states.TRANSITIONS) == set(S.ALL)
    for targets in states.TRANSITIONS.values():
        assert targets <= set(S.ALL)


@pytest.mark.parametrize(
    "current,new",
    [
        (S.STOPPED, S.STARTING),
        (S.STARTING, S.PAIRING),
        (S.PAIRING, S.CONNECTED),
        (S.CONNECTED, S.DISCONNECTED),
        (S.DISCONNECTED, S.CONNECTED),
        (S.CONNECTED, S.BACKOFF),
        (S.BACKOFF, S.STARTING),
        (S.CONNECTED, S.STOPPING),
        (S.STOPPING, S.STOPPED),
        (S.FAILED, S.STARTING),
        (S.BANNED, S.STARTING),
        (S.CONNECTED, S.REPLACED),
    ],
)
def test_allowed(current, new):
    states.check(current, new)


@pytest.mark.parametrize(
    "current,new",
    [
        (S.STOPPED, S.CONNECTED),  # no worker, no connection
        (S.BACKOFF, S.CONNECTED),
        (S.FAILED, S.BACKOFF),  # gave up: only a human restarts it
        (S.LOGGED_OUT, S.BACKOFF),
        (S.REPLACED, S.CONNECTING),
        (S.STOPPING, S.CONNECTED),  # a late report from a stopping worker
    ],
)
def test_refused(current, new):
    assert not states.allowed(current, new)
    with pytest.raises(states.InvalidTransition):
        states.check(current, new)


def test_no_auto_restart_states_cannot_reach_backoff():
    for state in S.NO_AUTO_RESTART:
        assert S.BACKOFF not in states.TRANSITIONS[state]
