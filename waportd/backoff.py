"""Restart policy (DESIGN.md §3): pure functions, no clock, no randomness of their own."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    base_delay: float = 5.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.2
    reset_after: float = 60.0
    max_restarts: int = 10

    def delay(self, failures: int, rand: float | None = None) -> float:
        """Delay before the restart that follows the `failures`-th consecutive failure.

        `rand` in [0, 1) picks the jitter; 0.5 means none. `min(max, base * factor**(n-1)) * (1 ± jitter)`.
        """
        n = max(1, failures)
        try:
            raw = self.base_delay * self.factor ** (n - 1)
        except OverflowError:
            raw = self.max_delay
        capped = min(self.max_delay, raw)
        r = random.random() if rand is None else rand
        return max(0.0, capped * (1 + self.jitter * (2 * r - 1)))

    def bounds(self, failures: int) -> tuple[float, float]:
        """The interval the jittered delay falls in: what a test or a user can check."""
        return self.delay(failures, 0.0), self.delay(failures, 1.0)

    def failures_after_exit(self, failures: int, ran_for: float) -> int:
        """The consecutive-failure count after a failed run of `ran_for` seconds."""
        if ran_for >= self.reset_after:
            return 1
        return failures + 1

    def gives_up(self, failures: int, network: bool) -> bool:
        """Network failures (exit 75) retry forever at the cap; others give up past max_restarts."""
        return not network and failures > self.max_restarts
