"""`python -m waportd.webhook_delivery`: the webhook delivery process (DESIGN.md §10), run by waportd.

It reads what to deliver from the webhook store (never from the events socket), posts each event
signed the Standard Webhooks way, and writes every attempt's result back. It imports `ipc` only:
none of the supervisor's loop runs here, so an endpoint that hangs for hours costs waportd nothing.

- One lane per company: its events go out one at a time in `seq` order while the endpoint answers.
  An event that fails waits for its own retry time (5 s, 30 s, 2 min, ... every 2 h) and the lane
  goes on with the next. When the endpoint itself is in trouble (no answer, 5xx, 429) twice in a
  row, the lane pauses for the same schedule instead of trying every event against a dead host.
- At most `webhook_concurrency` requests in flight per endpoint URL, on keep-alive connections.
- aiohttp: 80 µs of CPU per POST here against httpx's 0.7-1.4 ms (issue 14's measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import logging
import os
import random
import signal
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import zmq

from ipc import __version__, paths
from ipc import webhooks as policy
from ipc.logfmt import log_to_stderr
from ipc.webhooks import GLOBAL
from ipc.webhookstore import (
    CLUSTER_DSN_ENV,
    DEAD,
    OK,
    PENDING,
    Busy,
    Endpoint,
    Event,
    Settled,
    WebhookStore,
    path_in,
)

log = logging.getLogger("waport.webhooks")

LANE_MAX = 10_000  # events of one company held in memory; the rest wait in the store, read in seq order
READ_BATCH = 5000
POLL = 1.0  # seconds between looks at the store when nobody nudges
CLUSTER_POLL = 10.0  # the same in a cluster (every event of this host's is nudged; the look costs a query)
FLUSH = 0.05  # attempt results written at most this late (a crash before: delivered again, same id)
REPORT = 0.5  # outcomes to waportd's metrics
PRUNE = 60.0
CHECKPOINT = 1.0
DEAD_KEPT = 7 * 86400.0  # dead events stay visible (and replayable) a week at least
SWEEP = 1.0  # seconds between a lane's looks for events past webhook_max_age
PAUSE_AFTER = 2  # endpoint failures in a row before a lane pauses
MAX_BODY_READ = 64 << 10


@dataclass
class Lane:
    """One company's pending events: `ready` by seq (due now), `waiting` by time (failed, retry later)."""

    company: str
    ready: list[tuple[int, int]] = field(default_factory=list)  # (seq, n)
    waiting: list[tuple[float, int]] = field(default_factory=list)  # (next_at, n)
    events: dict[int, Event] = field(default_factory=dict)  # n -> event
    max_seq: int = 0
    full: bool = False  # more pending in the store than held here
    streak: int = 0  # endpoint failures in a row
    paused_until: float = 0.0
    current: Event | None = None  # the attempt in flight
    next_sweep: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, ev: Event, now: float) -> None:
        if ev.n in self.events:
            return
        self.events[ev.n] = ev
        self.max_seq = max(self.max_seq, ev.seq)
        if ev.next_at <= now:
            heapq.heappush(self.ready, (ev.seq, ev.n))
        else:
            heapq.heappush(self.waiting, (ev.next_at, ev.n))
        self.wake.set()

    def take(self, now: float) -> tuple[Event | None, float]:
        """The next event to try now, or None and how long until one may be."""
        while self.waiting and self.waiting[0][0] <= now:
            _, n = heapq.heappop(self.waiting)
            if n in self.events:
                heapq.heappush(self.ready, (self.events[n].seq, n))
        if self.paused_until > now:
            return None, self.paused_until - now
        while self.ready:
            _, n = heapq.heappop(self.ready)
            ev = self.events.get(n)
            if ev is not None:
                return ev, 0.0
        return None, (self.waiting[0][0] - now) if self.waiting else POLL * 30

    def retry_now(self) -> None:
        """Every waiting event is due again, and the lane's pause is over."""
        self.paused_until, self.streak = 0.0, 0
        for _, n in self.waiting:
            if n in self.events:
                heapq.heappush(self.ready, (self.events[n].seq, n))
        self.waiting = []
        self.wake.set()

    def later(self, ev: Event) -> None:
        heapq.heappush(self.waiting, (ev.next_at, ev.n))

    def expired(self, now: float, max_age: float) -> list[Event]:
        return [ev for ev in self.events.values() if now - ev.created > max_age]


