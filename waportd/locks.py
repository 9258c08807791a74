"""flock-based locks: the daemon singleton and the per-company session locks (DESIGN.md §1).

A lock is an open file description: a worker that inherits the descriptor holds the
session lock as long as it lives, even after its supervisor died. That is the guarantee
that a session is never used by two processes.
"""

from __future__ import annotations

import fcntl
import os


class LockBusy(Exception):
    def __init__(self, path: str, holder: int | None) -> None:
        who = f"pid {holder}" if holder else "another process"
        super().__init__(f"{path} is locked by {who}")
        self.path = path
        self.holder = holder


def read_holder(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


class FileLock:
    """An exclusive, non-blocking flock with the holder's PID written in the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(self.path, read_holder(self.path)) from None
        self.fd = fd
        write_holder(fd, os.getpid())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None


def write_holder(fd: int, pid: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
