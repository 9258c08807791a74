"""Session states (DESIGN.md §3): one enumeration and the named groups every package uses.

`State` is a `StrEnum`: a member *is* its string, so it goes into JSON, records and metric labels
unchanged. The transition table is the supervisor's (`waportd/transitions.py`); the groups here
are facts about the states themselves that the supervisor, metrics, diagnose and the backends share.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    PAIRING = "pairing"  # QR / pair code waiting
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # worker alive, backend reconnecting; sends queue
    BACKOFF = "backoff"  # worker gone, restart at next_restart_at
    STOPPING = "stopping"
    FAILED = "failed"  # gave up; `waportctl restart` clears it
    LOGGED_OUT = "logged_out"  # device unlinked: pairing again
    REPLACED = "replaced"  # another client took the session
    BANNED = "banned"  # temporary ban: restart after its expiry
    OUTDATED = "outdated"  # client outdated


STOPPED = State.STOPPED
STARTING = State.STARTING
PAIRING = State.PAIRING
CONNECTING = State.CONNECTING
CONNECTED = State.CONNECTED
DISCONNECTED = State.DISCONNECTED
BACKOFF = State.BACKOFF
STOPPING = State.STOPPING
FAILED = State.FAILED
LOGGED_OUT = State.LOGGED_OUT
REPLACED = State.REPLACED
BANNED = State.BANNED
OUTDATED = State.OUTDATED

ALL: tuple[State, ...] = tuple(State)  # table order: the order of `waport_sessions` and STATUS=

# States a worker reports about its backend while it lives (the only ones a worker may report).
WORKER_REPORTED = frozenset({PAIRING, CONNECTING, CONNECTED, DISCONNECTED})
# States in which a worker process is alive.
ALIVE = frozenset({STARTING, STOPPING} | WORKER_REPORTED)
# Where a session can be after its worker has gone: the outcomes of an exit.
EXITED = frozenset({STOPPED, BACKOFF, FAILED, LOGGED_OUT, REPLACED, BANNED, OUTDATED})
# Never restarted automatically: a person acts (`waportctl start`/`restart`, pairing again).
NO_AUTO_RESTART = frozenset({STOPPED, FAILED, LOGGED_OUT, REPLACED, OUTDATED})
# A person must look: /healthz says `degraded` while a session is in one of these.
ATTENTION = frozenset({FAILED, LOGGED_OUT, REPLACED, OUTDATED, BANNED})
# Sends are refused (`not_connected`): nothing would ever send them without a person's action.
REFUSES_SENDS = frozenset({FAILED, LOGGED_OUT, REPLACED, OUTDATED})
# Something went wrong; diagnose lists these transitions as trouble.
TROUBLE = frozenset({BACKOFF} | ATTENTION)
