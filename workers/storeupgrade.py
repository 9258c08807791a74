"""Bring whatsmeow's store in PostgreSQL to this neonize's schema, once, before any neonize worker starts
(cluster mode, DESIGN.md §12).

whatsmeow upgrades its schema whenever a client opens the store, with no lock between processes: two
workers upgrading one database at once fail ("duplicate key", "column already exists"). So the
supervisor runs this first, holding its migration advisory lock (waportd/clusterstore.py), and the
workers then find the schema current. It opens the store and lists its devices — which upgrades it — and
never dials WhatsApp. The DSN comes in the secrets environment variable, never in the arguments.

    python -m workers.storeupgrade      # exit 0: upgraded (or current); 1: it failed (one line says why)
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

from ipc import protocol
from ipc.pgdb import clean_error, password


def upgrade(dsn: str) -> int:
    """Open the store (whatsmeow's upgrade runs), return how many devices it holds."""
    import neonize.client as nz_client  # a process of its own: the Go library loads here, and goes with it

    callback = nz_client.func_callback_bytes2(nz_client.log_whatsmeow)
    raw = nz_client.gocode.GetAllDevices(dsn.encode(), callback)
    text = raw.decode() if isinstance(raw, bytes) else ctypes.string_at(raw).decode() if raw else ""
    if text.startswith("error"):
        raise RuntimeError(text.split("\n", 1)[0][:300])
    return len([d for d in text.split("|\u0001|") if d]) if text else 0


def main() -> int:
    secrets = json.loads(os.environ.pop(protocol.SECRETS_ENV, "") or "{}")
    dsn = secrets.get("cluster_dsn")
    if not isinstance(dsn, str) or not dsn.startswith(("postgres://", "postgresql://")):
        print("storeupgrade: no cluster_dsn (a postgres:// URL) in the secrets", file=sys.stderr)
        return 2
    try:
        devices = upgrade(dsn)
    except Exception as exc:  # noqa: BLE001 - one line for the supervisor's log
        print(f"storeupgrade: the WhatsApp store could not be upgraded: {clean_error(exc, password(dsn))}",
              file=sys.stderr)
        return 1
    print(f"storeupgrade: the WhatsApp store is current ({devices} devices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
