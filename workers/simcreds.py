"""Where the sim backend keeps its credentials: the network's token for the company's device.

One host: a file in the session directory (0600), written only by the worker holding the session lock.
Cluster mode (DESIGN.md §12): the company's row of `waport_credentials` in PostgreSQL, so whichever
host holds its lease connects without pairing again. There every write carries the worker's lease
epoch and is refused when the lease row holds another epoch (`Fenced`); a database that cannot be
reached is `Unavailable`, never "no credentials": pairing anew then would make a second device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Protocol

from ipc import clusterschema, jsonsafe
from ipc.files import write_json_atomic
from ipc.pgdb import clean_error, password

# These run on the worker's loop, which also fences the session by its lease deadline: an operation may hold
# it up to about CONNECT_TIMEOUT + 2 statements, well inside the lease's margin (lease_ttl - fence_after).
CONNECT_TIMEOUT = 2  # seconds: libpq's smallest (it counts whole seconds, and 1 means 2)
STATEMENT_TIMEOUT_MS = 1000  # a statement stuck behind a lock or a frozen server ends instead


class Unavailable(Exception):
    """The store cannot be read or written now (PostgreSQL down or unreachable): try again later."""


class Fenced(Exception):
    """The company's lease belongs to another epoch: this worker must stop its session."""


class Unreadable(Exception):
    """Stored credentials that do not parse: all that is left is pairing again."""


class CredsStore(Protocol):
    def load(self) -> dict[str, Any]: ...

    def save(self, creds: dict[str, Any]) -> None: ...

    def delete(self) -> None: ...


class FileCreds:
    """The session directory's `sim-creds.json`, read at every connection attempt (as it always was)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = jsonsafe.loads(f.read())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise Unreadable(f"unreadable {self.path}") from None
        return data if isinstance(data, dict) else {}

    def save(self, creds: dict[str, Any]) -> None:
        write_json_atomic(self.path, creds)  # 0600: the token is the session

    def delete(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# The worker's own statements (the shared ones are in ipc/clusterschema.py). FOR SHARE: a new owner's claim,
# which bumps the epoch, waits until this transaction ends, so the check holds for the statement after it.
LEASE_EPOCH_SQL = "SELECT epoch FROM waport_leases WHERE company = %(company)s FOR SHARE"
DELETE_CREDENTIALS_SQL = ("DELETE FROM waport_credentials WHERE company = %(company)s AND (SELECT epoch FROM"
                          " waport_leases WHERE company = %(company)s FOR SHARE) = %(epoch)s")


class PgCreds:
    """The company's `waport_credentials` row, on behalf of lease epoch `epoch`.

    One short connection per operation (read at start, write when paired, delete on logout: a few in a
    session's life), so an idle worker holds no PostgreSQL connection; each sets `application_name` to the
    company and epoch, so a new owner can end it, and a short `statement_timeout`. The row is read once:
    while the lease is ours this worker is its only writer, so reconnects use what it holds.
    """

    def __init__(self, dsn: str, company: str, epoch: int) -> None:
        self.dsn = dsn
        self.company = company
        self.epoch = epoch
        self._cached: dict[str, Any] | None = None

    def load(self) -> dict[str, Any]:
        """Read at start, and only while the lease is at our epoch: a late worker never connects."""
        if self._cached is None:
            with self._connect() as conn:
                self._check_lease(conn)
                row = self._fetch(conn, clusterschema.GET_CREDENTIALS_SQL)
            data = row[0] if row is not None else None
            self._cached = data if isinstance(data, dict) else {}
        return dict(self._cached)

    def save(self, creds: dict[str, Any]) -> None:
        from psycopg.types.json import Jsonb

        with self._connect() as conn:
            row = self._fetch(conn, clusterschema.PUT_CREDENTIALS_SQL, data=Jsonb(creds))
            if row is None:  # refused: the lease (or the row) belongs to a newer epoch
                self._check_lease(conn)
                raise Fenced(f"the credentials of {self.company} were written by a newer epoch than {self.epoch}")
        self._cached = dict(creds)

    def delete(self) -> None:
        with self._connect() as conn:
            self._fetch(conn, DELETE_CREDENTIALS_SQL, result=False)
            self._check_lease(conn)  # deleted only if the lease was ours: else say so
        self._cached = {}

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        """A connection of its own, each statement committed by itself; any database error is `Unavailable`."""
        import psycopg  # only cluster-mode workers pay for the import

        try:
            # autocommit: each statement's lease check holds its row lock only while the server runs it, never
            # across round trips of a worker that may be starved of CPU (the host's renewal would wait for it)
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                 application_name=clusterschema.application_name(self.company, self.epoch),
                                 options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}") as conn:
                yield conn
        except psycopg.Error as exc:
            raise Unavailable(f"PostgreSQL: {clean_error(exc, password(self.dsn))}") from None

    def _fetch(self, conn: Any, sql: str, result: bool = True, **params: Any) -> Any:
        cur = conn.execute(sql, {"company": self.company, "epoch": self.epoch, **params})
        return cur.fetchone() if result else None

    def _check_lease(self, conn: Any) -> None:
        row = self._fetch(conn, LEASE_EPOCH_SQL)
        lease_epoch = row[0] if row is not None else None
        if lease_epoch != self.epoch:
            held = "no lease" if lease_epoch is None else f"epoch {lease_epoch}"
            raise Fenced(f"the lease of {self.company} is at {held}, this worker's is {self.epoch}")



def store_for(company: str, session_dir: str, options: dict[str, Any], filename: str) -> CredsStore:
    """PostgreSQL with the options `cluster_dsn` and `epoch` (cluster mode), else the session file."""
    dsn = options.get("cluster_dsn")
    if not dsn:
        return FileCreds(os.path.join(session_dir, filename))
    epoch = options.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ValueError("the option epoch (the lease's, an integer >= 1) is required with cluster_dsn")
    if not isinstance(dsn, str):
        raise ValueError("the option cluster_dsn must be a PostgreSQL URL")
    return PgCreds(dsn, company, epoch)
