"""The session state machine as an explicit table of allowed transitions (supervisord style)."""

from __future__ import annotations

from ipc.states import (
    BACKOFF,
    BANNED,
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    FAILED,
    LOGGED_OUT,
    OUTDATED,
    PAIRING,
    REPLACED,
    STARTING,
    STOPPED,
    STOPPING,
)

# Where a worker can be after it has gone: the outcomes of an exit.
_EXITED = {STOPPED, BACKOFF, FAILED, LOGGED_OUT, REPLACED, BANNED, OUTDATED}
_LIVE = {PAIRING, CONNECTING, CONNECTED, DISCONNECTED}

TRANSITIONS: dict[str, frozenset[str]] = {
    STOPPED: frozenset({STARTING}),
    STARTING: frozenset(_LIVE | _EXITED | {STOPPING}),
    PAIRING: frozenset(_LIVE | _EXITED | {STOPPING}),
    CONNECTING: frozenset(_LIVE | _EXITED | {STOPPING}),
    CONNECTED: frozenset(_LIVE | _EXITED | {STOPPING}),
    DISCONNECTED: frozenset(_LIVE | _EXITED | {STOPPING}),
    BACKOFF: frozenset({STARTING, STOPPED, STOPPING}),
    STOPPING: frozenset({STOPPED, FAILED, LOGGED_OUT, REPLACED, BANNED, OUTDATED, BACKOFF}),
    FAILED: frozenset({STARTING, STOPPED}),
    LOGGED_OUT: frozenset({STARTING, STOPPED}),
    REPLACED: frozenset({STARTING, STOPPED}),
    BANNED: frozenset({STARTING, STOPPED}),
    OUTDATED: frozenset({STARTING, STOPPED}),
}

# Terminal states a human must act on: no automatic restart.
NO_AUTO_RESTART = frozenset({FAILED, LOGGED_OUT, REPLACED, OUTDATED, STOPPED})


class InvalidTransition(ValueError):
    pass


def check(current: str, new: str) -> None:
    """Raise `InvalidTransition` unless the table allows current -> new (a no-op is allowed)."""
    if new != current and new not in TRANSITIONS.get(current, frozenset()):
        raise InvalidTransition(f"{current} -> {new} is not allowed")


def allowed(current: str, new: str) -> bool:
    return new == current or new in TRANSITIONS.get(current, frozenset())
