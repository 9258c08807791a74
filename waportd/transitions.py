"""The session state machine as an explicit table of allowed transitions (supervisord style).

A transition the table refuses is a bug somewhere: the owner of the session (`Company.set_state`)
logs it and counts it in `waport_refused_transitions_total`, and the state stays as it was.
"""

from __future__ import annotations

from ipc.states import (
    ALIVE,
    BACKOFF,
    BANNED,
    EXITED,
    FAILED,
    LOGGED_OUT,
    NO_AUTO_RESTART,
    OUTDATED,
    REPLACED,
    STARTING,
    STOPPED,
    STOPPING,
    WORKER_REPORTED,
    State,
)

_WHILE_ALIVE = frozenset(WORKER_REPORTED | EXITED | {STOPPING})

TRANSITIONS: dict[State, frozenset[State]] = {
    STOPPED: frozenset({STARTING}),
    **{state: _WHILE_ALIVE for state in ALIVE - {STOPPING}},
    BACKOFF: frozenset({STARTING, STOPPED, STOPPING}),
    STOPPING: EXITED,
    FAILED: frozenset({STARTING, STOPPED}),
    LOGGED_OUT: frozenset({STARTING, STOPPED}),
    REPLACED: frozenset({STARTING, STOPPED}),
    BANNED: frozenset({STARTING, STOPPED}),
    OUTDATED: frozenset({STARTING, STOPPED}),
}

assert not any(BACKOFF in TRANSITIONS[s] for s in NO_AUTO_RESTART), "a person's states never restart by themselves"


class InvalidTransition(ValueError):
    def __init__(self, current: str, new: str) -> None:
        super().__init__(f"{current} -> {new} is not allowed")
        self.current = current
        self.new = new


def check(current: str, new: str) -> None:
    """Raise `InvalidTransition` unless the table allows current -> new (staying is always allowed)."""
    if not allowed(current, new):
        raise InvalidTransition(current, new)


def allowed(current: str, new: str) -> bool:
    return new == current or new in TRANSITIONS.get(current, frozenset())  # type: ignore[call-overload]
