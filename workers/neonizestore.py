"""whatsmeow's store in PostgreSQL for a neonize worker in cluster mode (DESIGN.md §12).

Every company's device lives in one database, keyed by its JID (whatsmeow's `whatsmeow_device`), so any host
can resume it. Two traps, both found in neonize's and whatsmeow's code:

- without a JID, neonize resumes the database's *first* device — another company's session. So the JID of
  each company's device is kept in its `waport_credentials` row ({"jid": ...}, written under the lease
  epoch like the sim backend's credentials: workers/simcreds.py), always passed, and a company without one
  pairs a *new* device. A JID whatsmeow no longer holds (unlinked from the phone while no worker ran) makes
  neonize panic, so it is looked up first and reported as logged out instead.
- whatsmeow upgrades its schema whenever a client opens the store, with no lock between processes. So the
  first worker of each neonize version runs the upgrade alone (`python -m workers.storeupgrade`) under an
  advisory lock and records it; every later worker finds it done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from typing import Any

from ipc import clusterschema, protocol
from ipc.pgdb import clean_error, connect_bounded, password

STORE_LOCK = 0x77706F7275  # "wporu": held while whatsmeow's schema is upgraded
UPGRADE_TIMEOUT = 120.0
CONNECT_TIMEOUT = 2


class StoreError(Exception):
    """The store cannot be prepared (PostgreSQL unreachable, the upgrade failed); the worker ends and the
    supervisor starts it again with backoff."""


def neonize_version() -> str:
    try:
        return metadata.version("neonize")
    except metadata.PackageNotFoundError:
        return "unknown"


def _connect(dsn: str, company: str, epoch: int, lock_wait: float = 5.0) -> Any:
    return connect_bounded(dsn, clusterschema.application_name(company, epoch), CONNECT_TIMEOUT, lock_wait, lock_wait)


def ensure_schema(dsn: str, company: str, epoch: int, run: Any = subprocess.run) -> bool:
    """whatsmeow's schema, upgraded once per neonize version across the cluster; whether this call ran it."""
    import psycopg

    version = neonize_version()
    try:
        with _connect(dsn, company, epoch, lock_wait=UPGRADE_TIMEOUT + 10) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (STORE_LOCK,))  # ends with the connection
            if conn.execute("SELECT 1 FROM waport_store_upgrades WHERE neonize = %s", (version,)).fetchone():
                return False
            env = {**os.environ, protocol.SECRETS_ENV: json.dumps({"cluster_dsn": dsn})}  # never in argv
            try:
                done = run([sys.executable, "-m", "workers.storeupgrade"], env=env, capture_output=True, text=True,
                           timeout=UPGRADE_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise StoreError(f"the WhatsApp store's upgrade took over {UPGRADE_TIMEOUT:g} s") from None
            if done.returncode != 0:
                lines = (done.stderr or done.stdout or "").strip().splitlines()
                raise StoreError(lines[-1] if lines else f"the store upgrade exited {done.returncode}")
            conn.execute("INSERT INTO waport_store_upgrades (neonize) VALUES (%s) ON CONFLICT DO NOTHING", (version,))
            return True
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL: {clean_error(exc, password(dsn))}") from None


def device_exists(dsn: str, company: str, epoch: int, jid: str) -> bool:
    import psycopg

    try:
        with _connect(dsn, company, epoch) as conn:
            return conn.execute("SELECT 1 FROM whatsmeow_device WHERE jid = %s", (jid,)).fetchone() is not None
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL: {clean_error(exc, password(dsn))}") from None


def jid_text(jid: Any) -> str:
    """A neonize JID as whatsmeow writes it in its store: user[.agent][:device]@server."""
    user = str(jid.User)
    if getattr(jid, "RawAgent", 0):
        user += f".{jid.RawAgent}"
    if getattr(jid, "Device", 0):
        user += f":{jid.Device}"
    return f"{user}@{jid.Server}"


def parse_jid(text: str, make: Any) -> Any:
    """The neonize JID (`make` is its proto class) of `user[.agent][:device]@server`."""
    user, at, server = text.partition("@")
    if not at or not user or not server:
        raise ValueError(f"not a device JID: {text[:60]!r}")
    user, _, device = user.partition(":")
    user, _, agent = user.partition(".")
    return make(User=user, RawAgent=int(agent or 0), Device=int(device or 0), Integrator=0, Server=server,
                IsEmpty=False)
