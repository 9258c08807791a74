"""neonize workers in cluster mode (DESIGN.md §12), as far as they go without WhatsApp: whatsmeow's store in
the cluster's PostgreSQL, upgraded once; a company without a device pairs a new one (never the store's
first); a company whose device is gone from the store is logged out instead of crashing neonize."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from conftest import Daemon, PgServer, wait_for, whatsapp_resolves

REASON = "connect_failed: cannot reach WhatsApp: DNS lookup of web.whatsapp.com failed (no such host)"
pytestmark = pytest.mark.skipif(whatsapp_resolves(), reason="this machine can reach WhatsApp: these need none")


def host(base: str, pg: PgServer, **config: Any) -> Daemon:
    os.makedirs(base, exist_ok=True)
    return Daemon(base, backend="neonize", cluster_dsn=pg.dsn + "?sslmode=disable", host_id="h1", lease_ttl=6.0,
                  lease_renew_interval=0.5, fence_after=3.0, heartbeat_interval=0.5, **config)


def test_the_store_is_upgraded_once_and_a_company_without_a_device_pairs_a_new_one(short_tmp: str, pg) -> None:
    d = host(os.path.join(short_tmp, "h1"), pg).start()
    try:
        for name in ("acme", "beta", "gamma"):  # three workers open the store at once
            d.ctl("start", company=name)
        for name in ("acme", "beta", "gamma"):
            record = d.wait_state(name, "backoff", timeout=40)
            assert record["reason"] == REASON and record["host"] == "h1"  # the real no-network failure, no crash
        assert len(pg.sql("SELECT neonize FROM waport_store_upgrades")) == 1
        assert pg.sql("SELECT count(*) FROM whatsmeow_version") == [(1,)]  # whatsmeow's own schema, current
        assert pg.sql("SELECT count(*) FROM whatsmeow_device") == [(0,)]  # new devices: written once paired
        assert pg.sql("SELECT count(*) FROM waport_credentials") == [(0,)]
        ps = pg.sql("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'waport/%%'")
        assert all(name.split("/")[1] in ("acme", "beta", "gamma") for (name,) in ps)
        with open(f"/proc/{d.proc.pid}/cmdline", "rb") as f:
            assert b"postgresql://" not in f.read()  # the DSN is in the config file and the workers' secrets
    finally:
        d.cleanup()


def test_a_device_gone_from_the_store_is_logged_out_not_a_crash(short_tmp: str, pg) -> None:
    d = host(os.path.join(short_tmp, "h1"), pg).start()
    try:
        # The lease row must exist for the worker's read of its credentials: start once, then plant a JID
        # whatsmeow does not hold (the device was unlinked from the phone while no worker ran).
        d.ctl("start", company="acme")
        d.wait_state("acme", "backoff", timeout=40)
        d.ctl("stop", company="acme")
        d.wait_state("acme", "stopped", timeout=20)
        pg.sql("INSERT INTO waport_credentials (company, epoch, data) VALUES ('acme', 0, %s)",
               json.dumps({"jid": "15550001111:3@s.whatsapp.net"}))
        d.ctl("start", company="acme")
        record = wait_for(lambda: (r := d.status("acme"))["state"] == "logged_out" and r, timeout=40,
                          what="acme logged out")
        assert "gone from the store" in record["reason"]
        assert pg.sql("SELECT count(*) FROM waport_credentials") == [(0,)]  # the next start pairs anew
    finally:
        d.cleanup()

