"""The worker's sender: drains the journal's queued messages while the session is connected.

It runs on its own thread so a slow send never stalls heartbeats. It sends a window of
messages at a time (the backend's `send_window`: 32 pipelined requests for sim, 1 for
neonize), marked `sending` in one transaction before the backend is called: a crash in
between leaves that mark, and the next start turns it into `uncertain` instead of sending
blindly again. Outcomes are journaled in one transaction per window.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ipc import journal as J
from ipc.errors import NOT_CONNECTED, TIMEOUT
from workers.backend import Backend, BackendError, Emit

log = logging.getLogger("waport.outbox")
RETRY_PAUSE = 0.5


def failure_event(m: J.Outgoing, reason: str, message: str) -> dict[str, Any]:
    return {"message_id": m.message_id, "idempotency_key": m.idempotency_key, "to": m.recipient,
            "reason": reason, "message": message}


class Sender(threading.Thread):
    def __init__(self, journal_path: str, backend: Backend, emit: Emit) -> None:
        super().__init__(name="sender", daemon=True)
        self.journal_path = journal_path
        self.backend = backend
        self.emit = emit
        self.connected = False
        self.stopping = False
        self.wakeup = threading.Event()

    def nudge(self, connected: bool | None = None) -> None:
        if connected is not None:
            self.connected = connected
        self.wakeup.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Let a send in flight finish (bounded), then stop: a clean stop leaves nothing uncertain."""
        self.stopping = True
        self.wakeup.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        journal = J.Journal(self.journal_path)
        try:
            for m in journal.interrupted():
                log.warning("message %s was being sent when the worker ended; marked uncertain", m.message_id)
                self.emit("send_failed", failure_event(m, J.UNCERTAIN, "worker ended during the send; not resent"))
            while not self.stopping:
                self.wakeup.wait(1.0)
                self.wakeup.clear()
                self.drain(journal)
        finally:
            journal.close()

    def drain(self, journal: J.Journal) -> None:
        window = max(1, int(self.backend.send_window))
        while self.connected and not self.stopping:
            batch = journal.queued(window)
            if not batch or not self.send_window(journal, batch):
                return

    def send_window(self, journal: J.Journal, batch: list[J.Outgoing]) -> bool:
        """Send a window of messages; False when the backend was not connected after all (they queue again)."""
        journal.mark_many([(m.message_id, J.SENDING, None, None) for m in batch])
        outcomes = self.backend.send_texts([(m.recipient, m.text, m.message_id) for m in batch])
        marks: list[tuple[str, str, str | None, float | None]] = []
        reports: list[tuple[str, dict[str, Any]]] = []
        requeued = False
        for m, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BackendError) and outcome.code == NOT_CONNECTED:
                marks.append((m.message_id, J.QUEUED, outcome.message, None))  # nothing went out
                requeued = True
            elif isinstance(outcome, BackendError):
                status = J.UNCERTAIN if outcome.code == TIMEOUT else J.SEND_FAILED
                marks.append((m.message_id, status, f"{outcome.code}: {outcome.message}", None))
                reason = status if status == J.UNCERTAIN else outcome.code
                reports.append(("send_failed", failure_event(m, reason, outcome.message)))
            elif isinstance(outcome, Exception):  # unknown outcome: never resend blindly
                log.error("send of %s failed unexpectedly: %r", m.message_id, outcome)
                marks.append((m.message_id, J.UNCERTAIN, str(outcome), None))
                reports.append(("send_failed", failure_event(m, J.UNCERTAIN, str(outcome))))
            else:
                ts = outcome.get("ts") or time.time()
                marks.append((m.message_id, J.SENT, None, ts))
                reports.append(("sent", {"message_id": m.message_id, "wa_id": outcome.get("message_id"),
                                         "idempotency_key": m.idempotency_key, "to": m.recipient, "ts": ts,
                                         "latency": max(0.0, time.time() - m.created)}))
        journal.mark_many(marks)
        for type_, data in reports:
            self.emit(type_, data)
        if requeued:
            # The state report may lag the backend (a drop while we sent): pause, then look again.
            self.wakeup.wait(RETRY_PAUSE)
        return not requeued
