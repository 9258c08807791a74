import os
import subprocess
import sys
import time

import pytest

from ipc import journal as J


def test_enqueue_is_durable_and_idempotent(tmp_path):
    j = J.Journal(str(tmp_path / "journal.db"))
    assert (tmp_path / "journal.db").stat().st_mode & 0o777 == 0o600
    first, created = j.enqueue("acme", "15550109999", "hi", "k1")
    assert created and first.status == J.QUEUED
    again, created = j.enqueue("acme", "15550109999", "something else", "k1")
    assert not created and again.message_id == first.message_id and again.text == "hi"
    other, _ = j.enqueue("acme", "15550109999", "hi", None)
    assert other.message_id != first.message_id
    # another connection (another process) sees it at once
    assert J.Journal(j.path).by_key("k1").result() == {"message_id": first.message_id, "status": "queued"}
    assert j.pending() == 2


def test_message_ids_derive_from_the_key():
    assert J.message_id_for("acme", "k") == J.message_id_for("acme", "k")
    assert J.message_id_for("acme", "k") != J.message_id_for("bistro", "k")
    assert J.message_id_for("acme", None) != J.message_id_for("acme", None)
    assert J.message_id_for("acme", "k").startswith("3EB0")


def test_outcomes_and_interrupted_sends(tmp_path):
    j = J.Journal(str(tmp_path / "journal.db"))
    a, _ = j.enqueue("acme", "1555010001", "a", None)
    b, _ = j.enqueue("acme", "1555010002", "b", None)
    c, _ = j.enqueue("acme", "1555010003", "c", None)
    taken = j.take_queued(2)  # the oldest first, marked sending by the same statement
    assert [(m.message_id, m.status, m.attempts) for m in taken] == [(a.message_id, J.SENDING, 1),
                                                                     (b.message_id, J.SENDING, 1)]
    assert j.by_id(a.message_id).status == J.SENDING and j.by_id(c.message_id).status == J.QUEUED
    j.mark(a.message_id, J.SENT, sent_ts=123.0)  # ... and b's outcome never comes: the worker is killed
    interrupted = j.interrupted()
    assert [m.message_id for m in interrupted] == [b.message_id]
    assert j.by_id(b.message_id).status == J.UNCERTAIN and j.by_id(a.message_id).sent_ts == 123.0
    assert j.counts() == {"sent": 1, "uncertain": 1, "queued": 1}
    assert [m.message_id for m in j.take_queued(10)] == [c.message_id]  # uncertain is never taken again
    assert j.take_queued(10) == []


def test_take_queued_keeps_the_queue_order_over_many_rows(tmp_path):
    j = J.Journal(str(tmp_path / "journal.db"))
    texts = [f"m{i}" for i in range(300)]
    j.enqueue_many("acme", [("1555010001", t, None, "control") for t in texts])
    taken = [m.text for _ in range(10) for m in j.take_queued(32)]
    assert taken == texts[:300] and j.pending() == 300  # queued or sending: all still pending


def test_inbox_deduplicates_and_tracks_delivery(tmp_path):
    j = J.Journal(str(tmp_path / "journal.db"))
    msg = {"id": "M1", "chat": "1555", "from": "1555", "push_name": "Ann", "type": "text", "text": "hi",
           "ts": 1.5, "is_group": False}
    assert j.inbox_add(msg) is True
    assert j.inbox_add(msg) is False
    assert [m["id"] for m in j.undelivered()] == ["M1"]
    assert j.undelivered(received_before=0) == []
    j.delivered(["M1"])
    assert j.undelivered() == []
    recent = j.recent_inbound()
    assert recent[0]["copies"] == 2 and recent[0]["delivered"] is True and recent[0]["from"] == "1555"


