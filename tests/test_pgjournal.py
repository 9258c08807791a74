"""The journal in PostgreSQL (ipc/pgjournal.py): the SQLite journal's rules, and the lease epoch on every write
of a worker, on a PostgreSQL server of the test's own."""

from __future__ import annotations

import sqlite3
import time

import pytest
from conftest import PgServer, free_port

from ipc.clusterschema import application_name
from ipc.journal import QUEUED, SENDING, SENT, UNCERTAIN
from ipc.pgdb import PgDb, PgUnavailable
from ipc.pgjournal import Fenced, PgJournal, enqueue_all


@pytest.fixture
def db(pgdb):
    return pgdb


def lease(pg: PgServer, company: str, epoch: int) -> None:
    pg.sql("INSERT INTO waport_leases (company, owner, epoch, expires_at) VALUES (%s, 'h1', %s, now() + interval"
           " '15 s') ON CONFLICT (company) DO UPDATE SET epoch = EXCLUDED.epoch", company, epoch)


def test_sends_are_appended_once_per_key_and_taken_in_order_by_the_lease_holder(pg, db):
    desk = PgJournal(db(), "acme")  # the supervisor of any host
    first = desk.enqueue_many("acme", [("15550100001", f"m{i}", None, "control") for i in range(3)]
                              + [("15550100001", "keyed", "k1", "api", "text", {"preview": False})])
    assert [new for _, new in first] == [True] * 4
    again, new = desk.enqueue("acme", "15550100001", "keyed twice", "k1")
    assert not new and again.message_id == first[3][0].message_id and again.text == "keyed"
    assert desk.by_key("k1").fields == {"preview": False}
    assert desk.counts() == {QUEUED: 4} and desk.pending() == 4
    PgJournal(db(), "other").enqueue("other", "1", "not acme's", None)

    lease(pg, "acme", 2)
    worker = PgJournal(db(application_name("acme", 2)), "acme", epoch=2)
    taken = worker.take_queued(2)
    assert [m.text for m in taken] == ["m0", "m1"] and all(m.status == SENDING for m in taken)
    worker.mark_many([(taken[0].message_id, SENT, None, 1.5, "WA1"), (taken[1].message_id, "send_failed", "no", None)])
    assert desk.by_id(taken[0].message_id).status == SENT and desk.reference("WA1")["chat"] == "15550100001"
    assert [m.text for m in worker.take_queued(10)] == ["m2", "keyed"]
    assert pg.sql("SELECT DISTINCT epoch FROM waport_outbox WHERE company = 'acme'") == [(2,)]


def test_a_worker_of_an_older_epoch_can_neither_take_nor_settle_nor_journal(pg, db):
    desk = PgJournal(db(), "acme")
    desk.enqueue_many("acme", [("1", "a", None, "control"), ("1", "b", None, "control")])
    lease(pg, "acme", 1)
    old = PgJournal(db(application_name("acme", 1)), "acme", epoch=1)
    [taken] = old.take_queued(1)
    lease(pg, "acme", 2)  # another host claimed it
    assert old.take_queued(10) == []
    with pytest.raises(Fenced):
        old.mark(taken.message_id, SENT)
    with pytest.raises(Fenced):
        old.inbox_add({"id": "in1", "chat": "1@s.whatsapp.net", "from": "1", "text": "hi"})
    assert isinstance(Fenced("x"), sqlite3.Error)  # every journal-failure path of the worker covers it
    new = PgJournal(db(application_name("acme", 2)), "acme", epoch=2)
    # The send the old worker began is unknown: the new owner says uncertain, and never sends it again.
    [interrupted] = new.interrupted()
    assert interrupted.message_id == taken.message_id and desk.by_id(taken.message_id).status == UNCERTAIN
    assert [m.text for m in new.take_queued(10)] == ["b"]
    assert new.inbox_add({"id": "in1", "chat": "1@s.whatsapp.net", "from": "1", "text": "hi"}) is True


