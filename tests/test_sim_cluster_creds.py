"""The sim backend's credentials in PostgreSQL (cluster mode, DESIGN.md §12), against a real PostgreSQL
server (`pg`) and a real simulated network: a company paired on one host connects from another without
pairing again; a write of an older epoch is refused and stops the session (`fenced`); a database that
cannot be read at start is an exit, never a new pairing (that would make a second device).

Each "host" is a session directory of its own; the lease row that a supervisor would hold is written
with SQL, as a new owner's claim would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import ROOT
from fakes import rig
from simnet_helpers import EventLog, InlineLoop, SimNetProcess, short_tmpdir, wait_until

from ipc import clusterschema, exitcodes, protocol
from workers import simcreds
from workers.backend import WorkerContext
from workers.sim_backend import CREDS_FILE, SimBackend
from workers.simcreds import Fenced, PgCreds

COMPANY = "acme"
Factory = Callable[..., tuple[InlineLoop, EventLog]]


def sql(dsn: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def migrate(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statements in clusterschema.MIGRATIONS.values():
            for statement in statements:
                conn.execute(statement)


def set_lease(dsn: str, epoch: int, owner: str = "host-a") -> None:
    """The lease row as a claim leaves it: `owner` holds `company` at `epoch` for the next 15 s."""
    sql(dsn, """INSERT INTO waport_leases (company, owner, epoch, expires_at)
                VALUES (%(company)s, %(owner)s, %(epoch)s, now() + interval '15 seconds')
                ON CONFLICT (company) DO UPDATE SET owner = EXCLUDED.owner, epoch = EXCLUDED.epoch,
                                                    expires_at = EXCLUDED.expires_at""",
        company=COMPANY, owner=owner, epoch=epoch)


def stored(dsn: str) -> tuple[int, dict[str, Any]] | None:
    rows = sql(dsn, "SELECT epoch, data FROM waport_credentials WHERE company = %(company)s", company=COMPANY)
    return rows[0] if rows else None


@pytest.fixture
def dsn(pg: Any) -> str:
    """The test server with the cluster schema, and a trigger that records which connection (by its
    application_name) wrote the credentials: the name a new owner ends an old epoch's connections by."""
    migrate(pg.dsn)
    sql(pg.dsn, "CREATE TABLE creds_writers (app text)")
    sql(pg.dsn, """CREATE FUNCTION note_writer() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN INSERT INTO creds_writers VALUES (current_setting('application_name')); RETURN NEW; END $$""")
    sql(pg.dsn, """CREATE TRIGGER note_writer AFTER INSERT OR UPDATE ON waport_credentials
                   FOR EACH ROW EXECUTE FUNCTION note_writer()""")
    return pg.dsn


@pytest.fixture
def hosts() -> Iterator[Factory]:
    """Sim backends in cluster mode, each in a session directory of its own (another host's), on a loop of
    its own as in the worker; every loop is stopped and every directory removed at the end."""
    made: list[InlineLoop] = []
    dirs: list[str] = []

    def make(endpoint: str, dsn: str, epoch: int, **options: Any) -> tuple[InlineLoop, EventLog]:
        directory = short_tmpdir()
        dirs.append(directory)
        log = EventLog()
        ctx = WorkerContext(COMPANY, directory, {"sim_endpoint": endpoint, "cluster_dsn": dsn, "epoch": epoch,
                                                 **options})
        loop = InlineLoop(log)
        made.append(loop)
        loop.start(SimBackend(ctx, loop.emit))
        return loop, log

    yield make
    for loop in made:
        loop.stop()
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


def session_dir_of(loop: InlineLoop) -> str:
    assert loop.backend is not None
    return loop.backend.ctx.session_dir


def paired_on_host_a(net: SimNetProcess, dsn: str, hosts: Factory) -> tuple[InlineLoop, dict[str, Any]]:
    set_lease(dsn, 1)
    first, log = hosts(net.endpoint, dsn, epoch=1)
    connected = log.wait_state("connected", timeout=10)
    return first, connected


