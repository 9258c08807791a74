"""The workers socket (ROUTER, `ipc://RUN_DIR/workers.sock`): frames to and from worker processes.

Only framing lives here; what a frame means for a company is `Company.heard`'s business.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import zmq

from ipc import protocol
from ipc.zsocket import recv_ready, send_frames
from waportd.services import Counters

log = logging.getLogger("waport.arbiter")

_BODILESS = {t: protocol.encode(t, {}) for t in (protocol.HEARTBEAT, protocol.OUTBOX)}  # encoded once
READ_BATCH = 1000  # frames read per turn: the control socket and the timers get their turn too


class WorkerLink:
    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.sock: zmq.Socket | None = None  # bound by the arbiter's set-up; None: socket-less (tests)

    def send(self, ident: bytes, type_: str, body: dict[str, Any]) -> bool:
        if self.sock is None:
            return False
        frames = (None if body else _BODILESS.get(type_)) or protocol.encode(type_, body)
        try:
            send_frames(self.sock, [ident, *frames])
            return True
        except (zmq.Again, zmq.ZMQError):
            return False  # not connected (yet) or gone: heartbeats and reaping sort it out

    def receive(self) -> Iterator[tuple[bytes, protocol.Message]]:
        """The frames waiting now, decoded; a malformed one is dropped and counted, never raised."""
        assert self.sock is not None
        for _ in range(READ_BATCH):
            frames = recv_ready(self.sock)
            if frames is None:
                return
            try:
                msg = protocol.decode(frames[1:])
            except protocol.ProtocolError as exc:
                self.counters[("malformed", "worker")] += 1
                log.warning("dropped a malformed worker frame: %s", exc)
                continue
            if msg.dropped:
                self.counters[("malformed", "worker")] += msg.dropped
                log.warning("%r: dropped %d malformed events of a batch", frames[0][:64], msg.dropped)
            yield frames[0], msg
