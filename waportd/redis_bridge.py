"""Redis, when configured (DESIGN.md §6): streams, the session mirror and the outbox consumer group.

All Redis I/O happens on this thread so a slow or dead Redis never stalls the main loop.
The loop hands work over with the `put_*` methods and collects results with `take_results`
(after `wake` has poked it). While Redis is down, stream writes wait in a bounded backlog
and catch up when it returns; inbound messages are only acknowledged to their worker once
they are in `waport:inbox`, so the worker's journal is the backlog that cannot overflow.
A worker sends an unacknowledged message again every few seconds: a copy whose token is
waiting in the backlog, or went in already, adds no second entry to the stream.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger("waport.redis")

INBOX = "waport:inbox"
EVENTS = "waport:events"
OUTBOX = "waport:outbox"
GROUP = "waportd"
BACKLOG = 100_000
ADDED_KEPT = 100_000  # tokens remembered as in Redis, for copies sent again after their ACK was lost


def session_key(company: str) -> str:
    return f"waport:session:{company}"


def flat(fields: dict[str, Any]) -> dict[str, str]:
    """Stream fields are strings: booleans as 0/1, None as empty."""
    out = {}
    for k, v in fields.items():
        if isinstance(v, bool):
            v = int(v)
        out[k] = "" if v is None else str(v)
    return out


def client_for(url: str, timeout: float = 0.5) -> redis.Redis:
    """Replies decode with surrogateescape: an outbox entry a producer wrote in another encoding
    must be answered `rejected`, not raise UnicodeDecodeError in the Redis thread (and end it)."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                decode_responses=True, encoding_errors="surrogateescape", health_check_interval=0)


class RedisBridge(threading.Thread):
    def __init__(self, url: str, wake: Callable[[], None], maxlen: int = 100_000, mirror_ttl: int = 120) -> None:
        super().__init__(name="redis", daemon=True)
        self.url = url
        self.wake = wake
        self.maxlen = maxlen
        self.mirror_ttl = mirror_ttl
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.lock = threading.Lock()
        self.streams: deque[tuple[str, dict[str, str], Any]] = deque()  # (stream, fields, token)
        self.mirrors: dict[str, dict[str, str] | None] = {}  # latest record per company; None: delete
        self.acks: deque[tuple[str, dict[str, str]]] = deque()  # outbox entries done: (entry id, result)
        self.results: deque[tuple[str, Any]] = deque()
        self.queued: set[Any] = set()  # tokens of the backlog
        self.added: OrderedDict[Any, None] = OrderedDict()  # tokens in Redis, the latest ADDED_KEPT
        self.stopping = threading.Event()
        self.up = False
        self.dropped = 0
        self.outages = 0

    # ------------------------------------------------------------ from the main loop

    def put_stream(self, stream: str, fields: dict[str, Any], token: Any = None) -> None:
        """XADD later; a token comes back through `take_results` as ("added", token) once it is in (a copy
        of one in Redis already: at once, with no second entry)."""
        with self.lock:
            if token in self.queued:
                return
            if token is not None and token in self.added:
                self.results.append(("added", token))
                again = True
            else:
                again = False
                if len(self.streams) >= BACKLOG:
                    _, _, old = self.streams.popleft()
                    self.dropped += 1
                    if old is not None:
                        self.queued.discard(old)
                        self.results.append(("dropped", old))
                self.streams.append((stream, flat(fields), token))
                if token is not None:
                    self.queued.add(token)
        if again:
            self.wake()

    def put_mirror(self, company: str, record: dict[str, Any] | None) -> None:
        with self.lock:
            self.mirrors[company] = flat(record) if record is not None else None

    def put_outbox_result(self, entry_id: str, result: dict[str, Any]) -> None:
        with self.lock:
            self.acks.append((entry_id, flat(result)))

    def take_results(self) -> list[tuple[str, Any]]:
        with self.lock:
            out = list(self.results)
            self.results.clear()
        return out

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)

    # ------------------------------------------------------------ the thread

    def run(self) -> None:
        delay = 0.2
        while not self.stopping.is_set():
            try:
                client = client_for(self.url)
                client.ping()
                self.ensure_group(client)
                if not self.up:
                    log.info("redis is up (%s)", _safe(self.url))
                    with self.lock:
                        self.results.append(("up", None))  # the main loop refreshes the mirror
                    self.wake()
                self.up, delay = True, 0.2
                self.serve(client)
            except (redis.RedisError, OSError) as exc:
                if self.up:
                    self.outages += 1
                    log.warning("redis is down: %s; streams catch up when it returns", exc)
                self.up = False
                self.stopping.wait(delay)
                delay = min(5.0, delay * 2)

    def ensure_group(self, client: redis.Redis) -> None:
        try:
            client.xgroup_create(OUTBOX, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def serve(self, client: redis.Redis) -> None:
        # Entries this consumer took but never acknowledged (a crash) come first.
        self.read_outbox(client, "0")
        while not self.stopping.is_set():
            self.flush(client)
            self.read_outbox(client, ">", block_ms=100)

    def flush(self, client: redis.Redis) -> None:
        with self.lock:
            streams = list(self.streams)
            mirrors = dict(self.mirrors)
            acks = list(self.acks)
        pipe = client.pipeline(transaction=False)
        for stream, fields, _ in streams:
            pipe.xadd(stream, fields, maxlen=self.maxlen, approximate=True)
        for company, record in mirrors.items():
            if record is None:
                pipe.delete(session_key(company))
            else:
                pipe.hset(session_key(company), mapping=record)
                pipe.expire(session_key(company), self.mirror_ttl)
        for entry_id, result in acks:
            pipe.xack(OUTBOX, GROUP, entry_id)
            pipe.xadd(EVENTS, {"type": "outbox_result", "entry_id": entry_id, **result},
                      maxlen=self.maxlen, approximate=True)
        if not (streams or mirrors or acks):
            return
        pipe.execute()  # raises on a connection failure: nothing below runs, the backlog stays
        with self.lock:
            for _ in streams:
                _, _, token = self.streams.popleft()
                if token is not None:
                    self.queued.discard(token)
                    self.added[token] = None
                    self.results.append(("added", token))
            while len(self.added) > ADDED_KEPT:
                self.added.popitem(last=False)
            for company, record in mirrors.items():
                if self.mirrors.get(company) is record:
                    del self.mirrors[company]
            for _ in acks:
                self.acks.popleft()
        if any(token is not None for _, _, token in streams):
            self.wake()

    def read_outbox(self, client: redis.Redis, start: str, block_ms: int | None = None) -> None:
        reply = client.xreadgroup(GROUP, self.consumer, {OUTBOX: start}, count=500, block=block_ms)
        entries = [(entry_id, fields) for _, items in (reply or []) for entry_id, fields in items if fields]
        if entries:
            with self.lock:
                self.results.extend(("outbox", entry) for entry in entries)
            self.wake()


def _safe(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"

