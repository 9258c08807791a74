"""The worker's sender: drains the journal's queued messages while the session is connected.

It sends a window of messages at a time (the backend's `send_window`: 32 pipelined requests
for sim, 1 for neonize), marked `sending` in one transaction before the backend is called: a
crash in between leaves that mark, and the next start turns it into `uncertain` instead of
sending blindly again. Outcomes are journaled in one transaction per window.

Two shells around that one policy: `Sender`, a thread for backends whose send blocks (neonize;
a slow send never stalls heartbeats), and `InlineSender`, driven by the worker's loop for
backends that run inside it (sim): no thread hand-off per message.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ipc import journal as J
from ipc.errors import NOT_CONNECTED, TIMEOUT, WaportError
from ipc.mediastore import MediaStore
from workers.backend import Backend, BackendError, Emit, SendItem

log = logging.getLogger("waport.outbox")
RETRY_PAUSE = 0.5
WARN_EVERY = 10.0  # seconds between two warnings of failing journal writes
_warned = {"at": -WARN_EVERY}


def journal_write_failed(exc: Exception) -> None:
    """A journal write failed (a full disk, most likely): nothing is lost, the write is tried again; said
    at most every WARN_EVERY seconds, since it repeats until space returns."""
    now = time.monotonic()
    if now - _warned["at"] >= WARN_EVERY:
        _warned["at"] = now
        log.warning("a journal write failed (%s); nothing is lost, trying again until it succeeds", exc)


def failure_event(m: J.Outgoing, reason: str, message: str) -> dict[str, Any]:
    return {"message_id": m.message_id, "idempotency_key": m.idempotency_key, "to": m.recipient, "type": m.type,
            "reason": reason, "message": message}


Marks = list[tuple[str, str, str | None, float | None, str | None]]
Reports = list[tuple[str, dict[str, Any]]]


def announce_interrupted(journal: J.Journal, emit: Emit) -> bool:
    """After a crash: sends that began but whose outcome is unknown become `uncertain`, and are said so.
    False if the journal could not be written (a full disk): try again later."""
    try:
        interrupted = journal.interrupted()
    except sqlite3.Error as exc:
        journal_write_failed(exc)
        return False
    for m in interrupted:
        log.warning("message %s was being sent when the worker ended; marked uncertain", m.message_id)
        emit("send_failed", failure_event(m, J.UNCERTAIN, "worker ended during the send; not resent"))
    return True


def try_begin_window(journal: J.Journal, window: int) -> list[J.Outgoing] | None:
    """`begin_window`, or None when the journal cannot be written (a full disk): nothing was taken."""
    try:
        return begin_window(journal, window)
    except sqlite3.Error as exc:
        journal_write_failed(exc)
        return None


def begin_window(journal: J.Journal, window: int) -> list[J.Outgoing]:
    """The next queued messages, marked `sending` in one statement before any goes out."""
    return journal.take_queued(max(1, window))


def media_path(store: MediaStore | None, media_id: str) -> str | None:
    """The file a media send reads: in the store, brought there first by a store in PostgreSQL (the file came
    through another host). One it cannot bring: the path, absent, and the send fails with not_found (the
    reason is logged)."""
    if store is None:
        return None
    try:
        return store.local_path(media_id)
    except WaportError as exc:
        log.warning("media %s… could not be brought into this host's store: %s", media_id[:12], exc.message)
        return store.path(media_id)


def items_of(journal: J.Journal, batch: list[J.Outgoing], media: MediaStore | None) -> list[SendItem]:
    """What the backend sends: the journal's rows, their stored file and the messages they quote found."""
    items = []
    for m in batch:
        fields = m.fields
        path = media_path(media, fields["media"]) if fields.get("media") else None
        quoted = journal.reference(fields["reply_to"]) if "reply_to" in fields else None
        target = journal.reference(fields["reaction_to"]) if "reaction_to" in fields else None
        items.append(SendItem(m.recipient, m.text, m.message_id, m.type, fields, path, quoted, target))
    return items


