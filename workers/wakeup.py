"""A pipe that wakes a poll loop from other threads, written at most once per drain."""

from __future__ import annotations

import os


class Wakeup:
    """`poke()` from any thread; the loop polls `r` and calls `drain()` before it reads its queues."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending = False

    def poke(self) -> None:
        if self.pending:
            return  # the loop has not drained since the last poke: it will see this work too
        self.pending = True
        try:
            os.write(self.w, b"x")
        except OSError:
            pass  # full (the loop is due to wake anyway) or closed

    def drain(self) -> None:
        self.pending = False  # before the caller reads its queues: work queued from now on pokes again
        try:
            while os.read(self.r, 4096):
                pass
        except OSError:
            pass  # empty (BlockingIOError) or closed

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.r = self.w = -1
