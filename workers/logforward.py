"""A worker's log records travel to the supervisor as LOG frames of the worker protocol.

Why not multiprocessing-logging: it hands records to the parent through a pipe inherited across
`fork`, and workers are not forked but spawned (`python -m workers`: a Go runtime does not
survive fork, DESIGN.md §1); neither do the standard library's queue handlers reach another
interpreter without a transport. The worker protocol already is that transport: one
`LOG {level, name, msg, ts, file, line, func, event?}` frame per record, sent by the worker loop (ZeroMQ sockets are not
thread-safe, so the handler only enqueues), re-emitted by the supervisor through its own handlers
with the company tag (`ipc.logfmt`). Lines written before the worker reached its loop, after it
left it, or when forwarding is congested go to stderr in the same format (the supervisor's
stderr: the same journal).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from ipc import protocol
from ipc.logfmt import CompanyTag, route_stray_output, stderr_handler

MAX_MSG_CHARS = 16_384
MAX_PER_SECOND = 1000  # beyond this, lines go to stderr: a feedback loop cannot grow without bound
# Records about the worker socket itself must not travel over it (a full socket would loop).
NOT_FORWARDED = {("waport.worker", "send_raw")}

Sink = Callable[[list[bytes]], None]


class ForwardHandler(logging.Handler):
    """Turns records into LOG frames for `sink` (thread-safe); stderr when there is no sink."""

    def __init__(self, fallback: logging.Handler, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.fallback = fallback
        self.clock = clock  # the rate's one-second windows
        self.sink: Sink | None = None
        self._window = 0
        self._in_window = 0

    def emit(self, record: logging.LogRecord) -> None:
        sink = self.sink
        if sink is None or (record.name, record.funcName) in NOT_FORWARDED or not self._admit():
            self.fallback.handle(record)
            return
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            if len(msg) > MAX_MSG_CHARS:
                msg = msg[:MAX_MSG_CHARS] + " [truncated]"
            body = {"level": record.levelno, "name": record.name, "msg": msg, "ts": record.created,
                    "file": record.pathname, "line": record.lineno, "func": record.funcName or ""}
            event = getattr(record, "event", None)
            if isinstance(event, str):
                body["event"] = event
            sink(protocol.encode(protocol.LOG, body))
        except Exception:  # noqa: BLE001 - logging must never break the worker
            self.handleError(record)

    def _admit(self) -> bool:
        second = int(self.clock())
        if second != self._window:
            self._window, self._in_window = second, 0
        self._in_window += 1
        return self._in_window <= MAX_PER_SECOND


_handler: ForwardHandler | None = None


def setup(company: str, level: str) -> ForwardHandler:
    """The worker's logging: every record goes through the forwarder, stderr until attached."""
    global _handler
    handler = ForwardHandler(stderr_handler("worker", sys.stderr))  # journald's socket under systemd
    handler.addFilter(CompanyTag(company))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    route_stray_output()  # warnings and uncaught exceptions: records too
    _handler = handler
    return handler


def attach(sink: Sink) -> None:
    """From now on records go to the supervisor through `sink` (it must be thread-safe)."""
    if _handler is not None:
        _handler.sink = sink


def detach() -> None:
    """Back to stderr: the worker loop that sent the frames has ended."""
    if _handler is not None:
        _handler.sink = None
