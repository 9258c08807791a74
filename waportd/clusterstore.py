"""Cluster mode's state in PostgreSQL (DESIGN.md §12): hosts, leases with epochs, the desired companies,
the sim backend's credentials.

`ClusterStore` is synchronous, on one connection, and bounded in time: a connect gives up after
`connect_timeout`, a statement after `statement_timeout` (server side), and a call after `call_timeout`
whatever the server does (a watchdog shuts the socket: a SIGSTOPped server or a cut network answers
nothing, not even an error). A lost connection raises `StoreUnavailable` and the next call reconnects.
Every time comes from the database's clock. `ClusterLink` runs a store on a thread of its own so the
supervisor's loop never waits for PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ipc import clusterschema as schema
from ipc.pgdb import clean_error, close_quietly, connect_bounded, password, watchdog

log = logging.getLogger("waport.cluster")

HOST_STATES = ("up", "draining", "down")


class StoreError(Exception):
    """A cluster store call failed; the message never holds the DSN's password."""


class StoreUnavailable(StoreError):
    """PostgreSQL cannot be reached (or did not answer in time); the next call tries again."""


@dataclass(frozen=True)
class Lease:
    """A lease as granted or renewed: `expires_at - db_now` is how long it still holds, on any clock."""

    company: str
    epoch: int
    expires_at: datetime
    db_now: datetime

    @property
    def remaining(self) -> float:
        return (self.expires_at - self.db_now).total_seconds()

    def deadline(self, monotonic_at_start: float) -> float:
        """The local time.monotonic() at which it ends, from the moment the query was sent (never later)."""
        return monotonic_at_start + self.remaining


@dataclass(frozen=True)
class LeaseRow:
    """A row of waport_leases, live or not, as of the database's now."""

    company: str
    owner: str
    epoch: int
    expires_at: datetime
    live: bool
    remaining: float  # seconds until it expires (< 0: expired), on the database's clock


@dataclass(frozen=True)
class Host:
    host_id: str
    state: str
    heartbeat_age: float  # seconds, on the database's clock
    capacity: int
    companies: int
    started_at: datetime


@dataclass(frozen=True)
class Wanted:
    """A company the cluster should run (waport_companies), and where if it was moved."""

    company: str
    proxy: str | None
    preferred_host: str | None
    updated_at: datetime


def redact_dsn(dsn: str) -> str:
    """The DSN with its password (URL or `password=` keyword form) replaced by ***."""
    if "://" in dsn:
        parts = urllib.parse.urlsplit(dsn)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            user = parts.username or ""
            netloc = f"{user}:***@{host}"
            dsn = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(k == "password" for k, _ in query):
            kept = urllib.parse.urlencode([(k, "***" if k == "password" else v) for k, v in query], safe="*")
            dsn = urllib.parse.urlunsplit(urllib.parse.urlsplit(dsn)._replace(query=kept))
        return dsn
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


FENCE_WAIT = 2.0  # seconds an ended connection of an older epoch is given to be gone


