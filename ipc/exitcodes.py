"""Worker exit codes: how a worker tells the supervisor why it ended.

The worker also sends an `exit` event before it ends; the code is the fallback
that still works when the last frame is lost.
"""

from __future__ import annotations

from ipc import states

OK = 0  # stopped on request
CRASH = 1  # uncaught exception: a failure that counts toward max_restarts
USAGE = 64  # bad arguments or configuration: retrying will not help
TEMPFAIL = 75  # network failure (connect failed): retry forever at the cap
LOGGED_OUT = 78
REPLACED = 79
BANNED = 80
OUTDATED = 81
PAIRING_TIMEOUT = 82
SESSION_LOCKED = 83  # the session lock is held by another process
SUPERVISOR_LOST = 84  # the supervisor died or went silent
FENCED = 85  # cluster mode: the lease deadline was near and no newer one came; the session was stopped
FENCED_REASON = "fenced: lease lost"  # the company's reason after it: stopped, the cluster decides what next

# exit code -> (state after exit, reason). Codes not listed are crashes.
TERMINAL = {
    LOGGED_OUT: (states.LOGGED_OUT, "logged_out"),
    REPLACED: (states.REPLACED, "replaced"),
    OUTDATED: (states.OUTDATED, "outdated"),
    PAIRING_TIMEOUT: (states.FAILED, "pairing_timeout"),
    USAGE: (states.FAILED, "usage"),
}

REASON_TO_CODE = {
    "logged_out": LOGGED_OUT,
    "replaced": REPLACED,
    "banned": BANNED,
    "outdated": OUTDATED,
    "pairing_timeout": PAIRING_TIMEOUT,
    "connect_failed": TEMPFAIL,
    "reconnect_failed": TEMPFAIL,
    "database_unavailable": TEMPFAIL,  # cluster mode: PostgreSQL away at start (credentials unread): retried
    "session_locked": SESSION_LOCKED,
    "supervisor_lost": SUPERVISOR_LOST,
    "fenced": FENCED,
    "usage": USAGE,
    "crash": CRASH,
    "stopped": OK,
}


def describe(returncode: int) -> str:
    """A reason string for a raw returncode (negative: killed by a signal)."""
    if returncode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    for reason, code in REASON_TO_CODE.items():
        if code == returncode:
            return reason
    return f"exit {returncode}"
