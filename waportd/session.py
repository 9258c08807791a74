"""One company's session as the supervisor sees it: the record, and what an exit means.

Pure: it knows no process, socket or clock of its own; the arbiter passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ipc import exitcodes
from ipc.states import BACKOFF, BANNED, CONNECTED, DISCONNECTED, FAILED, STOPPED
from waportd import transitions
from waportd.backoff import RestartPolicy

HISTORY = 50


@dataclass
class ExitOutcome:
    """What the supervisor does after a worker ended."""

    state: str
    reason: str
    restart_at: float | None  # None: no automatic restart
    failures: int  # the consecutive-failure count from now on
    delay: float = 0.0


@dataclass
class Session:
    company: str
    state: str = STOPPED
    reason: str = ""
    pid: int | None = None
    since: float = 0.0
    connected_at: float | None = None
    phone: str | None = None
    restarts: int = 0
    failures: int = 0  # consecutive failures: the backoff exponent
    next_restart_at: float | None = None
    last_error: str | None = None
    rss_bytes: int | None = None
    queued: int = 0
    qr: str | None = None
    spawned_at: float = 0.0  # wall clock: how long the last run lasted decides the backoff
    history: list[tuple[float, str, str]] = field(default_factory=list)

    def set_state(self, state: str, reason: str, now: float) -> bool:
        """Apply a transition; False if nothing changed. Raises `InvalidTransition` (and changes
        nothing) when the table refuses it."""
        transitions.check(self.state, state)
        if state == self.state and reason == self.reason:
            return False
        self.state, self.reason, self.since = state, reason, now
        if state == CONNECTED:
            self.connected_at = now
            self.qr = None
        elif state != DISCONNECTED:
            self.connected_at = None
        if state != BACKOFF and state != BANNED:
            self.next_restart_at = None
        self.history.append((now, state, reason))
        del self.history[:-HISTORY]
        return True

    def record(self) -> dict[str, Any]:
        return {
            "company": self.company,
            "state": self.state,
            "reason": self.reason,
            "pid": self.pid,
            "since": self.since,
            "connected_at": self.connected_at,
            "phone": self.phone,
            "restarts": self.restarts,
            "next_restart_at": self.next_restart_at,
            "last_error": self.last_error,
            "rss_bytes": self.rss_bytes,
            "queued": self.queued,
        }


def exit_outcome(
    policy: RestartPolicy,
    session: Session,
    returncode: int,
    exit_info: dict[str, Any] | None,
    now: float,
    killed_reason: str | None = None,
) -> ExitOutcome:
    """Decide the state after an unrequested worker exit (requested stops never get here).

    `exit_info` is the worker's last `exit` event, if it arrived; `killed_reason` is set
    when the supervisor itself killed the worker (hung, health check).
    """
    info = exit_info or {}
    reason = info.get("reason") or exitcodes.describe(returncode)
    code = returncode if returncode >= 0 else None
    if killed_reason:
        reason, code = killed_reason, None
    if code == exitcodes.FENCED:  # its lease ran out (cluster mode): the cluster decides, not our backoff
        return ExitOutcome(STOPPED, exitcodes.FENCED_REASON, None, session.failures)
    if code in exitcodes.TERMINAL:
        state, why = exitcodes.TERMINAL[code]
        why = f"{why}: {info['message']}" if info.get("message") else why
        return ExitOutcome(state, why, None, session.failures)
    if code == exitcodes.BANNED:
        until = info.get("until")
        restart_at = float(until) if isinstance(until, (int, float)) else now + policy.max_delay
        restart_at = max(restart_at, now)
        return ExitOutcome(BANNED, "banned", restart_at, session.failures, restart_at - now)
    network = code == exitcodes.TEMPFAIL
    ran_for = now - session.spawned_at if session.spawned_at else 0.0
    failures = policy.failures_after_exit(session.failures, ran_for)
    if info.get("message") and not killed_reason:
        reason = f"{reason}: {info['message']}"
    if policy.gives_up(failures, network):
        return ExitOutcome(
            FAILED, f"crash loop: {failures} consecutive failures (last: {reason})", None, failures
        )
    delay = policy.delay(failures)
    return ExitOutcome(BACKOFF, reason, now + delay, failures, delay)
