"""The webhook store (DESIGN.md §10): endpoints and every event an endpoint wants, in SQLite (WAL).

`STATE_DIR/webhooks/webhooks.db`. The supervisor writes an event here before it publishes it
(so delivery never depends on the events socket, which may drop); the delivery process reads the
pending ones and records each attempt. Both write, briefly: the supervisor never waits for the
lock (`Busy`: it tries again next turn), the delivery process waits a little.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ipc.files import make_dir
from ipc.webhooks import GLOBAL

DIRNAME = "webhooks"
FILENAME = "webhooks.db"
PENDING, OK, DEAD = "pending", "ok", "dead"
EVENT_COLUMNS = "n, id, company, seq, type, body, created, attempts, next_at"  # what `event_of` reads
CLUSTER_DSN_ENV = "WAPORT_CLUSTER_DSN"  # how the delivery process of a cluster host gets the store's DSN

_SCHEMA = """
CREATE TABLE IF NOT EXISTS endpoints (
    company TEXT PRIMARY KEY,          -- a company, or '*' for webhook_url (every company without its own)
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    old_secret TEXT,                   -- valid until old_until after a rotation: both signatures are sent
    old_until REAL,
    events TEXT NOT NULL,              -- JSON list of event types
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS disabled (  -- endpoints that answered 410, per company
    company TEXT NOT NULL,
    url TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (company, url)
);
CREATE TABLE IF NOT EXISTS seqs (company TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    n INTEGER PRIMARY KEY,             -- insertion order: the delivery process reads on from the last it saw
    id TEXT NOT NULL UNIQUE,           -- evt_..., the webhook-id of every attempt
    company TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,                -- exactly the bytes that are signed and sent
    created REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_at REAL,
    last_status INTEGER,
    last_error TEXT,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS events_pending ON events(company, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS events_company ON events(company, created);
CREATE INDEX IF NOT EXISTS events_done ON events(done_at) WHERE status != 'pending';
"""


class Busy(Exception):
    """Another process holds the write lock; nothing was written."""


@dataclass
class Endpoint:
    company: str
    url: str
    secret: str
    events: tuple[str, ...]
    old_secret: str | None = None
    old_until: float | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def secrets(self, now: float) -> list[str]:
        """Signing secrets now: the current one, and the previous one for a day after a rotation."""
        if self.old_secret and self.old_until is not None and now < self.old_until:
            return [self.secret, self.old_secret]
        return [self.secret]

    def public(self, disabled: dict[str, Any] | None = None) -> dict[str, Any]:
        """What `webhook show` prints: never the secret."""
        return {"company": self.company, "url": self.url, "events": list(self.events),
                "scope": "global" if self.company == GLOBAL else "company",
                "previous_secret_valid_until": self.old_until if self.old_secret else None,
                "disabled": disabled, "created": self.created, "updated": self.updated}


@dataclass
class Event:
    n: int
    id: str
    company: str
    seq: int
    type: str
    body: bytes
    created: float
    attempts: int
    next_at: float


@dataclass
class Settled:
    """One attempt's result, as the delivery process writes it."""

    n: int
    status: str  # PENDING (try again at next_at), OK, DEAD
    attempts: int
    next_at: float
    at: float
    http_status: int | None
    error: str | None


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, DIRNAME, FILENAME)


class WebhookStore:
    def __init__(self, path: str, *, busy_ms: int = 0, checkpoints: bool = True, full_sync: bool = False) -> None:
        make_dir(os.path.dirname(path), 0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # secrets live here: 0600 from the first byte
        os.close(fd)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA busy_timeout={max(busy_ms, 1000)}")  # the schema may wait; the writes below not
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if full_sync else 'NORMAL'}")
        if not checkpoints:
            self.db.execute("PRAGMA wal_autocheckpoint=0")  # the delivery process checkpoints, never the loop
        self.db.executescript(_SCHEMA)
        self.db.execute(f"PRAGMA busy_timeout={busy_ms}")
        self.busy_ms = busy_ms

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def patient(self) -> Iterator[None]:
        """Commands wait a little for the delivery process's lock (the loop's own writes never do)."""
        self.db.execute("PRAGMA busy_timeout=2000")
        try:
            yield
        finally:
            self.db.execute(f"PRAGMA busy_timeout={self.busy_ms}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction; `Busy` if another process holds the lock past our wait (nothing written)."""
        cur = self.db.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise Busy() from None
            raise
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ endpoints

    def endpoints(self) -> dict[str, Endpoint]:
        rows = self.db.execute(
            "SELECT company, url, secret, events, old_secret, old_until, created, updated FROM endpoints").fetchall()
        return {r[0]: Endpoint(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5], r[6], r[7]) for r in rows}

    def disabled(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(c, u): {"reason": reason, "at": at}
                for c, u, reason, at in self.db.execute("SELECT company, url, reason, at FROM disabled")}

    def put_endpoint(self, ep: Endpoint) -> None:
        """Insert or replace; setting a company's endpoint (again) re-enables it."""
        with self.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO endpoints(company, url, secret, events, old_secret, old_until, "
                        "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (ep.company, ep.url, ep.secret, json.dumps(list(ep.events)), ep.old_secret, ep.old_until,
                         ep.created, ep.updated))
            if ep.company != GLOBAL:
                cur.execute("DELETE FROM disabled WHERE company = ?", (ep.company,))

    def delete_endpoint(self, company: str) -> bool:
        existed = self.db.execute("SELECT 1 FROM endpoints WHERE company = ?", (company,)).fetchone() is not None
        with self.transaction() as cur:
            cur.execute("DELETE FROM endpoints WHERE company = ?", (company,))
            cur.execute("DELETE FROM disabled WHERE company = ?", (company,))
        return existed

    def disable(self, company: str, url: str, reason: str, now: float) -> int:
        """The endpoint answered 410: it gets nothing more for `company`; its pending events are dead."""
        with self.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO disabled(company, url, reason, at) VALUES (?, ?, ?, ?)",
                        (company, url, reason, now))
            cur.execute("UPDATE events SET status = 'dead', done_at = ?, last_error = ? "
                        "WHERE company = ? AND status = 'pending'", (now, f"endpoint disabled: {reason}", company))
            return cur.rowcount

    # ------------------------------------------------------------ events: the supervisor's side

    def seqs(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT company, seq FROM seqs").fetchall())

    def add_events(self, rows: list[tuple[str, str, int, str, str, float]], seqs: dict[str, int]) -> dict[str, int]:
        """Record `(id, company, seq, type, body, created)` rows and the companies' last seq, in one transaction.
        An id already recorded (the same message heard again after a crash) is kept as it was. Returns `seqs`
        (only this process writes them; the cluster's store may renumber)."""
        with self.transaction() as cur:
            cur.executemany("INSERT OR IGNORE INTO events(id, company, seq, type, body, created, next_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", [(*r, r[5]) for r in rows])
            cur.executemany("INSERT OR REPLACE INTO seqs(company, seq) VALUES (?, ?)", list(seqs.items()))
        return seqs

    def known(self, ids: list[str]) -> set[str]:
        """Which of these event ids are recorded."""
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update(r[0] for r in self.db.execute(
                f"SELECT id FROM events WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def forget(self, company: str) -> None:
        """A deleted company: its endpoint, its events and its sequence go with it."""
        with self.transaction() as cur:
            for table in ("events", "seqs", "endpoints", "disabled"):
                cur.execute(f"DELETE FROM {table} WHERE company = ?", (company,))

    def replay(self, company: str, dead_only: bool, since: float | None, now: float) -> int:
        """Deliver again (same id, same seq): dead events, or every event since a time. Returns how many."""
        where, params = ["company = ?"], [company]
        if dead_only:
            where.append("status = 'dead'")
        else:
            where.append("status != 'pending'")
        if since is not None:
            where.append("created >= ?")
            params.append(since)
        with self.transaction() as cur:
            cur.execute(f"UPDATE events SET status = 'pending', attempts = 0, next_at = ?, created = ?, done_at = NULL "
                        f"WHERE {' AND '.join(where)}", (now, now, *params))
            return cur.rowcount

    # ------------------------------------------------------------ events: the delivery process's side

    def pending_after(self, n: int, limit: int) -> list[Event]:
        return [event_of(r) for r in self.db.execute(
            f"SELECT {EVENT_COLUMNS} FROM events "
            "WHERE n > ? AND status = 'pending' ORDER BY n LIMIT ?", (n, limit))]

    def pending_of(self, company: str, after_seq: int, limit: int) -> list[Event]:
        return [event_of(r) for r in self.db.execute(
            f"SELECT {EVENT_COLUMNS} FROM events "
            "WHERE company = ? AND status = 'pending' AND seq > ? ORDER BY seq LIMIT ?", (company, after_seq, limit))]

    def settle(self, results: list[Settled]) -> None:
        with self.transaction() as cur:
            cur.executemany(
                "UPDATE events SET status = ?, attempts = ?, next_at = ?, last_at = ?, last_status = ?, "
                "last_error = ?, done_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END WHERE n = ?",
                [(s.status, s.attempts, s.next_at, s.at, s.http_status, s.error, s.status, s.at, s.n)
                 for s in results])

    def prune(self, ok_before: float, dead_before: float, limit: int = 5000) -> int:
        """Delivered events go after their retention, dead ones after theirs (longer: someone may replay them)."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM events WHERE n IN (SELECT n FROM events WHERE status != 'pending' AND "
                        "done_at < ? AND (status = 'ok' OR done_at < ?) LIMIT ?)", (ok_before, dead_before, limit))
            return cur.rowcount

    def checkpoint(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # ------------------------------------------------------------ what operators see

    def deliveries(self, company: str, limit: int) -> dict[str, Any]:
        counts = dict(self.db.execute("SELECT status, COUNT(*) FROM events WHERE company = ? GROUP BY status",
                                      (company,)).fetchall())
        rows = self.db.execute(
            "SELECT id, seq, type, status, attempts, created, next_at, last_at, last_status, last_error, done_at "
            "FROM events WHERE company = ? ORDER BY status = 'ok', seq DESC LIMIT ?", (company, limit)).fetchall()
        return deliveries_of(counts, rows)


def deliveries_of(counts: dict[str, int], rows: list[tuple]) -> dict[str, Any]:
    """`webhook deliveries`' answer from the counts by status and the listed rows (both stores')."""
    keys = ("id", "seq", "type", "status", "attempts", "created", "next_attempt_at", "last_attempt_at",
            "last_status", "last_error", "done_at")
    items = []
    for r in rows:
        item = dict(zip(keys, r, strict=True))
        if item["status"] != PENDING:
            item["next_attempt_at"] = None
        items.append(item)
    return {"counts": {k: counts.get(k, 0) for k in (PENDING, OK, DEAD)}, "events": items}


def event_of(r: tuple) -> Event:
    """An Event from a row of EVENT_COLUMNS (both stores')."""
    return Event(r[0], r[1], r[2], r[3], r[4], r[5].encode(), r[6], r[7], r[8])