class Delivery:
    def __init__(self, store: Any, run_dir: str, timeout: float, max_age: float, concurrency: int,
                 retry_scale: float = 1.0, poll: float = POLL) -> None:
        """`store`: a WebhookStore, or a cluster host's PgWebhookStore (waportd nudges it for every event of
        its own; other hosts' rows are never its, so it looks without a nudge only every `poll`)."""
        self.retry_scale = retry_scale
        self.poll = poll
        self.store = store
        self.run_dir = run_dir
        self.timeout = timeout
        self.max_age = max_age
        self.concurrency = concurrency
        self.lanes: dict[str, Lane] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.disabled: dict[tuple[str, str], dict[str, Any]] = {}
        self.limits: dict[str, asyncio.Semaphore] = {}
        self.cursor = 0
        self.settled: list[Settled] = []
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.latency_counts = [0] * (len(policy.LATENCY_BUCKETS) + 1)  # since the last report
        self.latency_sum = 0.0
        self.newly_disabled: list[tuple[str, str, int]] = []
        self.look = asyncio.Event()
        self.rng = random.Random()
        self.stopping = False
        self.reported_pending: dict[str, int] | None = None

    # ------------------------------------------------------------ reading the store

    def load_endpoints(self) -> None:
        """A lane whose endpoint changed (a new URL, secret, or enabled again) stops waiting out the old one's
        trouble: the pauses and retry times were about that endpoint."""
        before = {c: self.endpoint_of(c) for c in self.lanes}
        self.endpoints = self.store.endpoints()
        self.disabled = self.store.disabled()
        for company, old in before.items():
            new = self.endpoint_of(company)
            if new is not None and (old is None or (old.url, old.secret) != (new.url, new.secret)):
                self.lanes[company].retry_now()

    def endpoint_of(self, company: str) -> Endpoint | None:
        ep = self.endpoints.get(company) or self.endpoints.get(GLOBAL)
        if ep is None or (company, ep.url) in self.disabled:
            return None
        return ep

    def read_new(self) -> None:
        now = time.time()
        while True:
            batch = self.store.pending_after(self.cursor, READ_BATCH)
            for ev in batch:
                self.cursor = max(self.cursor, ev.n)
                lane = self.lane(ev.company)
                if lane.full:  # the refill reads it in its turn, by seq
                    continue
                lane.add(ev, now)
                if len(lane.events) >= LANE_MAX:
                    lane.full = True
            if len(batch) < READ_BATCH:
                return

    def refill(self, lane: Lane) -> None:
        if not lane.full or len(lane.events) > LANE_MAX // 2:
            return
        want = LANE_MAX - len(lane.events)
        batch = self.store.pending_of(lane.company, lane.max_seq, want)
        now = time.time()
        for ev in batch:
            lane.add(ev, now)
        lane.full = len(batch) >= want

    def reload_lane(self, company: str) -> None:
        """After a replay or a delete: the store says what is pending now, once it knows what this process
        settled (an event delivered a moment ago, its result not yet written, would otherwise go twice)."""
        self.flush()
        done = {s.n for s in self.settled if s.status != PENDING}  # the store was busy: still unwritten
        lane = self.lane(company)
        lane.events, lane.ready, lane.waiting, lane.max_seq, lane.full = {}, [], [], 0, True
        lane.paused_until, lane.streak = 0.0, 0
        if lane.current is not None:  # the attempt in flight settles itself
            lane.events[lane.current.n] = lane.current
        self.refill(lane)
        for n in done:
            lane.events.pop(n, None)
        lane.wake.set()

    def drop_lane(self, company: str) -> None:
        """Another host runs the company now and delivers its events: this process forgets them (an attempt in
        flight finishes; its result is written, the same id delivered twice at worst)."""
        lane = self.lanes.pop(company, None)
        task = self.tasks.pop(company, None)
        if task is not None:
            task.cancel()
        if lane is not None:
            lane.events.clear()

    def lane(self, company: str) -> Lane:
        lane = self.lanes.get(company)
        if lane is None:
            lane = self.lanes[company] = Lane(company)
        task = self.tasks.get(company)
        if task is None or task.done():
            self.tasks[company] = asyncio.get_running_loop().create_task(self.run_lane(lane))
        return lane

    # ------------------------------------------------------------ delivering

    async def run_lane(self, lane: Lane) -> None:
        while not self.stopping:
            now = time.time()
            if now >= lane.next_sweep:  # what waits (a paused lane, a retry hours away) dies in time, visibly
                lane.next_sweep = now + SWEEP
                for old in lane.expired(now, self.max_age):
                    self.expire(lane, old, now)
            try:
                self.refill(lane)
            except sqlite3.Error as exc:  # the cluster's store is unreachable: what is held goes on
                log.warning("%s: webhook events not read: %s", lane.company, exc)
            ev, wait = lane.take(now)
            if ev is not None and now - ev.created > self.max_age:
                self.expire(lane, ev, now)
                continue
            if ev is None:
                wait = min(wait, max(lane.next_sweep - now, 0.01))
                lane.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lane.wake.wait(), timeout=min(wait, self.max_age, 60.0))
                continue
            ep = self.endpoint_of(lane.company)
            if ep is None:
                why = "endpoint disabled" if self.endpoints.get(lane.company) or self.endpoints.get(GLOBAL) \
                    else "no webhook endpoint"
                self.finish(lane, ev, DEAD, now, None, why, policy.DEAD)
                continue
            lane.current = ev
            try:
                await self.attempt(lane, ev, ep)
            finally:
                lane.current = None

    async def attempt(self, lane: Lane, ev: Event, ep: Endpoint) -> None:
        limit = self.limits.get(ep.url)
        if limit is None:
            limit = self.limits[ep.url] = asyncio.Semaphore(self.concurrency)
        status, retry_after, error = None, None, None
        async with limit:
            now = time.time()
            ts = int(now)
            keys = [policy.secret_key(s) for s in ep.secrets(now)]
            headers = {"content-type": "application/json", "user-agent": f"waport/{__version__}",
                       "webhook-id": ev.id, "webhook-timestamp": str(ts),
                       "webhook-signature": policy.sign(keys, ev.id, ts, ev.body)}
            try:
                async with self.session.post(ep.url, data=ev.body, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    await resp.content.read(MAX_BODY_READ)  # then the connection is released (or closed)
            except TimeoutError:
                error = f"no answer within {self.timeout:g} s"
            except aiohttp.ClientError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
        done = time.time()
        verdict = policy.judge(status, retry_after)
        ev.attempts += 1
        if verdict.outcome == policy.OK:
            lane.streak = 0
            seconds = max(0.0, done - ev.created)
            self.latency_counts[policy.bucket_of(seconds)] += 1
            self.latency_sum += seconds
            self.finish(lane, ev, OK, done, status, None, policy.OK)
            return
        if verdict.outcome == policy.DISABLED:
            self.disable(lane, ev, ep, status or 410, done)
            return
        error = error or f"HTTP {status}"
        delay = verdict.retry_after if verdict.retry_after is not None else self.delay(ev.attempts)
        if verdict.endpoint_trouble:
            lane.streak += 1
            if lane.streak >= PAUSE_AFTER or verdict.retry_after is not None:
                pause = verdict.retry_after if verdict.retry_after is not None else \
                    self.delay(lane.streak - PAUSE_AFTER + 1)
                lane.paused_until = done + pause
        else:
            lane.streak = 0
        if done + delay - ev.created > self.max_age:
            self.finish(lane, ev, DEAD, done, status, error, policy.DEAD)
            return
        ev.next_at = done + delay
        lane.later(ev)
        self.outcomes[(lane.company, policy.RETRY)] += 1
        self.settled.append(Settled(ev.n, PENDING, ev.attempts, ev.next_at, done, status, error))

    def delay(self, failures: int) -> float:
        return policy.retry_delay(failures, self.rng) * self.retry_scale

    def expire(self, lane: Lane, ev: Event, now: float) -> None:
        self.finish(lane, ev, DEAD, now, None, f"not delivered within webhook_max_age ({self.max_age:g} s)",
                    policy.DEAD)

    def finish(self, lane: Lane, ev: Event, status: str, now: float, http_status: int | None, error: str | None,
               outcome: str) -> None:
        lane.events.pop(ev.n, None)
        self.outcomes[(lane.company, outcome)] += 1
        self.settled.append(Settled(ev.n, status, ev.attempts, ev.next_at, now, http_status, error))

    def disable(self, lane: Lane, ev: Event, ep: Endpoint, status: int, now: float) -> None:
        """410 Gone: the endpoint wants nothing more for this company; what is pending is dead (replayable)."""
        self.flush()
        self.settled.append(Settled(ev.n, DEAD, ev.attempts, ev.next_at, now, status, "endpoint gone (410)"))
        self.flush()
        try:
            killed = self.store.disable(lane.company, ep.url, f"HTTP {status}", now)
        except Busy:
            killed = 0
        self.disabled[(lane.company, ep.url)] = {"reason": f"HTTP {status}", "at": now}
        self.outcomes[(lane.company, policy.DISABLED)] += 1 + killed
        lane.events.clear()
        lane.ready.clear()
        lane.waiting.clear()
        self.newly_disabled.append((lane.company, ep.url, status))
        log.warning("%s: webhook endpoint answered %d: disabled, %d pending events dead", lane.company, status,
                    killed)

    # ------------------------------------------------------------ housekeeping

    def flush(self) -> None:
        if not self.settled:
            return
        try:
            self.store.settle(self.settled)
            self.settled = []
        except Busy:
            pass  # next time; until then a crash only means these are delivered again

    def report(self) -> dict[str, Any] | None:
        pending = {c: len(lane.events) for c, lane in self.lanes.items()}
        if not (self.outcomes or self.newly_disabled or pending != self.reported_pending):
            return None
        self.reported_pending = pending
        args = {"outcomes": [[c, o, n] for (c, o), n in self.outcomes.items()],
                "latency": {"counts": self.latency_counts, "sum": self.latency_sum},
                "pending": pending, "disabled": self.newly_disabled}
        self.outcomes, self.newly_disabled = Counter(), []
        self.latency_counts, self.latency_sum = [0] * (len(policy.LATENCY_BUCKETS) + 1), 0.0
        return args

    async def housekeeping(self, control: zmq.Socket) -> None:
        next_report = next_prune = next_checkpoint = 0.0
        while not self.stopping:
            await asyncio.sleep(FLUSH)
            self.flush()
            now = time.monotonic()
            if now >= next_report:
                next_report = now + REPORT
                args = self.report()
                if args is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        control.send(json.dumps({"id": uuid.uuid4().hex, "cmd": "webhook_report",
                                                 "args": args}).encode(), zmq.NOBLOCK)
                with contextlib.suppress(zmq.ZMQError):
                    while control.recv(zmq.NOBLOCK):
                        pass
            if now >= next_checkpoint:  # waportd never checkpoints (its loop must not): the WAL stays small
                next_checkpoint = now + CHECKPOINT
                self.store.checkpoint()
            if now >= next_prune:
                next_prune = now + PRUNE
                wall = time.time()
                with contextlib.suppress(Busy):
                    self.store.prune(wall - self.max_age, wall - max(DEAD_KEPT, self.max_age))

    async def watch(self, nudges: zmq.Socket) -> None:
        """Nudges from waportd (`new`, `endpoints`, `reload COMPANY`, `drop COMPANY`), and a look at the store
        every `poll` seconds."""
        loop = asyncio.get_running_loop()
        loop.add_reader(nudges.getsockopt(zmq.FD), self.look.set)
        reload_endpoints, reloads = not self.endpoints, set()
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.look.wait(), self.poll)
            self.look.clear()
            while nudges.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                what = nudges.recv(zmq.NOBLOCK)
                if what == b"endpoints":
                    reload_endpoints = True
                elif what.startswith(b"reload "):
                    reload_endpoints = True
                    reloads.add(what[7:].decode())
                elif what.startswith(b"drop "):
                    reloads.discard(what[5:].decode())
                    self.drop_lane(what[5:].decode())
            try:  # a cluster's store may be unreachable a while: what was asked is done at the next look
                if reload_endpoints:
                    self.load_endpoints()
                    reload_endpoints = False
                while reloads:
                    self.reload_lane(next(iter(reloads)))
                    reloads.pop()
                self.read_new()
            except sqlite3.Error as exc:
                log.warning("webhook store: %s; looking again in %g s", exc, self.poll)

    async def run(self) -> None:
        ctx = zmq.Context()
        nudges = ctx.socket(zmq.PULL)
        nudges.setsockopt(zmq.LINGER, 0)
        nudges.connect(paths.endpoint(self.run_dir, paths.WEBHOOKS_SOCK))
        control = ctx.socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.SNDHWM, 100)
        control.connect(paths.endpoint(self.run_dir, paths.CONTROL_SOCK))
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.concurrency, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(10.0, self.timeout))
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            self.session = session
            try:
                self.load_endpoints()
                self.read_new()
            except sqlite3.Error as exc:  # a cluster's store: `watch` tries again
                log.warning("webhook store: %s", exc)
            workers = [loop.create_task(self.watch(nudges)), loop.create_task(self.housekeeping(control))]
            log.info("webhook delivery ready: %d events pending", sum(len(lane.events) for lane in self.lanes.values()))
            await done.wait()
            self.stopping = True
            for task in [*workers, *self.tasks.values()]:
                task.cancel()
            await asyncio.gather(*workers, *self.tasks.values(), return_exceptions=True)
        self.flush()
        nudges.close()
        control.close()
        ctx.term()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m waportd.webhook_delivery", description="waport's webhook delivery")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--timeout", type=float, default=15.0)
    p.add_argument("--max-age", type=float, default=86400.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--retry-scale", type=float, default=1.0)
    p.add_argument("--log-level", default="info")
    p.add_argument("--host-id", help="cluster mode: this host (the store's DSN is in $" + CLUSTER_DSN_ENV + ")")
    args = p.parse_args(argv)
    log_to_stderr(args.log_level, "webhooks")
    store: Any
    poll = POLL
    if args.host_id:
        from ipc.clusterschema import supervisor_name
        from ipc.pgdb import PgDb  # psycopg: only in cluster mode
        from ipc.pgwebhookstore import PgWebhookStore

        dsn = os.environ.pop(CLUSTER_DSN_ENV, "")
        if not dsn:
            p.error(f"--host-id needs the cluster's DSN in ${CLUSTER_DSN_ENV}")
        store, poll = PgWebhookStore(PgDb(dsn, supervisor_name(args.host_id, "webhook-delivery")), args.host_id), \
            CLUSTER_POLL
    else:
        store = WebhookStore(path_in(args.state_dir), busy_ms=1000)
    try:
        asyncio.run(Delivery(store, args.run_dir, args.timeout, args.max_age, args.concurrency,
                             args.retry_scale, poll).run())
    finally:
        store.close()


if __name__ == "__main__":
    main()
