"""The worker's sender: drains the journal's queued messages while the session is connected.

It runs on its own thread so a slow send never stalls heartbeats. Every send is marked
`sending` before the backend is called: a crash in between leaves that mark, and the next
start turns it into `uncertain` instead of sending blindly again.
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
        while self.connected and not self.stopping:
            batch = journal.queued(50)
            if not batch:
                return
            for m in batch:
                if not self.connected or self.stopping:
                    return
                if not self.send_one(journal, m):
                    break

    def send_one(self, journal: J.Journal, m: J.Outgoing) -> bool:
        """False when the backend was not connected after all (the message is queued again)."""
        journal.mark(m.message_id, J.SENDING)
        try:
            sent = self.backend.send_text(m.recipient, m.text, m.message_id)
        except BackendError as exc:
            if exc.code == NOT_CONNECTED:  # nothing went out: it stays queued for the next connection
                journal.mark(m.message_id, J.QUEUED, exc.message)
                # The state report may lag the backend (a drop while we sent): pause, then look again.
                self.wakeup.wait(RETRY_PAUSE)
                return False
            status = J.UNCERTAIN if exc.code == TIMEOUT else J.SEND_FAILED
            journal.mark(m.message_id, status, f"{exc.code}: {exc.message}")
            self.emit("send_failed", failure_event(m, status if status == J.UNCERTAIN else exc.code, exc.message))
            return True
        except Exception as exc:  # noqa: BLE001 - unknown outcome: never resend blindly
            log.exception("send of %s failed unexpectedly", m.message_id)
            journal.mark(m.message_id, J.UNCERTAIN, str(exc))
            self.emit("send_failed", failure_event(m, J.UNCERTAIN, str(exc)))
            return True
        ts = sent.get("ts") or time.time()
        journal.mark(m.message_id, J.SENT, None, ts)
        self.emit("sent", {"message_id": m.message_id, "wa_id": sent.get("message_id"),
                           "idempotency_key": m.idempotency_key, "to": m.recipient, "ts": ts,
                           "latency": max(0.0, time.time() - m.created)})
        return True
