"""One PostgreSQL connection, bounded in time, for the journals of cluster mode (DESIGN.md §12).

A connect gives up after `connect_timeout`, a statement after `statement_timeout` (server side), and a
call after `call_timeout` whatever the server does (a watchdog shuts the socket: a SIGSTOPped server or a
cut network answers nothing, not even an error). A call that fails raises `PgUnavailable`, a subclass of
sqlite3's error, so every path that handles a journal which cannot be written (waport's SQLite journal)
handles this one too; the next call connects again. psycopg is imported only here, and only when used.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

CONNECT_TIMEOUT = 2  # libpq counts whole seconds (and treats 1 as 2)
STATEMENT_TIMEOUT = 2.0
CALL_TIMEOUT = 4.0


class PgUnavailable(sqlite3.OperationalError):
    """PostgreSQL did not take the call (unreachable, too slow, or it refused it); nothing was committed."""


class PgDb:
    def __init__(self, dsn: str, application_name: str, statement_timeout: float = STATEMENT_TIMEOUT,
                 call_timeout: float = CALL_TIMEOUT) -> None:
        self._dsn = dsn
        self.application_name = application_name
        self.statement_timeout = statement_timeout
        self.call_timeout = call_timeout
        self._conn: Any = None
        self._lock = threading.Lock()
        self._secret = password(dsn)
        self.last_used = 0.0  # time.monotonic() of the last call
        self.what = "the cluster journal"  # what its errors say failed

    def __repr__(self) -> str:
        return f"PgDb({self.application_name!r})"  # never the DSN: it may hold a password

    def call(self, what: str, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """`fn(connection)` (autocommit; `with conn.transaction()` for several statements), bounded by
        `timeout` (default `call_timeout`: a call moving many megabytes, a media file's, needs longer)."""
        import psycopg

        with self._lock:
            fired = threading.Event()
            bound = timeout or self.call_timeout
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = None
                    self._conn = self._connect()
                conn = self._conn
                ticket = watchdog().watch(conn, bound, fired)
                try:
                    return fn(conn)
                finally:
                    watchdog().done(ticket)
                    self.last_used = time.monotonic()
            except psycopg.Error as exc:
                if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
                    self._drop()
                text = f"no answer in {bound:g} s" if fired.is_set() else self._clean(exc)
            raise PgUnavailable(f"{self.what} ({what}): {text}")

    def _connect(self) -> Any:
        return connect_bounded(self._dsn, self.application_name, CONNECT_TIMEOUT, self.statement_timeout,
                               self.call_timeout)

    def _clean(self, exc: BaseException) -> str:
        return clean_error(exc, self._secret)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def close_if_idle(self, idle: float) -> bool:
        """Close the connection when no call used it for `idle` seconds (the next call connects again): an
        idle company holds no PostgreSQL connection. Whether it closed one."""
        if self._conn is None or time.monotonic() - self.last_used < idle or not self._lock.acquire(blocking=False):
            return False
        try:
            self._drop()
        finally:
            self._lock.release()
        return True


def connect_bounded(dsn: str, application_name: str, connect_timeout: float, statement_timeout: float,
                    call_timeout: float) -> Any:
    """An autocommit connection whose connect, statements, locks and unacknowledged sends are all bounded."""
    import psycopg

    ms = int(statement_timeout * 1000)
    return psycopg.connect(
        dsn, autocommit=True, connect_timeout=max(2, round(connect_timeout)),  # libpq: whole seconds, 1 means 2
        application_name=application_name,
        options=f"-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout=60000",
        keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
        tcp_user_timeout=int(call_timeout * 1000))


def clean_error(exc: BaseException, secret: str | None) -> str:
    """The first line of a driver's error, with the password (if any) replaced by ***."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return text.replace(secret, "***") if secret else text


def close_quietly(conn: Any) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - it is gone either way
            pass


class Watchdog(threading.Thread):
    """One thread for every call of the process: it shuts the socket of a call still running at its deadline.
    (A timer thread per call costs a thread start each time, which a process starved of CPU waits for.)"""

    def __init__(self) -> None:
        super().__init__(name="pg-watchdog", daemon=True)
        self.cond = threading.Condition()
        self.calls: dict[int, tuple[float, Any, threading.Event]] = {}
        self.next_ticket = 0

    def watch(self, conn: Any, seconds: float, fired: threading.Event) -> int:
        with self.cond:
            self.next_ticket += 1
            self.calls[self.next_ticket] = (time.monotonic() + seconds, conn, fired)
            self.cond.notify()
            return self.next_ticket

    def done(self, ticket: int) -> None:
        with self.cond:
            self.calls.pop(ticket, None)

    def run(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                due = [t for t, (deadline, _, _) in self.calls.items() if deadline <= now]
                fire = [self.calls.pop(t) for t in due]
                if not fire:
                    soonest = min((d for d, _, _ in self.calls.values()), default=None)
                    self.cond.wait(None if soonest is None else max(0.01, soonest - now))
                    continue
            for _, conn, fired in fire:
                shut_socket(conn, fired)


_watchdog: Watchdog | None = None
_watchdog_lock = threading.Lock()


def watchdog() -> Watchdog:
    """The process's watchdog, started at its first use (after any fork: a forked thread does not run)."""
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = Watchdog()
            _watchdog.start()
        return _watchdog


def shut_socket(conn: Any, fired: threading.Event) -> None:
    """A watchdog's end of a call that waits too long: shut its socket, so the read returns at once."""
    fired.set()
    try:
        sock = socket.socket(fileno=socket.dup(conn.pgconn.socket))
    except Exception:  # noqa: BLE001 - already closed
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def password(dsn: str) -> str | None:
    """The DSN's password (URL or keyword form), to keep it out of any message."""
    import psycopg

    try:
        value = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        return None
    return str(value) if value else None
