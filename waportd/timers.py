"""Deadlines in one heap, so the loop finds what is due without scanning every company.

The owners keep their own times (a company its restart time, a worker its kill deadline, a request
its deadline); an entry here only says "look at this owner then". An owner that changed its mind
simply ignores the entry when it fires (`Company.on_timer` checks), so nothing is ever removed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Any


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable, Any]] = []
        self._order = itertools.count()  # equal deadlines fire in the order they were set

    def at(self, when: float, owner: Hashable, what: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._order), owner, what))

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[tuple[float, Hashable, Any]]:
        """Take every entry due by `now`: (when, owner, what), earliest first."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            when, _, owner, what = heapq.heappop(self._heap)
            out.append((when, owner, what))
        return out

    def push_back(self, entries: list[tuple[float, Hashable, Any]]) -> None:
        """Return taken entries unfired (the loop paces some work over several turns)."""
        for when, owner, what in entries:
            self.at(when, owner, what)