class ClusterStore:
    def __init__(self, dsn: str, host_id: str, lease_ttl: float, *, connect_timeout: float = 3.0,
                 statement_timeout: float = 5.0, call_timeout: float = 8.0, role: str = "") -> None:
        self._dsn = dsn
        self._secret = password(dsn)
        self.host_id = host_id
        self.lease_ttl = float(lease_ttl)
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.call_timeout = call_timeout
        self._conn: psycopg.Connection | None = None
        self._started = False  # this store's first beat sets started_at
        self._lock = threading.Lock()  # one call at a time on the connection
        self.role = role  # in application_name after the host: which of this host's connections it is

    def __repr__(self) -> str:
        return f"ClusterStore({redact_dsn(self._dsn)!r}, host_id={self.host_id!r})"

    __str__ = __repr__

    # ------------------------------------------------------------ the connection

    def _clean(self, exc: BaseException) -> str:
        return clean_error(exc, self._secret)

    def _connect(self, role: str = "") -> psycopg.Connection:
        return connect_bounded(self._dsn, schema.supervisor_name(self.host_id, role),
                               self.connect_timeout, self.statement_timeout, self.call_timeout)

    def _call(self, what: str, fn: Callable[[psycopg.Connection], Any]) -> Any:
        """Run `fn` on the connection (made now if there is none), bounded by `call_timeout`; any failure
        to reach the server becomes StoreUnavailable, raised outside the driver's exception (no chain that
        could carry connection details)."""
        with self._lock:
            failure: str | None = None
            unavailable = True
            fired = threading.Event()
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = None
                    self._conn = self._connect(self.role)
                conn = self._conn
                ticket = watchdog().watch(conn, self.call_timeout, fired)
                try:
                    return fn(conn)
                finally:
                    watchdog().done(ticket)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                failure = f"no answer in {self.call_timeout:g} s" if fired.is_set() else self._clean(exc)
                self._drop()
            except psycopg.Error as exc:
                failure, unavailable = self._clean(exc), False
            if unavailable:
                raise StoreUnavailable(f"cluster store: {what}: {failure}")
            raise StoreError(f"cluster store: {what}: {failure}")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ------------------------------------------------------------ schema

    def migrate(self) -> int:
        """Create or upgrade the schema to SCHEMA_VERSION, once, under an advisory lock (hosts that start
        together wait for the first); idempotent. Returns the version found before."""

        def run(conn: psycopg.Connection) -> int:
            conn.execute("SET statement_timeout = 0")  # waiting for another host's migration is normal
            conn.execute("SET lock_timeout = 0")
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (schema.MIGRATION_LOCK,))
                try:
                    conn.execute(schema.SCHEMA_TABLE)
                    row = conn.execute("SELECT version FROM waport_schema").fetchone()
                    before = row[0] if row else 0
                    if before > schema.SCHEMA_VERSION:
                        raise StoreError(f"cluster store: the database's schema is version {before}, newer "
                                         f"than this waportd's {schema.SCHEMA_VERSION}: upgrade waportd")
                    for version in range(before + 1, schema.SCHEMA_VERSION + 1):
                        with conn.transaction():
                            for statement in schema.MIGRATIONS[version]:
                                conn.execute(statement)
                            conn.execute("INSERT INTO waport_schema (version) VALUES (%s) ON CONFLICT (one) "
                                         "DO UPDATE SET version = EXCLUDED.version", (version,))
                    return before
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (schema.MIGRATION_LOCK,))
            finally:
                ms = int(self.statement_timeout * 1000)
                conn.execute(f"SET statement_timeout = {ms}")
                conn.execute(f"SET lock_timeout = {ms}")

        saved, self.call_timeout = self.call_timeout, max(self.call_timeout, 60.0)
        try:
            return self._call("migrate", run)
        finally:
            self.call_timeout = saved

    # ------------------------------------------------------------ hosts

    def beat(self, capacity: int, companies: int, state: str = "up") -> None:
        """This host is alive: its row with heartbeat_at = now() (started_at on this store's first beat).
        A host drained by `set_host_state` stays draining when it beats `up`, until it restarts."""
        if state not in HOST_STATES:
            raise ValueError(f"host state {state!r} is not one of {', '.join(HOST_STATES)}")
        first = not self._started
        self._call("beat", lambda conn: conn.execute(
            """INSERT INTO waport_hosts AS h (host_id, started_at, heartbeat_at, capacity, state, companies)
               VALUES (%(host)s, now(), now(), %(capacity)s, %(state)s, %(companies)s)
               ON CONFLICT (host_id) DO UPDATE SET heartbeat_at = now(), capacity = EXCLUDED.capacity,
                   companies = EXCLUDED.companies,
                   state = CASE WHEN NOT %(first)s AND h.state = 'draining' AND EXCLUDED.state = 'up'
                                THEN h.state ELSE EXCLUDED.state END,
                   started_at = CASE WHEN %(first)s THEN now() ELSE h.started_at END""",
            {"host": self.host_id, "capacity": int(capacity), "state": state, "companies": int(companies),
             "first": first}))
        self._started = True

    def set_host_state(self, host_id: str, state: str) -> bool:
        """Set any host's state (`drain`: draining); its own beats keep `draining` until it restarts.
        False: no such host."""
        if state not in HOST_STATES:
            raise ValueError(f"host state {state!r} is not one of {', '.join(HOST_STATES)}")
        row = self._call("set_host_state", lambda conn: conn.execute(
            "UPDATE waport_hosts SET state = %(state)s WHERE host_id = %(host)s RETURNING host_id",
            {"host": host_id, "state": state}).fetchone())
        return row is not None

    def hosts(self) -> list[Host]:
        rows = self._call("hosts", lambda conn: conn.execute(
            """SELECT host_id, state, EXTRACT(EPOCH FROM now() - heartbeat_at)::float8, capacity, companies,
                      started_at
               FROM waport_hosts ORDER BY host_id""").fetchall())
        return [Host(*row) for row in rows]

    # ------------------------------------------------------------ leases

    def claim_many(self, companies: list[str]) -> dict[str, Lease]:
        """Take each lease of `companies` that nobody holds, that expired, or that is mine, in one statement
        (a dead host's hundreds at once): a new or expired lease gets epoch + 1 (a first one epoch 1), my own
        live one keeps its epoch. A company missing from the answer is another host's, or its row was locked
        at that moment (a renewal, a worker's or webhook writer's lease check): the next round tries again.
        It never waits for another transaction's row lock, so a stalled one holds up only its own company
        and nothing waits for it in a cycle; of two hosts inserting the same new rows, both go in name
        order, so one waits for the other's, never both."""
        if not companies:
            return {}
        rows = self._call("claim", lambda conn: conn.execute(
            """WITH takeable AS MATERIALIZED (
                   SELECT company FROM waport_leases
                   WHERE company = ANY(%(companies)s::text[])
                     AND (owner = %(owner)s OR expires_at <= now())
                   ORDER BY company FOR NO KEY UPDATE SKIP LOCKED)
               INSERT INTO waport_leases AS l (company, owner, epoch, expires_at)
               SELECT c, %(owner)s, 1, now() + make_interval(secs => %(ttl)s)
               FROM unnest(%(companies)s::text[]) AS c
               WHERE c IN (SELECT company FROM takeable)
                  OR NOT EXISTS (SELECT 1 FROM waport_leases WHERE company = c)
               ORDER BY c
               ON CONFLICT (company) DO UPDATE SET
                   owner = EXCLUDED.owner,
                   epoch = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > now() THEN l.epoch
                                ELSE l.epoch + 1 END,
                   expires_at = EXCLUDED.expires_at
               WHERE l.owner = EXCLUDED.owner OR l.expires_at <= now()
               RETURNING company, epoch, expires_at, now()""",
            {"companies": sorted(set(companies)), "owner": self.host_id, "ttl": self.lease_ttl}).fetchall())
        return {row[0]: Lease(*row) for row in rows}

    def renew(self, companies: dict[str, int]) -> dict[str, Lease]:
        """Extend every lease of `companies` (company -> epoch) still mine at that epoch, in one statement.
        A company missing from the answer is lost: another host took it (a newer epoch)."""
        if not companies:
            return {}
        names = list(companies)
        rows = self._call("renew", lambda conn: conn.execute(
            """UPDATE waport_leases AS l SET expires_at = now() + make_interval(secs => %(ttl)s)
               FROM unnest(%(companies)s::text[], %(epochs)s::bigint[]) AS r(company, epoch)
               WHERE l.company = r.company AND l.epoch = r.epoch AND l.owner = %(owner)s
               RETURNING l.company, l.epoch, l.expires_at, now()""",
            {"ttl": self.lease_ttl, "companies": names, "epochs": [int(companies[c]) for c in names],
             "owner": self.host_id}).fetchall())
        return {row[0]: Lease(*row) for row in rows}

    def release(self, company: str, epoch: int) -> bool:
        """End my lease of `company` at `epoch` now (a graceful stop, a move): it expires rather than
        disappears, so the next owner's epoch is still higher. False: it was not mine at that epoch."""
        row = self._call("release", lambda conn: conn.execute(
            """UPDATE waport_leases SET expires_at = now()
               WHERE company = %(company)s AND owner = %(owner)s AND epoch = %(epoch)s RETURNING epoch""",
            {"company": company, "owner": self.host_id, "epoch": int(epoch)}).fetchone())
        return row is not None

    def leases(self) -> list[LeaseRow]:
        rows = self._call("leases", lambda conn: conn.execute(
            """SELECT company, owner, epoch, expires_at, expires_at > now(),
                      EXTRACT(EPOCH FROM expires_at - now())::float8
               FROM waport_leases ORDER BY company""").fetchall())
        return [LeaseRow(*row) for row in rows]

    def fence_older_many(self, epochs: dict[str, int]) -> int:
        """End every database connection made for a company of `epochs` under an epoch older than the one
        given (a host that wakes late cannot write with them any more), and wait up to 2 s for them to be
        gone — all at once: PostgreSQL's own wait looks every 100 ms, once per connection. How many."""
        if not epochs:
            return 0
        newest = {schema.company_token(company): epoch for company, epoch in epochs.items()}

        def run(conn: psycopg.Connection) -> int:
            rows = conn.execute(
                """SELECT pid, application_name FROM pg_stat_activity
                   WHERE application_name LIKE ANY(%(prefixes)s) AND pid <> pg_backend_pid()""",
                {"prefixes": [schema.like_prefix(company) for company in epochs]}).fetchall()
            pids = []
            for pid, name in rows:
                parsed = schema.parse_application_name(name)
                if parsed is not None and parsed[0] in newest and parsed[1] < newest[parsed[0]]:
                    pids.append(pid)
            if not pids:
                return 0
            row = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                               "FROM unnest(%(pids)s::int[]) AS pid", {"pids": pids}).fetchone()
            ended = int(row[0]) if row else 0
            deadline = time.monotonic() + FENCE_WAIT
            while time.monotonic() < deadline and conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%(pids)s) LIMIT 1", {"pids": pids}).fetchone():
                time.sleep(0.02)
            return ended

        return self._call("fence_older", run)

    # ------------------------------------------------------------ desired state

    def wanted(self) -> list[Wanted]:
        """The companies the cluster should run (a stopped one keeps its row, with its preferred host)."""
        rows = self._call("wanted", lambda conn: conn.execute(
            "SELECT company, proxy, preferred_host, updated_at FROM waport_companies WHERE wanted "
            "ORDER BY company").fetchall())
        return [Wanted(*row) for row in rows]

    def set_wanted(self, company: str, wanted: bool, proxy: str | None = None) -> None:
        """Whether the cluster should run `company` (and through which proxy); its preferred host stays."""
        self._call("set_wanted", lambda conn: conn.execute(
            """INSERT INTO waport_companies (company, wanted, proxy, updated_at)
               VALUES (%(company)s, %(wanted)s, %(proxy)s, now())
               ON CONFLICT (company) DO UPDATE SET wanted = EXCLUDED.wanted, proxy = EXCLUDED.proxy,
                   updated_at = now()""",
            {"company": company, "wanted": bool(wanted), "proxy": proxy}))

    def set_preferred(self, company: str, host: str | None) -> bool:
        """Where `company` should run (`move`), or None for wherever placement says. False: no such company."""
        row = self._call("set_preferred", lambda conn: conn.execute(
            """UPDATE waport_companies SET preferred_host = %(host)s, updated_at = now()
               WHERE company = %(company)s RETURNING company""",
            {"company": company, "host": host}).fetchone())
        return row is not None

    # ------------------------------------------------------------ credentials (the sim backend's session)

    def credentials(self, company: str) -> dict | None:
        row = self._call("credentials", lambda conn: conn.execute(
            schema.GET_CREDENTIALS_SQL, {"company": company}).fetchone())
        return row[0] if row else None

    def put_credentials(self, company: str, epoch: int, data: dict) -> bool:
        """Store `company`'s credentials on behalf of lease `epoch`; False: refused, the lease has another
        epoch (this host's lease was taken over)."""
        row = self._call("put_credentials", lambda conn: conn.execute(
            schema.PUT_CREDENTIALS_SQL, {"company": company, "epoch": int(epoch), "data": Jsonb(data)}).fetchone())
        return row is not None

    # ------------------------------------------------------------ API tokens (DESIGN.md §9; waportd/tokensync.py)

    def tokens(self, since: datetime | None = None) -> tuple[datetime, list[tuple[str, Any]]]:
        """The database's now() and every token row (id, record) written after `since` (None: all), in one
        statement: an idle host's look costs one query that returns a row of nulls."""
        rows = self._call("tokens", lambda conn: conn.execute(
            """SELECT n.now, t.id, t.record FROM (SELECT now()) AS n (now)
               LEFT JOIN waport_tokens t ON %(since)s::timestamptz IS NULL OR t.updated_at > %(since)s
               ORDER BY t.id""", {"since": since}).fetchall())
        return rows[0][0], [(token_id, record) for _, token_id, record in rows if token_id is not None]

    def upload_tokens(self, records: list[dict[str, Any]]) -> int:
        """A host's own token file joins the cluster: a token PostgreSQL lacks is added, and a revocation it
        lacks is added to its record (same hash); nothing else of a row there changes, so no older copy ever
        undoes a revocation. How many rows were written."""
        if not records:
            return 0
        return self._call("upload_tokens", lambda conn: conn.execute(
            """INSERT INTO waport_tokens AS t (id, record, updated_at)
               SELECT r ->> 'id', r, now() FROM jsonb_array_elements(%(records)s) AS r
               ON CONFLICT (id) DO UPDATE
                   SET record = jsonb_set(t.record, '{revoked_at}', EXCLUDED.record -> 'revoked_at'),
                       updated_at = now()
                   WHERE t.record ->> 'revoked_at' IS NULL AND EXCLUDED.record ->> 'revoked_at' IS NOT NULL
                     AND t.record ->> 'sha256' = EXCLUDED.record ->> 'sha256'""",
            {"records": Jsonb(records)}).rowcount)

    def add_token(self, record: dict[str, Any]) -> bool:
        """A new token's record; False: that id is taken already (nothing was written)."""
        row = self._call("add_token", lambda conn: conn.execute(
            """INSERT INTO waport_tokens (id, record, updated_at) VALUES (%(id)s, %(record)s, now())
               ON CONFLICT (id) DO NOTHING RETURNING id""", {"id": record["id"], "record": Jsonb(record)}).fetchone())
        return row is not None

    def revoke_token(self, token_id: str, at: float) -> tuple[dict[str, Any], bool] | None:
        """Revoke a token as of `at` unless it is revoked already (its first time stays), in one statement:
        (its record now, whether this call revoked it); None: no such token."""
        row = self._call("revoke_token", lambda conn: conn.execute(
            """WITH done AS (
                   UPDATE waport_tokens SET record = jsonb_set(record, '{revoked_at}', %(at)s), updated_at = now()
                   WHERE id = %(id)s AND record ->> 'revoked_at' IS NULL RETURNING record)
               SELECT record, true FROM done
               UNION ALL
               SELECT record, false FROM waport_tokens WHERE id = %(id)s AND NOT EXISTS (SELECT 1 FROM done)""",
            {"id": token_id, "at": Jsonb(at)}).fetchone())
        return (row[0], row[1]) if row else None

    # ------------------------------------------------------------ between hosts

    def post(self, letters: list[tuple[str, str, str]]) -> None:
        """Mail (to_host, kind, body) from this host, in one statement; each addressee hears a NOTIFY.
        Mail older than MAIL_KEEP_SECONDS (its host died before taking it) goes at the same time."""
        if not letters:
            return
        self._call("post", lambda conn: conn.execute(
            """WITH m AS (INSERT INTO waport_mail (to_host, from_host, kind, body)
                          SELECT t, %(me)s, k, b FROM unnest(%(to)s::text[], %(kind)s::text[], %(body)s::text[])
                              AS x(t, k, b)
                          RETURNING to_host),
                    old AS (DELETE FROM waport_mail
                            WHERE created_at < now() - make_interval(secs => %(keep)s) RETURNING 1)
               SELECT pg_notify(%(channel)s, to_host) FROM (SELECT DISTINCT to_host FROM m) AS d""",
            {"me": self.host_id, "to": [t for t, _, _ in letters], "kind": [k for _, k, _ in letters],
             "body": [b for _, _, b in letters], "keep": schema.MAIL_KEEP_SECONDS,
             "channel": schema.MAIL_CHANNEL}).fetchall())

    def broadcast(self, payloads: list[str]) -> None:
        """NOTIFY every host listening (this one too) with each payload (each under NOTIFY_MAX_BYTES)."""
        if payloads:
            self._call("broadcast", lambda conn: conn.execute(
                "SELECT pg_notify(%(channel)s, p) FROM unnest(%(p)s::text[]) AS p",
                {"channel": schema.EVENTS_CHANNEL, "p": payloads}).fetchall())


