"""The API process's two links to waportd: control requests (one DEALER, many requests in flight)
and the events socket (SUB), kept for 10 minutes so an SSE client that reconnects misses nothing.

The API keeps no state of its own beyond this window: every request becomes control commands.

Plain (blocking-capable) ZeroMQ sockets, sent to with NOBLOCK and read by the event loop through
the socket's descriptor (`add_reader`), draining everything waiting at each wake-up: a control
round trip costs this process 15-55 µs of CPU this way, 225 µs through `zmq.asyncio` (measured on
the bench host; README: HTTP API, cost per request).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from ipc import paths
from ipc.errors import INTERNAL, TIMEOUT, WaportError
from ipc.jsonsafe import loads as parse_json

log = logging.getLogger("waport.api")

NOBLOCK, EVENTS, POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
REPLAY_SECONDS = 600.0  # Last-Event-ID reaches back this far
REPLAY_BYTES = 64 << 20  # events kept at most, whatever their age (memory bound): the window may be shorter
READ_BATCH = 1000  # events read per wake-up before the loop serves requests again
CLIENT_QUEUE = 1000  # events a slow SSE client may lag behind before it is dropped


class ControlLink:
    """Control requests over one DEALER socket; replies are matched to waiting requests by id."""

    def __init__(self, run_dir: str, ctx: zmq.Context) -> None:
        self.endpoint = paths.endpoint(run_dir, paths.CONTROL_SOCK)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(self.endpoint)
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.prefix = uuid.uuid4().hex[:8]
        self.ids = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.getsockopt(zmq.FD), self.read_replies)
        self.loop.call_soon(self.read_replies)  # anything already waiting raised no wake-up of its own

    def read_replies(self) -> None:
        """Every reply waiting now (the descriptor only says "something changed": drain it all)."""
        while self.sock.getsockopt(EVENTS) & POLLIN:
            raw = self.sock.recv(NOBLOCK)
            try:
                reply = parse_json(raw)
                fut = self.waiting.pop(reply["id"], None)
            except (ValueError, KeyError, TypeError):  # InvalidJSON is a ValueError
                log.warning("dropped a malformed control reply")
                continue
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def call(self, cmd: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The reply's result; its error as `WaportError`; `timeout` when waportd does not answer."""
        rid = f"{self.prefix}-{next(self.ids)}"
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.waiting[rid] = fut
        timer = loop.call_later(timeout, _expire, fut)
        try:
            self.sock.send(json.dumps({"id": rid, "cmd": cmd, "args": args}, separators=(",", ":")).encode(), NOBLOCK)
            if self.sock.getsockopt(EVENTS) & POLLIN:  # the send may have taken the descriptor's wake-up
                loop.call_soon(self.read_replies)
            reply = await fut
        except (TimeoutError, zmq.Again):
            raise WaportError(TIMEOUT, f"waportd did not answer {cmd} within {timeout:g} s") from None
        finally:
            timer.cancel()
            self.waiting.pop(rid, None)
        if reply.get("ok"):
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        error = reply.get("error")
        raise WaportError.from_dict(error) if isinstance(error, dict) else WaportError(INTERNAL, "malformed reply")

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        self.sock.close(0)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


@dataclass(eq=False)  # compared (and hashed) by identity: one per connected client
class Subscriber:
    company: str | None  # None: every company
    type_: str | None
    queue: asyncio.Queue[tuple[int, bytes] | None] = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    dropped: bool = False

    def wants(self, company: str, type_: str) -> bool:
        return (self.company is None or self.company == company) and (self.type_ is None or self.type_ == type_)