def settle_window(journal: J.Journal, batch: list[J.Outgoing], outcomes: list[Any]) -> tuple[Reports, bool]:
    """Journal each message's outcome (one transaction); the events to report, and whether any queue again."""
    marks: Marks = []
    reports: Reports = []
    requeued = False
    for m, outcome in zip(batch, outcomes, strict=True):
        if isinstance(outcome, BackendError) and outcome.code == NOT_CONNECTED:
            marks.append((m.message_id, J.QUEUED, outcome.message, None, None))  # nothing went out
            requeued = True
        elif isinstance(outcome, BackendError):
            status = J.UNCERTAIN if outcome.code == TIMEOUT else J.SEND_FAILED
            marks.append((m.message_id, status, f"{outcome.code}: {outcome.message}", None, None))
            reason = status if status == J.UNCERTAIN else outcome.code
            reports.append(("send_failed", failure_event(m, reason, outcome.message)))
        elif isinstance(outcome, Exception):  # unknown outcome: never resend blindly
            log.error("send of %s failed unexpectedly: %r", m.message_id, outcome)
            marks.append((m.message_id, J.UNCERTAIN, str(outcome), None, None))
            reports.append(("send_failed", failure_event(m, J.UNCERTAIN, str(outcome))))
        else:
            ts = outcome.get("ts") or time.time()
            wa_id = outcome.get("message_id")
            marks.append((m.message_id, J.SENT, None, ts, wa_id if isinstance(wa_id, str) else None))
            reports.append(("sent", {"message_id": m.message_id, "wa_id": outcome.get("message_id"),
                                     "idempotency_key": m.idempotency_key, "to": m.recipient, "type": m.type,
                                     "ts": ts,
                                     "latency": max(0.0, time.time() - m.created)}))
    journal.mark_many(marks)
    return reports, requeued


IDLE_CLOSE = 30.0  # seconds unused before a journal connection in PostgreSQL closes


