"""`journal_sync = "full"` (DESIGN.md §2): an accepted send survives a power cut, at a bearable price.

SQLite's own `synchronous=FULL` fsyncs the WAL at every commit, on the thread that commits: about
176 µs each on the supervisor's loop, and a burst across 100 companies commits about once per
message. Here the loop's commits stay `NORMAL` (which survives any process crash), and after each
turn one thread fsyncs the WAL of every journal that turn touched — once per journal, however many
sends it took — several at a time (the filesystem folds concurrent fsyncs into one journal commit),
while the loop goes on. A send is answered, and its worker nudged, only once its journal's WAL is on
disk: `queued` still means durable, now against power loss too.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("waport.messages")

SYNC_THREADS = 8  # fsyncs in flight at once: the filesystem groups them


class GroupSync:
    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.todo: queue.SimpleQueue[tuple[str, Callable[[], None]] | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.fds: dict[str, int] = {}  # WAL path -> an open descriptor (opened by the sync thread only)
        self.pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="fsync")
        self.pending = 0  # answers handed over and not yet taken back (the loop's count)
        self.thread = threading.Thread(target=self.run, name="journal-sync", daemon=True)
        self.thread.start()

    def after(self, journal_path: str, then: Callable[[], None]) -> None:
        """Run `then` on the loop once the journal's last commit is on disk (`take_done`)."""
        self.pending += 1
        self.todo.put((journal_path + "-wal", then))

    def take_done(self) -> None:
        """On the loop: the answers whose fsync is done."""
        while not self.done.empty():
            then = self.done.get_nowait()
            self.pending -= 1
            try:
                then()
            except Exception:  # noqa: BLE001 - one answer's failure is not the others'
                log.exception("answering a synced send failed")

    def run(self) -> None:
        while True:
            first = self.todo.get()
            if first is None:
                return
            batch = [first]
            while not self.todo.empty():  # everything asked meanwhile: one fsync per journal for all of it
                item = self.todo.get_nowait()
                if item is None:
                    self.todo.put(None)
                    break
                batch.append(item)
            paths = list(dict.fromkeys(path for path, _ in batch))
            for path, error in zip(paths, self.pool.map(self.fsync, paths), strict=True):
                if error:
                    log.error("fsync of %s failed: %s", path, error)  # the sends are still committed
            for _, then in batch:
                self.done.put(then)
            self.wake()

    def fsync(self, path: str) -> str | None:
        try:
            fd = self.fds.get(path)
            if fd is not None and os.fstat(fd).st_nlink == 0:  # the WAL was removed and made anew
                os.close(fd)
                fd = None
            if fd is None:
                fd = self.fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            os.fsync(fd)
        except OSError as exc:
            return str(exc)
        return None

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join(5)
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
