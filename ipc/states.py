"""Session state names (DESIGN.md §3). The transition table lives with the supervisor."""

from __future__ import annotations

STOPPED = "stopped"
STARTING = "starting"
PAIRING = "pairing"
CONNECTING = "connecting"
CONNECTED = "connected"
DISCONNECTED = "disconnected"
BACKOFF = "backoff"
STOPPING = "stopping"
FAILED = "failed"
LOGGED_OUT = "logged_out"
REPLACED = "replaced"
BANNED = "banned"
OUTDATED = "outdated"

ALL = (
    STOPPED,
    STARTING,
    PAIRING,
    CONNECTING,
    CONNECTED,
    DISCONNECTED,
    BACKOFF,
    STOPPING,
    FAILED,
    LOGGED_OUT,
    REPLACED,
    BANNED,
    OUTDATED,
)

# States a worker reports about its backend while it lives.
WORKER_REPORTED = frozenset({PAIRING, CONNECTING, CONNECTED, DISCONNECTED})
# States in which a worker process is alive.
ALIVE = frozenset({STARTING, PAIRING, CONNECTING, CONNECTED, DISCONNECTED, STOPPING})