def test_survives_kill_9_between_commits(tmp_path):
    path = str(tmp_path / "journal.db")
    code = (
        "import os, signal, sys\n"
        "from ipc.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "for i in range(200):\n"
        "    j.enqueue('acme', '15550109999', f'm{i}', f'k{i}')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, path], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -9
    assert J.Journal(path).pending() == 200


def test_a_busy_journal_refuses_the_batch_whole_instead_of_blocking(tmp_path):
    path = str(tmp_path / "journal.db")
    worker = J.Journal(path)
    supervisor = J.Journal(path, lock_wait=5, checkpoints=False)
    worker.db.execute("BEGIN IMMEDIATE")  # the worker is in the middle of a write
    try:
        started = time.monotonic()
        with pytest.raises(J.Busy):
            supervisor.enqueue_many("acme", [("15550109999", t, None, "control") for t in "ab"], wait=False)
        assert time.monotonic() - started < 1  # not the 5 s reads may wait
        assert supervisor.counts() == {}  # reads go on meanwhile
    finally:
        worker.db.execute("COMMIT")
    assert supervisor.counts() == {}  # nothing half-written
    assert supervisor.db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert [new for _, new in supervisor.enqueue_many("acme", [("15550109999", "a", None, "control")])] == [True]
    assert supervisor.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0


def test_a_journal_of_the_previous_version_upgrades_in_place(tmp_path) -> None:
    """Journals written before schema versions (issue 15) open, keep every row and gain the new columns."""
    import sqlite3

    from ipc import journal as J

    path = str(tmp_path / "journal.db")
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(J._SCHEMA)  # what the previous version created, user_version 0
    old.execute("INSERT INTO outbox(message_id, recipient, text, status, created, updated) "
                "VALUES ('3EB0OLD', '15550109999', 'hi', 'queued', 1, 1)")
    old.close()
    journal = J.Journal(path)
    try:
        assert journal.db.execute("PRAGMA user_version").fetchone()[0] == J.SCHEMA_VERSION
        row = journal.db.execute("SELECT message_id, type, payload FROM outbox").fetchone()
        assert row == ("3EB0OLD", "text", None)
        assert [m.message_id for m in journal.take_queued(10)] == ["3EB0OLD"]
    finally:
        journal.close()
    again = J.Journal(path)  # opening an upgraded journal changes nothing
    assert again.db.execute("PRAGMA user_version").fetchone()[0] == J.SCHEMA_VERSION
    again.db.execute(f"PRAGMA user_version = {J.SCHEMA_VERSION + 1}")
    again.close()
    with pytest.raises(J.NewerJournal):
        J.Journal(path)


def test_a_send_keeps_its_type_fields_and_the_network_id_a_reply_will_quote(tmp_path) -> None:
    journal = J.Journal(str(tmp_path / "journal.db"))
    media = "ab" * 32
    image, _ = journal.enqueue("acme", "15550109999", "menu", "k1", "control", "image",
                               {"media": media, "mimetype": "image/png", "size": 10})
    journal.enqueue("acme", "15550109999", "hi", None)
    assert journal.queued_media() == {media}  # the store keeps it while the send waits
    (taken, text) = journal.take_queued(10)
    assert (taken.type, taken.fields, text.type, text.fields) == ("image", {"media": media, "mimetype": "image/png",
                                                                            "size": 10}, "text", {})
    assert journal.queued_media() == {media}  # sending: still needed
    journal.mark_many([(image.message_id, J.SENT, None, 5.0, "WA-OUT-1")])
    assert journal.queued_media() == set()
    ref = journal.reference(image.message_id)
    assert ref == journal.reference("WA-OUT-1")
    assert (ref["id"], ref["from_me"], ref["type"], ref["text"]) == ("WA-OUT-1", True, "image", "menu")
    public = journal.by_key("k1").public()
    assert (public["message_id"], public["type"], public["media"]) == (image.message_id, "image", media)
    assert journal.reference("nobody") is None


def test_inbound_extras_are_kept_and_a_message_waiting_for_its_media_is_not_redelivered(tmp_path) -> None:
    journal = J.Journal(str(tmp_path / "journal.db"))
    msg = {"id": "WA-1", "chat": "15550100001", "from": "15550100001", "type": "image", "text": "look",
           "ts": 1.0, "media": {"mimetype": "image/jpeg", "size": 9, "status": "pending"}, "_fetch": {"id": "WA-1"}}
    journal.inbox_add(msg)
    journal.inbox_add({"id": "WA-2", "chat": "15550100001", "from": "15550100001", "type": "location",
                       "text": "", "ts": 2.0, "latitude": 1.5, "longitude": 2.5})
    later = time.time() + 1
    assert [m["id"] for m in journal.undelivered(later)] == ["WA-2"]
    assert journal.undelivered(later)[0]["latitude"] == 1.5
    (pending,) = journal.undelivered(later, downloading=True)
    assert pending["_fetch"] == {"id": "WA-1"}  # what the worker downloads it by
    assert all("_fetch" not in m for m in journal.recent_inbound())
    journal.set_inbound_fields("WA-1", J.extra_fields({**msg, "media": {"status": "stored", "id": "cd" * 32}}))
    assert [m["id"] for m in journal.undelivered(later)] == ["WA-1", "WA-2"]
    assert journal.inbound("WA-1")["media"]["id"] == "cd" * 32
    assert journal.reference("WA-1") == {"id": "WA-1", "chat": "15550100001", "from": "15550100001",
                                         "from_me": False, "type": "image", "text": "look"}


def test_a_batch_keeps_the_order_it_was_accepted_in_with_and_without_keys(tmp_path) -> None:
    journal = J.Journal(str(tmp_path / "journal.db"))
    first, _ = journal.enqueue("acme", "15550109999", "k-first", "k1")
    items = [("15550109999", "a", None, "control"), ("15550109999", "b", None, "control"),
             ("15550109999", "again", "k1", "control"), ("15550109999", "c", None, "control", "location",
                                                          {"latitude": 1.0, "longitude": 2.0}),
             ("15550109999", "d", "k2", "control")]
    out = journal.enqueue_many("acme", items)
    assert [new for _, new in out] == [True, True, False, True, True]
    assert out[2][0].message_id == first.message_id  # a key seen before: the first message, nothing new
    assert [m.text for m in journal.take_queued(10)] == ["k-first", "a", "b", "c", "d"]  # the queue's order
    assert journal.by_id(out[3][0].message_id).fields == {"latitude": 1.0, "longitude": 2.0}


def _on_disk(j):
    return b"".join(open(path, "rb").read() for path in (j.path, j.path + "-wal") if os.path.exists(path))


def _aged(j, seconds):
    """Everything in the journal so far happened `seconds` ago."""
    j.db.execute("UPDATE outbox SET created = created - ?, updated = updated - ?", (seconds, seconds))
    j.db.execute("UPDATE inbox SET received = received - ?", (seconds,))


def test_purge_erases_what_ended_and_keeps_promised_sends(tmp_path):
    j = J.Journal(str(tmp_path / "journal.db"))
    sent, _ = j.enqueue("acme", "15550100001", "secret booking text", None)
    failed, _ = j.enqueue("acme", "15550100002", "b", None)
    queued, _ = j.enqueue("acme", "15550100003", "still to go", "k-queued")
    j.mark(sent.message_id, J.SENT, sent_ts=time.time())
    j.mark(failed.message_id, J.SEND_FAILED, error="x")
    j.inbox_add({"id": "IN-1", "chat": "15550100001@s.whatsapp.net", "from": "15550100001@s.whatsapp.net",
                 "text": "private words", "ts": 1.0})
    j.inbox_add({"id": "IN-2", "chat": "15550100009@s.whatsapp.net", "text": "not yet delivered", "ts": 1.0})
    j.delivered(["IN-1"])
    _aged(j, 3600)
    fresh, _ = j.enqueue("acme", "15550100001", "new", None)
    j.mark(fresh.message_id, J.SENT, sent_ts=time.time())

    j.compact()
    assert b"secret booking text" in _on_disk(j) and b"private words" in _on_disk(j)
    purged = j.purge(time.time() - 60)
    assert (purged.outbound, purged.inbound, purged.pending) == (2, 1, 1)
    assert j.by_id(sent.message_id) is None and j.by_id(failed.message_id) is None
    assert j.by_id(queued.message_id).status == J.QUEUED and j.by_key("k-queued") is not None
    assert j.by_id(fresh.message_id) is not None  # younger than the cut
    assert j.inbound("IN-1") is None and j.inbound("IN-2") is not None  # an undelivered one waits for its sink
    j.compact()
    raw = _on_disk(j)
    assert b"secret booking text" not in raw and b"private words" not in raw  # overwritten, not just unlinked
    assert j.take_queued(10)[0].message_id == queued.message_id  # the queue still works after the erasure


def test_purge_of_one_chat_matches_digits_and_jids(tmp_path):
    j = J.Journal(str(tmp_path / "journal.db"))
    mine, _ = j.enqueue("acme", "15550100001", "to the asker", None)
    as_jid, _ = j.enqueue("acme", "15550100001@s.whatsapp.net", "to the asker by JID", None)
    other, _ = j.enqueue("acme", "15550100002", "to someone else", None)
    for m in (mine, as_jid, other):
        j.mark(m.message_id, J.SENT, sent_ts=time.time())
    j.inbox_add({"id": "IN-1", "chat": "15550100001@s.whatsapp.net", "text": "asker writes", "ts": 1.0,
                 "media": {"id": "ab" * 32, "status": "stored"}})
    j.inbox_add({"id": "IN-2", "chat": "15550100002@s.whatsapp.net", "text": "other writes", "ts": 1.0})
    j.delivered(["IN-1", "IN-2"])
    purged = j.purge(time.time() + 1, chat="15550100001")
    assert (purged.outbound, purged.inbound) == (2, 1)
    assert purged.inbound_media == ["ab" * 32]
    assert j.by_id(other.message_id) is not None and j.inbound("IN-2") is not None
    assert J.chat_forms("123456789@g.us") == ("123456789@g.us",)


def test_purge_in_passes_erases_a_backlog_bit_by_bit(tmp_path):
    j = J.Journal(str(tmp_path / "journal.db"))
    for i in range(25):
        m, _ = j.enqueue("acme", "15550100001", f"m{i}", None)
        j.mark(m.message_id, J.SENT, sent_ts=time.time())
    passes = []
    while (n := j.purge(time.time() + 1, limit=10).outbound):
        passes.append(n)
    assert passes == [10, 10, 5] and j.counts() == {}
