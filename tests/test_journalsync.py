"""waportd/journalsync.py: answers wait for their journal's fsync, and one fsync serves a whole turn."""

from __future__ import annotations

import os
import threading
import time

from ipc.journal import Journal
from waportd.journalsync import GroupSync


class Counting(GroupSync):
    def __init__(self) -> None:
        self.synced: list[str] = []
        self.gate = threading.Event()
        self.woken = threading.Event()
        super().__init__(self.woken.set)

    def fsync(self, path: str) -> str | None:
        self.gate.wait(10)  # the test decides when the disk answers
        self.synced.append(os.path.basename(os.path.dirname(path)))
        return super().fsync(path)


def journal_in(tmp_path, name: str) -> Journal:
    os.makedirs(tmp_path / name)
    journal = Journal(str(tmp_path / name / "journal.db"))
    journal.enqueue("acme", "15550109999", "hi", None)  # a commit: the WAL exists
    return journal


def test_answers_wait_for_the_fsync_and_one_fsync_serves_every_send_of_a_journal(tmp_path) -> None:
    a, b = journal_in(tmp_path, "a"), journal_in(tmp_path, "b")
    sync = Counting()
    answered: list[str] = []
    try:
        for name, journal in (("a1", a), ("a2", a), ("b1", b), ("a3", a)):
            sync.after(journal.path, lambda name=name: answered.append(name))
        sync.take_done()
        assert answered == [] and sync.pending == 4  # nothing is answered before the disk says so
        sync.gate.set()
        deadline = time.monotonic() + 10
        while len(answered) < 4 and time.monotonic() < deadline:
            sync.woken.wait(0.1)
            sync.woken.clear()
            sync.take_done()
        assert answered == ["a1", "a2", "b1", "a3"] and sync.pending == 0
        assert sorted(sync.synced) in (["a", "b"], ["a", "a", "b"])  # grouped: at most the first alone
        assert len(sync.synced) <= 3
    finally:
        sync.gate.set()
        sync.close()
        a.close()
        b.close()


def test_a_missing_wal_is_logged_and_the_answer_still_comes(tmp_path) -> None:
    sync = GroupSync(lambda: None)
    answered: list[int] = []
    try:
        sync.after(str(tmp_path / "gone" / "journal.db"), lambda: answered.append(1))
        deadline = time.monotonic() + 10
        while not answered and time.monotonic() < deadline:
            time.sleep(0.01)
            sync.take_done()
        assert answered == [1]
    finally:
        sync.close()
