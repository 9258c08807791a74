"""The webhook store of cluster mode (DESIGN.md §10, §12): `WebhookStore`'s methods on PostgreSQL.

A company's endpoint, secrets, `seq` and undelivered events move with it: the next owner reads them here.
Two rules keep one writer and one deliverer per company:

- A host records a company's events only while no *other* host holds its live lease (checked in the same
  transaction, the lease row locked FOR SHARE, so a claim waits for the write or the write sees the claim):
  a host that wakes late cannot add events behind the new owner's back. The seq is the database's, not the
  writer's memory, so a company that moved keeps counting where it was.
- A host delivers the events of the companies it holds, and those it wrote of a company no host runs.
  A company it claims is read whole (`pending_of`, nudged by waportd), so nothing another host left waits.

The supervisor's writes never wait: PostgreSQL unreachable means `Busy` (the turn tries again) and the store
holds off a second before it tries, so a dead database costs the loop one bounded call a second.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

from ipc.pgdb import PgDb, PgUnavailable
from ipc.webhookstore import EVENT_COLUMNS, GLOBAL, Busy, Endpoint, Event, Settled, deliveries_of, event_of

HOLD_OFF = 1.0  # seconds a write is not tried after PostgreSQL failed one

# Mine to deliver: the company's live lease is mine, or nobody's and I wrote the event.
_MINE = """(EXISTS (SELECT 1 FROM waport_leases l WHERE l.company = e.company AND l.owner = %(me)s
                    AND l.expires_at > now())
        OR (e.host = %(me)s AND NOT EXISTS (SELECT 1 FROM waport_leases l WHERE l.company = e.company
                                            AND l.expires_at > now())))"""


class PgWebhookStore:
    def __init__(self, db: PgDb, host_id: str) -> None:
        self.db = db
        db.what = "the webhook store"
        self.me = host_id
        self.failed_at = 0.0  # monotonic time of the last write PostgreSQL did not take
        self.refused = 0  # events not recorded: another host holds their company (this one was fenced)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def patient(self) -> Iterator[None]:
        """Commands may wait for a write; PostgreSQL's calls are bounded anyway (and not held off)."""
        self.failed_at = 0.0
        yield

    def _write(self, what: str, fn: Any) -> Any:
        if time.monotonic() - self.failed_at < HOLD_OFF:
            raise Busy()
        try:
            return self.db.call(what, fn)
        except PgUnavailable as exc:
            self.failed_at = time.monotonic()
            raise Busy(str(exc)) from None

    def _read(self, what: str, sql: str, params: Any = None) -> list[tuple]:
        return self.db.call(what, lambda conn: conn.execute(sql, params).fetchall())

    # ------------------------------------------------------------ endpoints

    def endpoints(self) -> dict[str, Endpoint]:
        rows = self._read("endpoints", "SELECT company, url, secret, events, old_secret, old_until, created, updated"
                                       " FROM waport_webhook_endpoints")
        return {r[0]: Endpoint(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5], r[6], r[7]) for r in rows}

    def disabled(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(c, u): {"reason": reason, "at": at}
                for c, u, reason, at in self._read("disabled", "SELECT company, url, reason, at"
                                                               " FROM waport_webhook_disabled")}

    def put_endpoint(self, ep: Endpoint) -> None:
        def run(conn: Any) -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO waport_webhook_endpoints (company, url, secret, events, old_secret, old_until,"
                    " created, updated) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (company) DO UPDATE SET"
                    " url = EXCLUDED.url, secret = EXCLUDED.secret, events = EXCLUDED.events,"
                    " old_secret = EXCLUDED.old_secret, old_until = EXCLUDED.old_until, created = EXCLUDED.created,"
                    " updated = EXCLUDED.updated",
                    (ep.company, ep.url, ep.secret, json.dumps(list(ep.events)), ep.old_secret, ep.old_until,
                     ep.created, ep.updated))
                if ep.company != GLOBAL:
                    conn.execute("DELETE FROM waport_webhook_disabled WHERE company = %s", (ep.company,))

        self._write("webhook endpoint", run)

    def delete_endpoint(self, company: str) -> bool:
        def run(conn: Any) -> bool:
            with conn.transaction():
                gone = conn.execute("DELETE FROM waport_webhook_endpoints WHERE company = %s", (company,)).rowcount
                conn.execute("DELETE FROM waport_webhook_disabled WHERE company = %s", (company,))
            return gone > 0

        return self._write("webhook endpoint", run)

    def disable(self, company: str, url: str, reason: str, now: float) -> int:
        def run(conn: Any) -> int:
            with conn.transaction():
                conn.execute("INSERT INTO waport_webhook_disabled (company, url, reason, at) VALUES (%s, %s, %s, %s)"
                             " ON CONFLICT (company, url) DO UPDATE SET reason = EXCLUDED.reason, at = EXCLUDED.at",
                             (company, url, reason, now))
                return conn.execute("UPDATE waport_webhook_events SET status = 'dead', done_at = %s, last_error = %s"
                                    " WHERE company = %s AND status = 'pending'",
                                    (now, f"endpoint disabled: {reason}", company)).rowcount

        return self._write("webhook endpoint", run)

    # ------------------------------------------------------------ events: the supervisor's side

    def seqs(self) -> dict[str, int]:
        return dict(self._read("seqs", "SELECT company, seq FROM waport_webhook_seqs"))

    def add_events(self, rows: list[tuple[str, str, int, str, str, float]], seqs: dict[str, int]) -> dict[str, int]:
        """Record `(id, company, seq, type, body, created)` rows, each company's numbered on from the seq the
        database holds (a row whose seq was counted elsewhere gets its body renumbered). Rows of a company
        another host holds are not recorded (`refused`). Returns every company's last seq."""
        companies = sorted({r[1] for r in rows})

        def run(conn: Any) -> dict[str, int]:
            with conn.transaction():
                with conn.pipeline():
                    leases = conn.execute("SELECT company, owner, expires_at > now() FROM waport_leases"
                                          " WHERE company = ANY(%s) ORDER BY company FOR SHARE", (companies,))
                    stored = conn.execute("SELECT company, seq FROM waport_webhook_seqs WHERE company = ANY(%s)"
                                          " ORDER BY company FOR UPDATE", (companies,))
                held = {c for c, owner, live in leases.fetchall() if live and owner != self.me}
                last = {c: 0 for c in companies if c not in held}
                last.update((c, s) for c, s in stored.fetchall() if c not in held)
                out = []
                for eid, company, seq, type_, body, created in rows:
                    if company in held:
                        self.refused += 1
                        continue
                    last[company] += 1
                    if last[company] != seq:
                        body = json.dumps({**json.loads(body), "seq": last[company]}, separators=(",", ":"),
                                          ensure_ascii=False)
                    out.append((eid, company, self.me, last[company], type_, body, created, created))
                with conn.pipeline():
                    if out:
                        conn.cursor().executemany(
                            "INSERT INTO waport_webhook_events (id, company, host, seq, type, body, created, next_at)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING", out)
                    if last:
                        conn.execute("INSERT INTO waport_webhook_seqs (company, seq) SELECT * FROM unnest(%s::text[],"
                                     " %s::bigint[]) ON CONFLICT (company) DO UPDATE SET seq = EXCLUDED.seq",
                                     (list(last), list(last.values())))
            return {**seqs, **last}

        return self._write("webhook events", run)

    def known(self, ids: list[str]) -> set[str]:
        return {r[0] for r in self._read("known events", "SELECT id FROM waport_webhook_events WHERE id = ANY(%s)",
                                         (ids,))}

    def forget(self, company: str) -> None:
        def run(conn: Any) -> None:
            with conn.transaction():
                for table in ("events", "seqs", "endpoints", "disabled"):
                    conn.execute(f"DELETE FROM waport_webhook_{table} WHERE company = %s", (company,))

        self._write("forget", run)

    def replay(self, company: str, dead_only: bool, since: float | None, now: float) -> int:
        where = "company = %s AND " + ("status = 'dead'" if dead_only else "status <> 'pending'")
        params: list[Any] = [now, now, company]
        if since is not None:
            where += " AND created >= %s"
            params.append(since)
        return self._write("replay", lambda conn: conn.execute(
            "UPDATE waport_webhook_events SET status = 'pending', attempts = 0, next_at = %s, created = %s,"
            f" done_at = NULL WHERE {where}", params).rowcount)

    # ------------------------------------------------------------ events: the delivery process's side

    def pending_after(self, n: int, limit: int) -> list[Event]:
        """This host's pending events after row `n` (the companies it holds, and what it wrote of the others)."""
        return [event_of(r) for r in self._read(
            "pending events", f"SELECT {EVENT_COLUMNS} FROM waport_webhook_events e WHERE n > %(n)s"
                              f" AND status = 'pending' AND {_MINE} ORDER BY n LIMIT %(limit)s",
            {"n": n, "me": self.me, "limit": limit})]

    def pending_of(self, company: str, after_seq: int, limit: int) -> list[Event]:
        return [event_of(r) for r in self._read(
            "pending events", f"SELECT {EVENT_COLUMNS} FROM waport_webhook_events WHERE company = %s"
                              " AND status = 'pending' AND seq > %s ORDER BY seq LIMIT %s",
            (company, after_seq, limit))]

    def settle(self, results: list[Settled]) -> None:
        def run(conn: Any) -> None:
            with conn.transaction():
                conn.cursor().executemany(
                    "UPDATE waport_webhook_events SET status = %s, attempts = %s, next_at = %s, last_at = %s,"
                    " last_status = %s, last_error = %s, done_at = CASE WHEN %s = 'pending' THEN NULL ELSE %s END"
                    " WHERE n = %s",
                    [(s.status, s.attempts, s.next_at, s.at, s.http_status, s.error, s.status, s.at, s.n)
                     for s in results])

        self._write("settle", run)

    def prune(self, ok_before: float, dead_before: float, limit: int = 5000) -> int:
        return self._write("prune", lambda conn: conn.execute(
            "DELETE FROM waport_webhook_events WHERE n IN (SELECT n FROM waport_webhook_events WHERE"
            " status <> 'pending' AND done_at < %s AND (status = 'ok' OR done_at < %s) LIMIT %s)",
            (ok_before, dead_before, limit)).rowcount)

    def checkpoint(self) -> None:
        """SQLite's WAL needs it; PostgreSQL does its own."""

    # ------------------------------------------------------------ what operators see

    def deliveries(self, company: str, limit: int) -> dict[str, Any]:
        counts = dict(self._read("deliveries", "SELECT status, COUNT(*) FROM waport_webhook_events"
                                               " WHERE company = %s GROUP BY status", (company,)))
        rows = self._read("deliveries", "SELECT id, seq, type, status, attempts, created, next_at, last_at,"
                                        " last_status, last_error, done_at FROM waport_webhook_events"
                                        " WHERE company = %s ORDER BY status = 'ok', seq DESC LIMIT %s",
                          (company, limit))
        return deliveries_of(counts, rows)

