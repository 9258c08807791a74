"""Subscribing to the daemon's public events (DESIGN.md §4).

The SUB prefix narrows what the daemon sends; the exact company and type are checked again
here, because a topic prefix alone cannot express "this type, any company".
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import zmq

from ipc import events, jsonsafe, paths
from ipc.control import DaemonUnreachable

POLL_MS = 200  # how often the loop wakes, so Ctrl-C is seen promptly


class EventStream:
    """A SUB socket on `ipc://RUN_DIR/events.sock`, yielding `(raw_json, event)` pairs."""

    def __init__(self, run_dir: str, company: str | None = None, type_: str | None = None) -> None:
        self.endpoint = paths.endpoint(run_dir, paths.EVENTS_SOCK)
        self.path = paths.ipc_path(self.endpoint) or self.endpoint
        self.company = company
        self.type = type_
        self.malformed = 0
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None

    def open(self) -> EventStream:
        """Connect; raises `DaemonUnreachable` when the socket file is missing."""
        if not os.path.exists(self.path):
            raise DaemonUnreachable(f"no events socket at {self.path}")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, events.topic_prefix(self.company, self.type))
        self._sock.connect(self.endpoint)
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> EventStream:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wanted(self, event: dict[str, Any]) -> bool:
        if self.company and event.get("company") != self.company:
            return False
        return not (self.type and event.get("type") != self.type)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next wanted event within `timeout` seconds, or None."""
        assert self._sock is not None, "open() first"
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(int(left * 1000) + 1):
                return None
            parsed = parse(self._sock.recv_multipart())
            if parsed is not None and self.wanted(parsed[1]):
                return parsed[1]
        return None

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        assert self._sock is not None, "open() first"
        while True:
            if not self._sock.poll(POLL_MS):
                continue
            frames = self._sock.recv_multipart()
            parsed = parse(frames)
            if parsed is None:
                self.malformed += 1
                continue
            if self.wanted(parsed[1]):
                yield parsed


def parse(frames: list[bytes]) -> tuple[str, dict[str, Any]] | None:
    """`(raw_json, event)` from `[topic, payload]`, or None for anything else."""
    if len(frames) != 2:
        return None
    try:
        raw = frames[1].decode()
        event = jsonsafe.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(event, dict):
        return None
    return raw, event
