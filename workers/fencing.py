"""Fencing in the worker (DESIGN §12): stop the session before its lease can expire.

In cluster mode the supervisor's heartbeats carry the lease deadline (an absolute
time.monotonic() value). The worker keeps the newest one and ends its session FENCE_MARGIN
seconds before it, by itself: a supervisor that is frozen (SIGSTOP) or cut from PostgreSQL sends
nothing newer, and another host may claim the company once the lease has expired. Pure: the
worker's loop passes `now`.
"""

from __future__ import annotations

from ipc.protocol import FENCE_MARGIN


def fence_due(now: float, deadline: float | None, margin: float = FENCE_MARGIN) -> bool:
    """True when the session must stop now: within `margin` of the deadline, or past it."""
    return deadline is not None and now >= deadline - margin


class Fence:
    """The newest lease deadline heard; None outside cluster mode (no fencing, as before)."""

    def __init__(self, margin: float = FENCE_MARGIN) -> None:
        self.margin = margin
        self.deadline: float | None = None

    def heard(self, deadline: float | None) -> None:
        """A heartbeat's deadline. The newest wins, later or earlier (the supervisor knows best); a beat
        without one says nothing about the lease and never lifts a deadline already set."""
        if deadline is not None:
            self.deadline = deadline

    def due(self, now: float) -> bool:
        return fence_due(now, self.deadline, self.margin)

    def seconds_left(self, now: float) -> float | None:
        """Seconds until the session must stop (0 if now); None when there is no deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.margin - now)