class EventHub:
    """Every event from waportd, numbered and kept REPLAY_SECONDS, fanned out to SSE clients.

    Event ids are `<boot>-<n>`: `boot` names this API process's run, so an id from an earlier run
    (the process was restarted) replays everything still kept rather than guessing where it was.

    The hub listens only from the first SSE client on until REPLAY_SECONDS after the last one left:
    a client that comes back within that time misses nothing, and an API nobody streams from costs
    waportd nothing for events (its XPUB encodes no event without a subscriber: 70 µs per send on
    the bench host) and itself nothing for reading them.
    """

    def __init__(self, run_dir: str, ctx: zmq.Context, clock: Any = time.monotonic) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(paths.endpoint(run_dir, paths.EVENTS_SOCK))
        self.boot = f"{int(time.time() * 1000) % 10**10:x}{os.getpid() % 4096:03x}"
        self.clock = clock
        self.kept: collections.deque[tuple[int, float, str, str, bytes]] = collections.deque()
        self.kept_bytes = 0
        self.numbers = itertools.count(1)
        self.subscribers: set[Subscriber] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listening = False
        self.idle_since: float | None = None  # when the last client left

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.getsockopt(zmq.FD), self.read_events)
        self.loop.call_soon(self.read_events)

    def listen(self) -> None:
        self.idle_since = None
        if not self.listening:
            self.listening = True
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
            assert self.loop is not None
            self.loop.call_later(60, self.maybe_stop_listening)

    def maybe_stop_listening(self) -> None:
        """Checked every minute while listening: stop REPLAY_SECONDS after the last client left."""
        if self.subscribers or self.idle_since is None or self.clock() - self.idle_since < REPLAY_SECONDS:
            assert self.loop is not None
            self.loop.call_later(60, self.maybe_stop_listening)
            return
        self.listening = False
        self.sock.setsockopt(zmq.UNSUBSCRIBE, b"")
        self.kept.clear()  # nothing after this is recorded: replaying older events would hide the gap
        self.kept_bytes = 0

    def read_events(self) -> None:
        for _ in range(READ_BATCH):
            if not self.sock.getsockopt(EVENTS) & POLLIN:
                return
            frames = self.sock.recv_multipart(NOBLOCK)
            if len(frames) != 2 or not self.listening:  # late ones after an unsubscribe are not recorded
                continue
            company, _, type_ = frames[0].decode(errors="replace").partition(".")
            self.add(company, type_, frames[1])
        assert self.loop is not None
        self.loop.call_soon(self.read_events)  # more waits: after the requests that came meanwhile

    def add(self, company: str, type_: str, body: bytes) -> None:
        n, now = next(self.numbers), self.clock()
        self.kept.append((n, now, company, type_, body))
        self.kept_bytes += len(body)
        while self.kept and (now - self.kept[0][1] > REPLAY_SECONDS or self.kept_bytes > REPLAY_BYTES):
            self.kept_bytes -= len(self.kept.popleft()[4])
        for sub in list(self.subscribers):
            if sub.wants(company, type_):
                try:
                    sub.queue.put_nowait((n, body))
                except asyncio.QueueFull:  # a slow client is dropped, never buffered without bound
                    self.drop(sub)

    def drop(self, sub: Subscriber) -> None:
        sub.dropped = True
        self.subscribers.discard(sub)
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)

    def event_id(self, n: int) -> str:
        return f"{self.boot}-{n}"

    def newest(self) -> int:
        return self.kept[-1][0] if self.kept else 0

    def after(self, last_event_id: str | None) -> int:
        """The number after which a reconnecting client resumes: a new client (or an id from the future)
        starts from now, an id of this run where it was, an id of an earlier run from all that is kept."""
        if not last_event_id:
            return self.newest()
        boot, _, n = last_event_id.partition("-")
        if boot != self.boot:
            return 0
        if not (n.isascii() and n.isdigit()) or int(n) > self.newest():
            return self.newest()
        return int(n)

    async def stream(self, company: str | None, type_: str | None, last_event_id: str | None,
                     keepalive: float = 15.0) -> AsyncIterator[bytes]:
        """SSE frames: first what the client missed (if it says where it was), then live events."""
        sub = Subscriber(company, type_)
        self.listen()
        self.subscribers.add(sub)
        try:
            start = self.after(last_event_id)
            replay = [(n, body) for n, _, c, t, body in self.kept if n > start and sub.wants(c, t)]
            yield b"retry: 2000\n\n"
            if last_event_id and self.kept and self.kept[0][0] > start + 1:
                yield b": events before these are no longer kept (10 minutes, 64 MiB)\n\n"
            for n, body in replay:
                yield self.frame(n, body)
            last = replay[-1][0] if replay else start
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), keepalive)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if item is None:
                    return  # dropped: too slow
                n, body = item
                if n > last:
                    last = n
                    yield self.frame(n, body)
        finally:
            self.subscribers.discard(sub)
            if not self.subscribers:
                self.idle_since = self.clock()

    def frame(self, n: int, body: bytes) -> bytes:
        return b"id: " + self.event_id(n).encode() + b"\ndata: " + body + b"\n\n"

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        for sub in list(self.subscribers):
            self.drop(sub)
        self.sock.close(0)
