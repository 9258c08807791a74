"""The events socket (DESIGN.md §4): every event the supervisor publishes goes out here, and to
the Redis stream `waport:events` when Redis is configured.

XPUB, not PUB: it tells us what subscribers want (`subscriptions.py`), so an event nobody listens
to is never encoded for the socket.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import zmq

from ipc import events
from ipc.zsocket import readable, recv_ready, send_frames
from waportd.services import Counters
from waportd.subscriptions import Subscriptions

StreamSink = Callable[[dict[str, Any]], None]


class EventBus:
    def __init__(self, counters: Counters, to_stream: StreamSink | None = None) -> None:
        self.counters = counters
        self.to_stream = to_stream
        self.subscriptions = Subscriptions()
        self.sock: zmq.Socket | None = None  # bound by the arbiter's set-up; None: socket-less (tests)
        self.tap: Callable[[dict[str, Any]], None] | None = None  # cluster mode: every event, for the other hosts

    def publish(self, company: str, type_: str, data: dict[str, Any], ts: float | None = None) -> None:
        event = events.make(company, type_, data, ts)
        self.relay(event)
        if self.tap is not None:
            self.tap(event)
        if self.to_stream is not None:
            self.to_stream({**event, "data": json.dumps(event["data"], separators=(",", ":"))})

    def relay(self, event: dict[str, Any]) -> None:
        """To this host's events socket only: also an event another host published (DESIGN.md §12)."""
        company, type_ = event.get("company"), event.get("type")
        if not isinstance(company, str) or not isinstance(type_, str):
            return
        topic = events.topic(company, type_)
        if self.sock is not None and self.listened(topic):
            try:  # XPUB drops for slow subscribers itself; it never blocks us
                send_frames(self.sock, [topic, events.body(event)])
            except zmq.ZMQError:
                self.counters[("events_dropped",)] += 1

    def listened(self, topic: bytes) -> bool:
        """Whether a subscriber wants `topic`: an event nobody listens to is not even encoded."""
        if self.subscriptions.wants(topic):
            return True
        if self.sock is not None and readable(self.sock):  # a subscription seen by the socket, not yet by us
            self.read_subscriptions()
            return self.subscriptions.wants(topic)
        return False

    def read_subscriptions(self) -> None:
        assert self.sock is not None
        while (frames := recv_ready(self.sock)) is not None:
            self.subscriptions.feed(frames[0])