def test_pairing_stores_the_credentials_in_postgresql_not_in_the_session_dir(
    auto_net: SimNetProcess, dsn: str, hosts: Factory
) -> None:
    first, connected = paired_on_host_a(auto_net, dsn, hosts)
    row = stored(dsn)
    assert row is not None
    epoch, data = row
    assert epoch == 1 and data["phone"] == connected["phone"] and data["token"]
    assert not os.path.exists(os.path.join(session_dir_of(first), CREDS_FILE))
    assert sql(dsn, "SELECT app FROM creds_writers") == [(clusterschema.application_name(COMPANY, 1),)]
    # The worker holds no connection between its writes: nothing of it in pg_stat_activity (once the server
    # process of the last write has gone: the view lags a closed connection by a moment).
    wait_until(lambda: sql(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'waport/%%'")
               == [(0,)], 5.0, "no worker connection in pg_stat_activity")


def test_another_host_with_a_newer_epoch_connects_without_pairing(
    auto_net: SimNetProcess, dsn: str, hosts: Factory
) -> None:
    first, connected = paired_on_host_a(auto_net, dsn, hosts)
    paired = stored(dsn)
    first.stop()  # host A's worker ends (bye)
    set_lease(dsn, 2, owner="host-b")  # host B claims the company
    second, log = hosts(auto_net.endpoint, dsn, epoch=2)
    assert log.wait_state("connected", timeout=10)["phone"] == connected["phone"]
    assert log.of("qr") == [] and log.states() == ["connecting", "connected"]
    stats = auto_net.stats()
    assert stats["pairings"] == 1 and stats["connects"] == 2 and stats["replaced"] == 0
    assert not os.path.exists(os.path.join(session_dir_of(second), CREDS_FILE))
    assert stored(dsn) == paired  # read, not rewritten


def test_a_worker_of_an_older_epoch_cannot_write_credentials_and_exits_fenced(
    net: SimNetProcess, dsn: str, hosts: Factory
) -> None:
    set_lease(dsn, 1)
    old, log = hosts(net.endpoint, dsn, epoch=1)
    qr = log.wait_for("qr", timeout=10)["code"]
    set_lease(dsn, 2, owner="host-b")  # meanwhile another host claimed the company
    net.call("scan", qr=qr, phone="15551112222")  # the pairing completes: the write is refused
    exit_ = log.wait_for("exit", timeout=10)
    assert exit_["reason"] == "fenced" and "epoch 2" in exit_["message"]
    assert "connected" not in log.states()
    assert stored(dsn) is None and sql(dsn, "SELECT app FROM creds_writers") == []
    assert not os.path.exists(os.path.join(session_dir_of(old), CREDS_FILE))
    wait_until(lambda: net.connections() == {}, 5, "the fenced session to leave the network")
    assert exitcodes.REASON_TO_CODE["fenced"] == exitcodes.FENCED


def test_refused_writes_of_an_older_epoch_leave_the_newer_credentials(dsn: str) -> None:
    set_lease(dsn, 2, owner="host-b")
    PgCreds(dsn, COMPANY, 2).save({"company": COMPANY, "token": "new", "phone": "15550000002"})
    old = PgCreds(dsn, COMPANY, 1)
    with pytest.raises(Fenced, match="epoch 2"):
        old.load()  # a late worker does not even connect with them
    with pytest.raises(Fenced):
        old.save({"company": COMPANY, "token": "old", "phone": "15550000001"})
    with pytest.raises(Fenced):
        old.delete()
    assert stored(dsn) == (2, {"company": COMPANY, "token": "new", "phone": "15550000002"})
    sql(dsn, "DELETE FROM waport_leases")  # no lease at all: nobody may write
    with pytest.raises(Fenced, match="no lease"):
        PgCreds(dsn, COMPANY, 2).save({"company": COMPANY, "token": "x", "phone": "1"})
    assert stored(dsn) == (2, {"company": COMPANY, "token": "new", "phone": "15550000002"})


@pytest.mark.pg_server
def test_postgresql_down_at_start_is_an_exit_never_a_new_pairing(
    auto_net: SimNetProcess, pg: Any, dsn: str, hosts: Factory
) -> None:
    first, connected = paired_on_host_a(auto_net, dsn, hosts)
    first.stop()
    pg.stop()
    blind, log = hosts(auto_net.endpoint, dsn, epoch=1)
    exit_ = log.wait_for("exit", timeout=15)
    assert exit_["reason"] == "database_unavailable" and "PostgreSQL" in exit_["message"]
    assert exitcodes.REASON_TO_CODE["database_unavailable"] == exitcodes.TEMPFAIL  # backed off, retried
    assert log.states() == ["connecting"] and log.of("qr") == []
    assert auto_net.stats()["pairings"] == 1 and auto_net.connections() == {}
    pg.start()  # the supervisor's retry, once the database is back: the same device connects
    again, log2 = hosts(auto_net.endpoint, dsn, epoch=1)
    assert log2.wait_state("connected", timeout=10)["phone"] == connected["phone"]
    assert auto_net.stats()["pairings"] == 1


@pytest.mark.pg_server
def test_a_frozen_postgresql_holds_the_worker_up_for_seconds_only(
    auto_net: SimNetProcess, pg: Any, dsn: str, hosts: Factory
) -> None:
    set_lease(dsn, 1)
    pg.pause()  # connections open, nothing answers
    try:
        started = time.monotonic()
        _blind, log = hosts(auto_net.endpoint, dsn, epoch=1)
        assert log.wait_for("exit", timeout=10)["reason"] == "database_unavailable"
        assert time.monotonic() - started < simcreds.CONNECT_TIMEOUT + 2
        assert auto_net.stats()["pairings"] == 0
    finally:
        pg.resume()


@pytest.mark.pg_server
def test_credentials_not_stored_while_postgresql_is_away_are_stored_once_it_is_back(
    net: SimNetProcess, pg: Any, dsn: str, hosts: Factory
) -> None:
    set_lease(dsn, 1)
    sim, log = hosts(net.endpoint, dsn, epoch=1)
    qr = log.wait_for("qr", timeout=10)["code"]
    pg.stop()
    net.call("scan", qr=qr, phone="15551112222")
    assert log.wait_state("connected", timeout=10)["phone"] == "15551112222"  # on the network all the same
    assert "not stored yet" in log.wait_for("error", lambda e: e["kind"] == "credentials", timeout=10)["message"]
    pg.start()
    row = wait_until(lambda: stored(dsn), 15, "the credentials in PostgreSQL")
    assert row[0] == 1 and row[1]["phone"] == "15551112222"
    assert not os.path.exists(os.path.join(session_dir_of(sim), CREDS_FILE))


def test_logout_deletes_the_credentials_row(auto_net: SimNetProcess, dsn: str, hosts: Factory) -> None:
    first, _connected = paired_on_host_a(auto_net, dsn, hosts)
    assert first.backend is not None
    first.backend.logout()
    assert stored(dsn) is None


def test_the_worker_process_gets_the_dsn_from_its_environment_and_exits_fenced(
    auto_net: SimNetProcess, dsn: str
) -> None:
    """The whole worker: the DSN comes in WAPORT_WORKER_SECRETS (never argv); a lease at another epoch
    ends it with the `fenced` exit code before it touches the network."""
    set_lease(dsn, 5, owner="host-b")
    session = short_tmpdir()
    try:
        cmd = [sys.executable, "-m", "workers", "--company", COMPANY, "--endpoint", "none", "--session-dir",
               session, "--backend", "sim", "--options", json.dumps({"sim_endpoint": auto_net.endpoint, "epoch": 4})]
        env = {**os.environ, protocol.SECRETS_ENV: json.dumps({"cluster_dsn": dsn})}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=30, capture_output=True, text=True)
        assert proc.returncode == exitcodes.FENCED, proc.stderr[-2000:]
        assert auto_net.stats()["pairings"] == 0 and auto_net.stats()["connects"] == 0
    finally:
        shutil.rmtree(session, ignore_errors=True)


def test_the_supervisor_passes_the_dsn_as_a_secret_and_the_epoch_as_an_option(tmp_path: Any) -> None:
    secret_dsn = "postgresql://waport:s3cret-pw@db.example:5432/waport"
    r = rig(tmp_path, cluster_dsn=secret_dsn, proxy="")
    company = r.arbiter.roster.want(COMPANY)
    assert company.cluster_epoch is None  # no lease: as on one host
    assert "epoch" not in options_of(company.worker_args(1)) and company.worker_secrets() == {}
    company.cluster_epoch = 7  # what waportd/cluster.py sets on acquiring the lease
    args = company.worker_args(2)
    assert options_of(args)["epoch"] == 7
    assert not any("s3cret" in arg for arg in args)
    assert company.worker_secrets() == {"cluster_dsn": secret_dsn}


def options_of(args: list[str]) -> dict[str, Any]:
    return json.loads(args[args.index("--options") + 1])
