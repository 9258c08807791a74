"""The worker's sender (workers/outbox.py) against a scripted backend: no process, a real journal."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ipc import journal as J
from ipc.errors import BAD_REQUEST, NOT_CONNECTED, TIMEOUT
from ipc.mediastore import MediaStore
from workers.backend import Backend, BackendError, SendItem, WorkerContext
from workers.outbox import InlineSender, Sender, begin_window


class Scripted(Backend):
    """Answers each send from `script` (text -> outcome); records the windows it was handed."""

    def __init__(self, window: int, script: dict[str, Any] | None = None) -> None:
        super().__init__(WorkerContext("acme", "/nonexistent"), lambda *_: None)
        self.send_window = window
        self.script = script or {}
        self.windows: list[list[str]] = []
        self.statuses_seen: list[set[str]] = []
        self.journal: J.Journal | None = None
        self.items: list[SendItem] = []

    def send_many(self, items: list[SendItem]) -> list[dict[str, Any] | Exception]:
        self.windows.append([item.text for item in items])
        if self.journal is not None:  # what a crash right now would leave behind
            self.statuses_seen.append({m.status for m in self.journal.recent_outbound(100)
                                       if m.text in self.windows[-1]})
        return super().send_many(items)

    def send(self, item: SendItem) -> dict[str, Any]:
        self.items.append(item)
        outcome = self.script.get(item.text, {"message_id": item.message_id, "ts": 1000.0})
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def logout(self) -> None: ...
    def pair_code(self, phone: str) -> str:
        return ""


@pytest.fixture
def journal(tmp_path: Any) -> J.Journal:
    return J.Journal(str(tmp_path / "journal.db"))


def queue(journal: J.Journal, *texts: str) -> None:
    journal.enqueue_many("acme", [("15557654321", t, None, "control") for t in texts])


def sender_for(journal: J.Journal, backend: Scripted) -> tuple[Sender, list[tuple[str, dict[str, Any]]]]:
    reports: list[tuple[str, dict[str, Any]]] = []
    sender = Sender(journal.path, backend, lambda t, d: reports.append((t, d)))
    sender.connected = True
    backend.journal = journal
    return sender, reports


def statuses(journal: J.Journal) -> dict[str, str]:
    return {m.text: m.status for m in journal.recent_outbound(100)}


def test_windows_are_marked_sending_before_they_go_out_and_sent_after(journal: J.Journal) -> None:
    backend = Scripted(window=3)
    queue(journal, *[f"m{i}" for i in range(7)])
    sender, reports = sender_for(journal, backend)
    sender.drain(journal)
    assert backend.windows == [["m0", "m1", "m2"], ["m3", "m4", "m5"], ["m6"]]
    assert backend.statuses_seen == [{J.SENDING}] * 3
    assert set(statuses(journal).values()) == {J.SENT}
    assert [t for t, _ in reports] == ["sent"] * 7
    assert all(d["latency"] >= 0 and d["ts"] == 1000.0 for _, d in reports)


def test_each_outcome_of_a_window_is_its_own(journal: J.Journal) -> None:
    backend = Scripted(window=4, script={
        "lost": BackendError(TIMEOUT, "connection lost before the answer"),
        "bad": BackendError(BAD_REQUEST, "invalid recipient"),
        "bug": RuntimeError("boom"),
    })
    queue(journal, "ok", "lost", "bad", "bug")
    sender, reports = sender_for(journal, backend)
    sender.drain(journal)
    assert statuses(journal) == {"ok": J.SENT, "lost": J.UNCERTAIN, "bad": J.SEND_FAILED, "bug": J.UNCERTAIN}
    assert [(t, d.get("reason")) for t, d in reports] == [
        ("sent", None), ("send_failed", J.UNCERTAIN), ("send_failed", BAD_REQUEST), ("send_failed", J.UNCERTAIN)]


def test_not_connected_queues_the_message_again_and_stops_the_drain(journal: J.Journal) -> None:
    backend = Scripted(window=2, script={"b": BackendError(NOT_CONNECTED, "not connected")})
    queue(journal, "a", "b", "c")
    sender, reports = sender_for(journal, backend)
    sender.wakeup.set()  # no pause in the test: the retry pause waits on this event
    sender.drain(journal)
    assert backend.windows == [["a", "b"]]  # stopped after the window that found no connection
    assert statuses(journal) == {"a": J.SENT, "b": J.QUEUED, "c": J.QUEUED}
    assert [t for t, _ in reports] == ["sent"]


def test_a_window_left_sending_by_a_crash_becomes_uncertain_at_the_next_start(journal: J.Journal) -> None:
    queue(journal, "a", "b", "c")
    begin_window(journal, 2)
    assert [m.text for m in journal.interrupted()] == ["a", "b"]
    assert statuses(journal) == {"a": J.UNCERTAIN, "b": J.UNCERTAIN, "c": J.QUEUED}


class Inline(Scripted):
    """An inline backend: `send_async` keeps the window until the test answers it."""

    runs_inline = True

    def __init__(self, window: int, script: dict[str, Any] | None = None) -> None:
        super().__init__(window, script)
        self.pending: list[tuple[list[SendItem], Any]] = []

    def send_async(self, items: list[SendItem], done: Any) -> None:
        self.windows.append([item.text for item in items])
        self.pending.append((items, done))

    def answer(self) -> None:
        items, done = self.pending.pop(0)
        done(Backend.send_many(self, items))


def inline_sender(journal: J.Journal, backend: Inline) -> tuple[InlineSender, list[tuple[str, dict[str, Any]]]]:
    reports: list[tuple[str, dict[str, Any]]] = []
    sender = InlineSender(journal, backend, lambda t, d: reports.append((t, d)))
    sender.start()
    return sender, reports


def test_inline_sender_keeps_one_window_in_flight_and_moves_on_when_it_is_answered(journal: J.Journal) -> None:
    backend = Inline(window=2)
    queue(journal, "a", "b", "c")
    sender, reports = inline_sender(journal, backend)
    sender.nudge(connected=True)
    sender.nudge()  # more nudges while a window is out send nothing more
    assert backend.windows == [["a", "b"]] and statuses(journal)["a"] == J.SENDING
    backend.answer()
    assert backend.windows == [["a", "b"], ["c"]]
    assert statuses(journal) == {"a": J.SENT, "b": J.SENT, "c": J.SENDING}
    backend.answer()
    assert set(statuses(journal).values()) == {J.SENT} and [t for t, _ in reports] == ["sent"] * 3
    assert not backend.pending


def test_inline_sender_sends_what_was_queued_while_a_window_was_out(journal: J.Journal) -> None:
    backend = Inline(window=4)
    queue(journal, "a")
    sender, reports = inline_sender(journal, backend)
    sender.nudge(connected=True)
    queue(journal, "b")  # committed by the supervisor while "a" is out; its nudge comes now
    sender.nudge()
    backend.answer()
    assert backend.windows == [["a"], ["b"]]
    backend.answer()
    queue(journal, "c")  # no nudge: the sender does not look (the supervisor nudges after each commit)
    assert backend.windows == [["a"], ["b"]] and not backend.pending
    sender.nudge()
    backend.answer()
    assert set(statuses(journal).values()) == {J.SENT} and [t for t, _ in reports] == ["sent"] * 3


def test_inline_sender_pauses_after_not_connected_then_looks_again(journal: J.Journal) -> None:
    backend = Inline(window=4, script={"a": BackendError(NOT_CONNECTED, "not connected")})
    queue(journal, "a")
    sender, _ = inline_sender(journal, backend)
    sender.nudge(connected=True)
    backend.answer()
    assert statuses(journal) == {"a": J.QUEUED}
    wait = sender.tick(time.monotonic())
    assert wait is not None and 0 < wait <= 0.5 and len(backend.windows) == 1  # not before the pause
    backend.script.clear()
    sender.tick(time.monotonic() + 0.5)
    backend.answer()
    assert statuses(journal) == {"a": J.SENT} and len(backend.windows) == 2


def test_a_rich_send_reaches_the_backend_with_its_file_and_the_message_it_quotes(journal: J.Journal, tmp_path) -> None:
    journal.inbox_add({"id": "WA-IN", "chat": "15557654321", "from": "15557654321", "type": "text", "text": "hi",
                       "ts": 1.0})
    media = "cd" * 32
    journal.enqueue("acme", "15557654321", "menu", None, "control", "image",
                    {"media": media, "mimetype": "image/png", "size": 3, "reply_to": "WA-IN"})
    journal.enqueue("acme", "15557654321", "", None, "control", "reaction", {"reaction_to": "WA-IN", "emoji": "👍"})
    backend = Scripted(window=4)
    sender = Sender(journal.path, backend, lambda *_: None, media=MediaStore(str(tmp_path / "media")))
    sender.connected = True
    sender.drain(journal)
    image, reaction = backend.items
    assert image.media_path == str(tmp_path / "media" / "cd" / media)
    assert (image.type, image.fields["mimetype"], image.quoted["id"], image.quoted["from"]) == (
        "image", "image/png", "WA-IN", "15557654321")
    assert (reaction.type, reaction.target["id"], reaction.fields["emoji"], reaction.quoted) == (
        "reaction", "WA-IN", "👍", None)


def test_a_media_send_left_sending_by_a_crash_is_uncertain_not_resent(journal: J.Journal) -> None:
    journal.enqueue("acme", "15557654321", "", None, "control", "image", {"media": "cd" * 32})
    begin_window(journal, 1)
    (lost,) = journal.interrupted()
    assert lost.type == "image" and statuses(journal) == {"": J.UNCERTAIN}