class ClusterLink(threading.Thread):
    """A ClusterStore on a thread of its own: the supervisor's loop `submit`s work (a function of the store)
    with what to do with its result, and runs those in `take_done` after `wake` poked it (as with the Redis
    bridge): the loop never waits for PostgreSQL. The schema is migrated before the first work runs (and
    again before the next while that fails)."""

    def __init__(self, dsn: str, host_id: str, lease_ttl: float, wake: Callable[[], None], role: str = "",
                 **store_options: Any) -> None:
        """`role`: which of this host's links it is ("leases"), in its thread's and connection's names."""
        super().__init__(name=f"cluster-{role}" if role else "cluster", daemon=True)
        self.store = ClusterStore(dsn, host_id, lease_ttl, role=role, **store_options)
        self.wake = wake
        self.cond = threading.Condition()
        self.works: deque[tuple[Callable[[ClusterStore], Any], Callable[[Any], None]]] = deque()
        self.done: deque[tuple[Callable[[Any], None], Any]] = deque()
        self.migrated = False
        self.ready = threading.Event()  # set once the schema is migrated
        self.stopping = False

    def submit(self, work: Callable[[ClusterStore], Any], done: Callable[[Any], None]) -> None:
        """Run `work(store)` on the thread; `done` gets its result, or the exception it raised."""
        with self.cond:
            self.works.append((work, done))
            self.cond.notify()

    def pending(self) -> int:
        with self.cond:
            return len(self.works)

    def take_done(self) -> int:
        """On the loop: hand each finished work's result to its `done`; how many."""
        with self.cond:
            finished = list(self.done)
            self.done.clear()
        for done, result in finished:
            try:
                done(result)
            except Exception:  # noqa: BLE001 - one bad callback must not lose the others' results
                log.exception("cluster: handling a result failed")
        return len(finished)

    def stop(self, timeout: float = 5.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.join(timeout)
        self.store.close()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.works and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                work, done = self.works.popleft()
            result: Any
            try:
                if not self.migrated:
                    self.store.migrate()
                    self.migrated = True
                    self.ready.set()
                result = work(self.store)
            except StoreError as exc:
                result = exc
            except Exception as exc:  # noqa: BLE001 - a bug must not end the thread: the work failed
                log.exception("cluster: a call to the store failed")
                result = exc
            with self.cond:
                self.done.append((done, result))
            self.wake()


@dataclass(frozen=True)
class Letter:
    """Mail from another host (ClusterStore.post), taken by this one."""

    from_host: str
    kind: str
    body: str


class ClusterListener(threading.Thread):
    """What other hosts say to this one, on a connection of its own that LISTENs: mail addressed here
    (taken from waport_mail as its NOTIFY arrives, and every `sweep` seconds in case one was missed) and
    the events every host broadcasts. The loop reads both with `take` after `wake`. A lost connection is
    made again after a second; what was mailed meanwhile waits in the table."""

    def __init__(self, store: ClusterStore, wake: Callable[[], None], ready: threading.Event,
                 sweep: float = 2.0) -> None:
        super().__init__(name="cluster-listen", daemon=True)
        self.store = store
        self.ready = ready  # the schema is there (ClusterLink migrates it)
        self.wake = wake
        self.sweep = sweep
        self.lock = threading.Lock()
        self.letters: deque[Letter] = deque()
        self.events: deque[str] = deque()
        self.stopping = threading.Event()
        self.listening = threading.Event()  # set while LISTEN holds (tests wait for it)

    def take(self) -> tuple[list[Letter], list[str]]:
        with self.lock:
            letters, events = list(self.letters), list(self.events)
            self.letters.clear()
            self.events.clear()
        return letters, events

    def stop(self, timeout: float = 3.0) -> None:
        self.stopping.set()
        self.join(timeout)

    def run(self) -> None:
        while not self.ready.wait(0.5):
            if self.stopping.is_set():
                return
        while not self.stopping.is_set():
            conn = None
            try:
                conn = self.store._connect("listen")
                conn.execute(f"LISTEN {schema.MAIL_CHANNEL}")
                conn.execute(f"LISTEN {schema.EVENTS_CHANNEL}")
                self.listening.set()
                self.serve(conn)
            except psycopg.Error as exc:
                if not self.stopping.is_set():
                    log.warning("cluster: listening to other hosts failed (%s); again in 1 s",
                                self.store._clean(exc))
            except Exception:  # noqa: BLE001 - a bug must not end the thread
                log.exception("cluster: the listener failed; again in 1 s")
            finally:
                self.listening.clear()
                if conn is not None:
                    conn.close()
            self.stopping.wait(1.0)

    def serve(self, conn: psycopg.Connection) -> None:
        me = self.store.host_id
        self.collect(conn)  # what came while nobody listened
        next_sweep = time.monotonic() + self.sweep
        while not self.stopping.is_set():
            mail = False
            for note in conn.notifies(timeout=0.5):
                if note.channel == schema.MAIL_CHANNEL:
                    mail = mail or note.payload == me
                else:
                    with self.lock:
                        self.events.append(note.payload)
                    self.wake()
                if mail:
                    break
            if mail or time.monotonic() >= next_sweep:
                self.collect(conn)
                next_sweep = time.monotonic() + self.sweep

    def collect(self, conn: psycopg.Connection) -> None:
        rows = conn.execute("DELETE FROM waport_mail WHERE to_host = %(me)s RETURNING id, from_host, kind, body",
                            {"me": self.store.host_id}).fetchall()
        if rows:
            rows.sort()
            with self.lock:
                self.letters.extend(Letter(f, k, b) for _, f, k, b in rows)
            self.wake()
