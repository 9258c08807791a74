"""The webhook store in PostgreSQL (ipc/pgwebhookstore.py): what moves with a company, one writer and one
deliverer per company, on a PostgreSQL server of the test's own."""

from __future__ import annotations

import json
import time

import pytest
from conftest import PgServer

from ipc.pgwebhookstore import PgWebhookStore
from ipc.webhooks import GLOBAL, new_secret
from ipc.webhookstore import DEAD, OK, PENDING, Busy, Endpoint, Settled


@pytest.fixture
def hosts(pgdb):
    """`hosts(host)`: that host's store (its connections closed after the test)."""
    return lambda host: PgWebhookStore(pgdb(f"waportd/{host}/webhooks"), host)


def lease(pg: PgServer, company: str, owner: str, live: bool = True) -> None:
    pg.sql("INSERT INTO waport_leases (company, owner, epoch, expires_at) VALUES (%s, %s, 1, now() + %s::interval)"
           " ON CONFLICT (company) DO UPDATE SET owner = EXCLUDED.owner, epoch = waport_leases.epoch + 1,"
           " expires_at = EXCLUDED.expires_at", company, owner, "15 s" if live else "-1 s")


def rows(company: str, first_seq: int, n: int, prefix: str = "evt") -> list[tuple]:
    now = time.time()
    return [(f"{prefix}_{company}_{first_seq + i}", company, first_seq + i, "message",
             json.dumps({"company": company, "type": "message", "id": f"{prefix}_{company}_{first_seq + i}",
                         "seq": first_seq + i}, separators=(",", ":")), now) for i in range(n)]


def test_a_company_that_moves_keeps_its_endpoint_seq_and_undelivered_events(pg, hosts) -> None:
    a, b = hosts("a"), hosts("b")
    lease(pg, "acme", "a")
    a.put_endpoint(Endpoint("acme", "http://h/acme", new_secret(), ("message",)))
    assert a.add_events(rows("acme", 1, 3), {"acme": 3}) == {"acme": 3}
    assert [e.seq for e in a.pending_after(0, 100)] == [1, 2, 3]
    assert b.pending_after(0, 100) == []  # not b's to deliver while a holds acme

    lease(pg, "acme", "b")  # a died; b claimed acme
    assert b.endpoints()["acme"].url == "http://h/acme"
    assert [e.seq for e in b.pending_of("acme", 0, 100)] == [1, 2, 3]
    # b's memory never saw acme: its next event is numbered on from the database's 3, its body too
    assert b.add_events(rows("acme", 1, 1, "new"), {"acme": 1}) == {"acme": 4}
    got = b.pending_of("acme", 3, 10)
    assert [e.seq for e in got] == [4] and json.loads(got[0].body)["seq"] == 4
    assert a.pending_after(0, 100) == []  # a, woken late, delivers nothing of acme's


def test_a_host_that_lost_a_company_cannot_record_its_events(pg, hosts) -> None:
    a = hosts("a")
    lease(pg, "acme", "b")
    lease(pg, "beta", "a")
    a.add_events(rows("acme", 7, 2) + rows("beta", 1, 1), {"acme": 8, "beta": 1})
    assert a.refused == 2
    assert pg.sql("SELECT company, seq, host FROM waport_webhook_events ORDER BY n") == [("beta", 1, "a")]
    assert pg.sql("SELECT company, seq FROM waport_webhook_seqs") == [("beta", 1)]


def test_events_of_a_company_nobody_runs_are_delivered_by_the_host_that_wrote_them(pg, hosts) -> None:
    a, b = hosts("a"), hosts("b")
    a.add_events(rows("gone", 1, 2), {"gone": 2})  # no lease: a stopped company's last events
    lease(pg, "old", "b", live=False)  # an expired lease is nobody's
    a.add_events(rows("old", 1, 1), {"old": 1})
    assert sorted((e.company, e.seq) for e in a.pending_after(0, 10)) == [("gone", 1), ("gone", 2), ("old", 1)]
    assert b.pending_after(0, 10) == []


def test_settle_replay_disable_deliveries_and_prune_as_the_sqlite_store(pg, hosts) -> None:
    a = hosts("a")
    lease(pg, "acme", "a")
    a.add_events(rows("acme", 1, 3), {"acme": 3})
    evs = a.pending_after(0, 10)
    now = time.time()
    a.settle([Settled(evs[0].n, OK, 1, now, now, 200, None), Settled(evs[1].n, DEAD, 5, now, now, 500, "HTTP 500")])
    listing = a.deliveries("acme", 10)
    assert listing["counts"] == {PENDING: 1, OK: 1, DEAD: 1}
    assert [e["status"] for e in listing["events"]][-1] == OK
    assert a.replay("acme", True, None, now) == 1
    assert a.deliveries("acme", 10)["counts"] == {PENDING: 2, OK: 1, DEAD: 0}
    assert a.disable("acme", "http://h/acme", "HTTP 410", now) == 2
    assert ("acme", "http://h/acme") in a.disabled()
    a.put_endpoint(Endpoint("acme", "http://h/acme", new_secret(), ("message",)))  # set again: enabled
    assert a.disabled() == {}
    assert a.prune(now + 1, now + 1) == 3 and a.deliveries("acme", 10)["counts"] == {PENDING: 0, OK: 0, DEAD: 0}
    assert a.known([evs[0].id]) == set()
    a.put_endpoint(Endpoint(GLOBAL, "http://h/all", new_secret(), ("state",)))
    a.forget("acme")
    assert set(a.endpoints()) == {GLOBAL} and a.seqs() == {}


@pytest.mark.pg_server
def test_an_unreachable_database_is_busy_at_once_for_a_second_and_loses_nothing(pg, hosts) -> None:
    a = hosts("a")
    a.db.call_timeout = 1.0
    lease(pg, "acme", "a")
    pg.pause()
    try:
        with pytest.raises(Busy) as failed:
            a.add_events(rows("acme", 1, 1), {"acme": 1})
        assert str(failed.value).startswith("the webhook store (webhook events): ")
        started = time.monotonic()
        with pytest.raises(Busy):  # held off: no second wait on the loop
            a.add_events(rows("acme", 1, 1), {"acme": 1})
        assert time.monotonic() - started < 0.5
    finally:
        pg.resume()
    deadline = time.monotonic() + 10
    while True:
        try:
            a.add_events(rows("acme", 1, 1), {"acme": 1})
            break
        except Busy:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert [e.seq for e in a.pending_after(0, 10)] == [1]