class Sender(threading.Thread):
    """For backends whose send blocks: a thread, so heartbeats never wait for a send."""

    def __init__(self, journal: str | Callable[[], J.Journal], backend: Backend, emit: Emit,
                 media: MediaStore | None = None, sync: str = "normal") -> None:
        """`journal`: the SQLite journal's path, or what opens the thread's own journal (cluster mode's in
        PostgreSQL); `sync="full"`: its own connection fsyncs each commit too (journal_sync = "full")."""
        super().__init__(name="sender", daemon=True)
        self.open_journal = (lambda: J.Journal(journal, sync=sync)) if isinstance(journal, str) else journal
        self.media = media
        self.backend = backend
        self.emit = emit
        self.connected = False
        self.stopping = False
        self.wakeup = threading.Event()
        self.gate = threading.Lock()  # held from the `stopping` check to the window's `sending` mark

    def nudge(self, connected: bool | None = None) -> None:
        if connected is not None:
            self.connected = connected
        self.wakeup.set()

    def halt(self) -> None:
        """No new window from the moment this returns (fencing); one in flight goes on."""
        with self.gate:
            self.stopping = True
        self.wakeup.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Let a send in flight finish (bounded), then stop: a clean stop leaves nothing uncertain."""
        self.halt()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        journal = self.open_journal()
        try:
            announced = False
            while not self.stopping:
                announced = announced or announce_interrupted(journal, self.emit)
                if not self.wakeup.wait(1.0):
                    journal.close_if_idle(IDLE_CLOSE)  # cluster mode: an idle sender holds no connection
                self.wakeup.clear()
                self.drain(journal)
        finally:
            journal.close()

    def drain(self, journal: J.Journal) -> None:
        while self.connected and not self.stopping:
            with self.gate:
                batch = None if self.stopping else try_begin_window(journal, self.backend.send_window)
            if not batch or not self.send_window(journal, batch):
                return

    def send_window(self, journal: J.Journal, batch: list[J.Outgoing]) -> bool:
        """Send a window already marked `sending`; False when the backend was not connected after all."""
        items = items_of(journal, batch, self.media)
        outcomes = self.backend.send_many(items)
        while True:  # the outcomes are known: they wait here until the journal takes them (a full disk)
            try:
                reports, requeued = settle_window(journal, batch, outcomes)
                break
            except sqlite3.Error as exc:
                journal_write_failed(exc)
                if self.stopping:
                    return False  # left `sending`: the next start says uncertain, never resends
                time.sleep(RETRY_PAUSE)
        for type_, data in reports:
            self.emit(type_, data)
        if requeued:
            # The state report may lag the backend (a drop while we sent): pause, then look again.
            self.wakeup.wait(RETRY_PAUSE)
        return not requeued


class InlineSender:
    """For backends the worker's loop drives: a window goes out from the loop, its answers come back in it."""

    def __init__(self, journal: J.Journal, backend: Backend, emit: Emit, media: MediaStore | None = None) -> None:
        self.journal = journal
        self.media = media
        self.backend = backend
        self.emit = emit
        self.connected = False
        self.stopping = False
        self.in_flight: list[J.Outgoing] | None = None
        self.retry_at: float | None = None  # monotonic: look again after a not_connected window
        self.announced = False
        self.unsettled: tuple[list[J.Outgoing], list[Any]] | None = None  # outcomes the journal refused
        # Rows may be queued that no window took: set by every nudge (the supervisor nudges after each
        # commit), so a window that ends with nothing new costs no look at the journal.
        self.dirty = True

    def start(self) -> None:
        self.announced = announce_interrupted(self.journal, self.emit)
        if not self.announced:
            self.retry_at = time.monotonic() + RETRY_PAUSE

    def nudge(self, connected: bool | None = None) -> None:
        if connected is not None:
            self.connected = connected
        self.dirty = True
        self.pump()

    def tick(self, now: float) -> float | None:
        """The loop's turn: retry after a pause; the seconds until it wants the next turn."""
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            self.announced = self.announced or announce_interrupted(self.journal, self.emit)
            if self.unsettled is not None:
                self.settle(*self.unsettled)
            else:
                self.pump()
        return None if self.retry_at is None else max(0.0, self.retry_at - now)

    def pump(self) -> None:
        if (not self.dirty or self.in_flight is not None or not self.connected or self.stopping
                or self.retry_at is not None or self.unsettled is not None):
            return
        window = self.backend.send_window
        batch = try_begin_window(self.journal, window)
        if batch is None:
            self.retry_at = time.monotonic() + RETRY_PAUSE
            return
        self.dirty = len(batch) >= window  # a full window: more may wait
        if batch:
            self.in_flight = batch
            self.backend.send_async(items_of(self.journal, batch, self.media), self.on_done)

    def on_done(self, outcomes: list[Any]) -> None:
        batch, self.in_flight = self.in_flight, None
        if batch is not None:
            self.settle(batch, outcomes)

    def settle(self, batch: list[J.Outgoing], outcomes: list[Any]) -> None:
        try:
            reports, requeued = settle_window(self.journal, batch, outcomes)
        except sqlite3.Error as exc:  # kept until the journal takes them; no new window meanwhile
            journal_write_failed(exc)
            self.unsettled = (batch, outcomes)
            self.retry_at = time.monotonic() + RETRY_PAUSE
            return
        self.unsettled = None
        for type_, data in reports:
            self.emit(type_, data)
        if requeued:
            self.dirty = True
            self.retry_at = time.monotonic() + RETRY_PAUSE  # the state report may lag a drop
        else:
            self.pump()

    def halt(self) -> None:
        """No new window from now on (fencing); one in flight goes on. The loop's thread is the only caller."""
        self.stopping = True

    def stop(self, timeout: float = 5.0) -> None:
        """Let the window in flight be answered (bounded): a clean stop leaves nothing uncertain."""
        self.halt()
        deadline = time.monotonic() + timeout
        sockets = self.backend.loop_sockets()
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        while self.in_flight is not None and time.monotonic() < deadline:
            ready = dict(poller.poll(50))
            self.backend.loop_step(ready)
            if self.backend.loop_sockets() != sockets:
                break  # the connection closed: its requests were answered as lost
