"""The one small interface between the worker loop and a WhatsApp backend.

The worker loop does not know which backend runs, only which of two ways its connection runs:

- on threads of its own (neonize: whatsmeow's Go threads run our callbacks): `start()` returns
  at once; the worker's sender thread calls the blocking `send_many`;
- inside the worker's loop (`runs_inline`: sim): `start()` opens the connection, then the loop
  polls `loop_sockets()`, calls `loop_step` every turn and sends with `send_async`.

Either way, request threads may call `pair_code` and `logout` (an inline backend hands them to
the loop), and a backend reports through `emit`, which is thread-safe and only enqueues.

Reports a backend makes with ``emit(type, data)``:

- ``state``   ``{"state": one of ipc.states.WORKER_REPORTED, "reason": str, "phone"?: str}``
- ``qr``      ``{"code": str}``                      (also put the state to ``pairing``)
- ``pair_code`` ``{"code": str}``
- ``message`` ``{"id", "chat", "from", "push_name", "type", "text", "ts", "is_group"}`` and, by type
  (DESIGN.md §11), ``reply_to``, ``latitude``/``longitude``/``name``, ``reaction_to``/``emoji``; a media
  message adds ``media {mimetype, size, filename?, sha256?}`` and ``_fetch``, a JSON value only the
  backend reads: the worker journals the message, then calls `fetch_media(_fetch, write)`.
- ``receipt`` ``{"ids": [str], "type": str, "chat": str}``
- ``error``   ``{"kind": str, "message": str}``
- ``reconnect_failed`` ``{"attempt": int, "error": str}`` (sim: one retry failed; it goes on retrying)
- ``exit``    ``{"reason": str, "until"?: float}`` — the session cannot go on in this
  process: the worker stops the backend and exits with the code for `reason`
  (see `ipc.exitcodes.REASON_TO_CODE`: logged_out, replaced, banned, outdated,
  pairing_timeout, connect_failed, ...).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ipc.errors import NOT_IMPLEMENTED

Emit = Callable[[str, dict[str, Any]], None]


class Phase(StrEnum):
    """A backend's own phase beyond the session states it reports (those are `ipc.states`)."""

    EXITED = "exited"  # the exit report went out, or the backend stopped: it reports nothing more


@dataclass
class WorkerContext:
    company: str
    session_dir: str  # 0700, owned by this worker; credentials live here
    options: dict[str, Any] = field(default_factory=dict)  # e.g. sim_endpoint, pairing_timeout


@dataclass(frozen=True)
class SendItem:
    """One message to send: what the journal holds, with what it refers to resolved for the backend."""

    to: str
    text: str
    message_id: str | None = None
    type: str = "text"
    fields: dict[str, Any] = field(default_factory=dict)  # the type's (DESIGN.md §11): media, mimetype, ...
    media_path: str | None = None  # the stored file of a media send
    quoted: dict[str, Any] | None = None  # the message `reply_to` names (`Journal.reference`)
    target: dict[str, Any] | None = None  # the message a reaction is to


Outcome = dict[str, Any] | Exception


class BackendError(Exception):
    """A failed backend call; `code` is a control-protocol error code (e.g. not_connected)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Backend(abc.ABC):
    def __init__(self, ctx: WorkerContext, emit: Emit) -> None:
        self.ctx = ctx
        self.emit = emit

    @abc.abstractmethod
    def start(self) -> None:
        """Begin connecting (or pairing); return at once. An inline backend goes on in `loop_step`."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Close the connection and release resources; idempotent, bounded in time."""

    @abc.abstractmethod
    def send(self, item: SendItem) -> dict[str, Any]:
        """Send and return ``{"message_id": str, "ts": float}``; raise `BackendError`.

        Blocking; called from a thread pool, never from the backend's own callbacks.
        """

    def send_text(self, to: str, text: str, message_id: str | None = None) -> dict[str, Any]:
        return self.send(SendItem(to, text, message_id))

    # Sends the backend can have in flight at once. The sender marks a whole window `sending` before
    # it goes out, so a crash makes up to this many `uncertain`: 1 unless the backend pipelines.
    send_window = 1

    def send_many(self, items: list[SendItem]) -> list[Outcome]:
        """One outcome per item, in order: a `send` result or the error."""
        out: list[Outcome] = []
        for item in items:
            try:
                out.append(self.send(item))
            except Exception as exc:  # noqa: BLE001 - the sender decides what each failure means
                out.append(exc)
        return out

    # A backend that runs inside the worker's loop (no thread of its own) says so; the worker
    # then polls `loop_sockets()`, calls `loop_step` every turn and sends with `send_async`.
    runs_inline = False

    def loop_sockets(self) -> list[Any]:
        """What the loop polls for an inline backend (zmq sockets, file descriptors)."""
        return []

    def loop_step(self, ready: Any) -> float | None:
        """One turn after the loop's poll (`ready`: what it found readable); seconds until the next."""
        return None

    def send_async(self, items: list[SendItem], done: Callable[[list[Outcome]], None]) -> None:
        """Inline only, on the loop's thread: send now; `done(outcomes)` once all are answered."""
        raise NotImplementedError

    @abc.abstractmethod
    def logout(self) -> None:
        """Unlink the device and delete the stored credentials."""

    def mark_read(self, chat: str, message_ids: list[str], senders: dict[str, str]) -> None:
        """Mark messages of `chat` read; `senders` names who sent each (a group's receipts need it)."""
        raise BackendError(NOT_IMPLEMENTED, f"the {type(self).__name__} cannot mark messages read")

    def typing(self, chat: str, state: str) -> None:
        """Show `composing`, `recording` or `paused` to `chat`."""
        raise BackendError(NOT_IMPLEMENTED, f"the {type(self).__name__} cannot show typing")

    def journaled(self, ids: list[str]) -> None:  # noqa: B027 - most backends have nothing to do
        """The worker journaled these inbound messages: only now may the network hear they arrived (an
        acknowledgement before the journal's commit would lose them to a crash in between). Any thread."""

    # Downloads at once (workers/mediafetch.py): each may hold its file in memory while it runs.
    download_concurrency = 2

    def fetch_media(self, handle: Any, write: Callable[[bytes], None]) -> None:
        """Download an inbound message's media (`handle`: its `_fetch`), passing the bytes to `write` in
        chunks of at most 1 MiB; blocking, bounded in time; raise `BackendError`."""
        raise BackendError(NOT_IMPLEMENTED, f"the {type(self).__name__} cannot download media")

    @abc.abstractmethod
    def pair_code(self, phone: str) -> str:
        """Request a phone-number pair code while pairing; raise `BackendError` otherwise."""