def test_inbound_messages_are_journaled_once_and_delivered_until_acknowledged(pg, db):
    lease(pg, "acme", 1)
    j = PgJournal(db(application_name("acme", 1)), "acme", epoch=1)
    msg = {"id": "in1", "chat": "15550100009@s.whatsapp.net", "from": "15550100009", "push_name": "Ana",
           "type": "image", "text": "", "ts": 1.0, "is_group": False, "media": {"id": "m1", "status": "pending"}}
    assert j.inbox_add(msg) is True and j.inbox_add(msg) is False
    assert j.undelivered(time.time() + 1) == [] and j.undelivered(time.time() + 1, downloading=True)[0]["id"] == "in1"
    j.set_inbound_fields("in1", {"media": {"id": "m1", "status": "stored"}})
    assert j.inbound("in1")["media"]["status"] == "stored" and j.senders(["in1", "x"]) == {"in1": "15550100009"}
    assert [m["id"] for m in j.undelivered(time.time() + 1)] == ["in1"]
    j.delivered(["in1"])
    assert j.undelivered(time.time() + 1) == []
    [shown] = PgJournal(db(), "acme").recent_inbound()
    assert shown["copies"] == 2 and shown["delivered"] is True and shown["push_name"] == "Ana"


def test_purge_erases_what_ended_and_keeps_what_was_promised(pg, db):
    lease(pg, "acme", 1)
    desk = PgJournal(db(), "acme")
    worker = PgJournal(db(application_name("acme", 1)), "acme", epoch=1)
    desk.enqueue_many("acme", [("15550100001", "old sent", None, "control"), ("15550100002", "queued", None, "c")])
    [m] = worker.take_queued(1)
    worker.mark(m.message_id, SENT)
    worker.inbox_add({"id": "in1", "chat": "15550100001@s.whatsapp.net", "from": "15550100001", "text": "x",
                      "media": {"id": "med1", "status": "stored"}})
    worker.delivered(["in1"])
    purged = desk.purge(time.time() + 1, chat="15550100001")
    assert (purged.outbound, purged.inbound, purged.pending, purged.inbound_media) == (1, 1, 0, ["med1"])
    assert desk.purge(time.time() + 1).pending == 1 and desk.counts() == {QUEUED: 1}


@pytest.mark.pg_server
def test_a_frozen_server_fails_a_call_in_bounded_time_and_the_next_call_connects_again(pg, db):
    j = PgJournal(db(), "acme")
    j.db.call_timeout = 1.0
    assert j.pending() == 0
    pg.pause()
    try:
        started = time.monotonic()
        with pytest.raises(PgUnavailable) as failed:
            j.enqueue("acme", "1", "x", None)
        assert time.monotonic() - started < 5 and "no answer" in str(failed.value)
    finally:
        pg.resume()
    assert j.enqueue("acme", "1", "x", None)[1] is True


def test_the_password_never_shows_in_an_error() -> None:
    j = PgJournal(PgDb(f"postgresql://waport:s3cret-pw@127.0.0.1:{free_port()}/waport?password=s3cret-pw",
                       "waportd/h1/journal"), "acme")
    with pytest.raises(PgUnavailable) as failed:
        j.pending()
    assert "s3cret-pw" not in str(failed.value) and "pending" in str(failed.value)
    assert "s3cret-pw" not in repr(j.db)


def test_a_turn_of_sends_for_many_companies_is_appended_at_once_with_each_key_once(pg, db):
    conn = db()
    PgJournal(conn, "beta").enqueue("beta", "1", "earlier", "k")
    out = enqueue_all(conn, {"acme": [("1", "a", "k", "api"), ("1", "b", None, "api"), ("1", "a again", "k", "api")],
                             "beta": [("2", "keyed before", "k", "api", "text", {"preview": True})]})
    assert [(m.text, new) for m, new in out["acme"]] == [("a", True), ("b", True), ("a", False)]
    assert [(m.text, new) for m, new in out["beta"]] == [("earlier", False)]  # the first one, as SQLite's does
    assert PgJournal(conn, "acme").counts() == {QUEUED: 2} and PgJournal(conn, "beta").counts() == {QUEUED: 1}
