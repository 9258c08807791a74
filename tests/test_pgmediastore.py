"""The media store in PostgreSQL (ipc/pgmediastore.py): what one host stores, another host with an empty cache
reads; nothing half-stored is ever visible; release and prune keep what a queued send of any host needs."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from ipc.errors import WaportError
from ipc.mediastore import CHUNK, TMP_KEPT
from ipc.pgdb import PgDb
from ipc.pgjournal import PgJournal
from ipc.pgmediastore import CACHE_SETTLE, PgMediaStore

DAY = 86400.0


@pytest.fixture
def stores(pgdb, tmp_path):
    """`stores(host)`: a host's store, each with a cache directory of its own (another host's disk)."""

    def make(host: str, max_bytes: int = 64 << 20) -> PgMediaStore:
        return PgMediaStore(str(tmp_path / host / "media"), max_bytes, pgdb(f"waportd/{host}/media"))

    return make


def test_a_file_stored_on_one_host_is_read_on_another_with_an_empty_cache(pg, stores) -> None:
    a, b = stores("h1"), stores("h2")
    data = os.urandom(2 * CHUNK + 4321)
    info = a.put(data, "image/png", company="acme", filename="dir/menu.png")
    assert info.media_id == hashlib.sha256(data).hexdigest()
    assert pg.sql("SELECT size, mimetype, filename, owners FROM waport_media") == [
        (len(data), "image/png", "menu.png", ["acme"])]
    assert pg.sql("SELECT n, length(data) FROM waport_media_chunks ORDER BY n") == [
        (0, CHUNK), (1, CHUNK), (2, 4321)]

    assert not os.path.exists(b.path(info.media_id))  # h2 has never seen it
    assert b.readable(info.media_id, "acme").size == len(data)
    with pytest.raises(WaportError) as other:
        b.readable(info.media_id, "beta")
    assert other.value.code == "not_found"
    # media_get's ranges come straight from PostgreSQL, across a chunk's edge too, without caching the file
    assert b.read(info.media_id, CHUNK - 10, 760 << 10) == data[CHUNK - 10:CHUNK - 10 + (760 << 10)]
    assert b.read(info.media_id, 2 * CHUNK + 4000) == data[2 * CHUNK + 4000:]
    assert not os.path.exists(b.path(info.media_id))
    # a worker sends by path: the whole file is brought into the cache, private, checked, nothing left in tmp
    path = b.local_path(info.media_id)
    with open(path, "rb") as fh:
        assert fh.read() == data
    assert oct(os.stat(path).st_mode & 0o777) == "0o600" and os.listdir(b.tmp_dir) == []

    # the same bytes from another company on h2: one row, one copy of the chunks, both owners
    again = b.put(data, "image/png", company="beta")
    assert again.media_id == info.media_id and a.info(info.media_id).owners == ["acme", "beta"]
    assert pg.sql("SELECT count(*) FROM waport_media_chunks") == [(3,)]
    # a send of a stored file adds its company as an owner without the bytes on this host
    c = stores("h3")
    assert c.record(info.media_id, len(data), "image/png", "gamma", None).owners == ["acme", "beta", "gamma"]
    with pytest.raises(WaportError) as missing:
        c.record("0" * 64, 1, "image/png", "gamma", None)
    assert missing.value.code == "not_found"
    assert c.local_path("0" * 64) == c.path("0" * 64) and not os.path.exists(c.path("0" * 64))


def test_a_failed_copy_into_postgresql_leaves_no_row(pg, stores) -> None:
    store = stores("h1")
    up = store.begin()
    up.write(os.urandom(CHUNK))
    up.write(os.urandom(100))
    pg.sql("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.n = 1 THEN"
           " RAISE EXCEPTION 'no room'; END IF; RETURN NEW; END $$")
    pg.sql("CREATE TRIGGER refuse BEFORE INSERT ON waport_media_chunks FOR EACH ROW EXECUTE FUNCTION refuse()")
    with pytest.raises(WaportError) as refused:
        up.finish("application/pdf", "acme")
    assert refused.value.code == "timeout" and "no room" in refused.value.message
    # the row was written before the chunks, in the same transaction: neither is there
    assert pg.sql("SELECT count(*) FROM waport_media") == [(0,)]
    assert pg.sql("SELECT count(*) FROM waport_media_chunks") == [(0,)]


def queue_send(db: PgDb, company: str, media_id: str) -> None:
    PgJournal(db, company).enqueue(company, "15550100001", "", None, "control", "document", {"media": media_id})


def test_release_and_prune_keep_what_a_queued_send_of_any_host_needs(pg, stores) -> None:
    a, b = stores("h1"), stores("h2")
    now = time.time()
    old = {name: a.put(name.encode() * 100, "application/pdf", company="acme").media_id
           for name in ("queued", "owned", "free")}
    b.local_path(old["free"])  # h2 caches one
    pg.sql("UPDATE waport_media SET created = %s", now - 8 * DAY)
    fresh = a.put(b"fresh" * 100, "application/pdf", company="acme").media_id
    # a send of beta (run by some other host) still waits for one of them; acme's release does not take it
    queue_send(PgDb(pg.dsn, "waportd/h3/journal"), "beta", old["queued"])
    assert a.release(old["queued"], "acme") is False
    assert a.info(old["queued"]).owners == []

    removed = b.prune(now, 7 * DAY)  # h2 knows nothing of beta's queue: the statement asks the whole outbox
    assert sorted(removed) == sorted([old["owned"], old["free"]])
    assert {r[0] for r in pg.sql("SELECT media_id FROM waport_media")} == {old["queued"], fresh}
    assert not os.path.exists(b.path(old["free"]))  # its cached copy went too
    assert pg.sql("SELECT count(*) FROM waport_media_chunks WHERE media_id <> ALL(%s)",
                  [old["queued"], fresh]) == [(0,)]
    # the cache of h1 drops on its next look what PostgreSQL no longer has (once it is not a moment old: its
    # record could be under way)
    assert a.prune(now, 7 * DAY, keep={old["queued"]}) == [] and len(a.cached()) == 4
    later = now + CACHE_SETTLE + 1
    assert sorted(a.prune(later, 7 * DAY, keep={old["queued"]})) == sorted([old["owned"], old["free"]])
    assert sorted(a.cached()) == sorted([old["queued"], fresh])

    # release: other owners keep a file; the last owner's release removes it, everywhere
    b.record(fresh, 500, "application/pdf", "beta", None)
    assert a.release(fresh, "acme") is False and a.info(fresh).owners == ["beta"]
    assert b.release(fresh, "beta") is True
    assert a.info(fresh) is None and not os.path.exists(b.path(fresh))
    assert a.prune(later, 7 * DAY) == [fresh] and not os.path.exists(a.path(fresh))  # h1's cache: at its next look
    assert pg.sql("SELECT count(*) FROM waport_media_chunks WHERE media_id = %s", fresh) == [(0,)]

    # stale uploads in the cache go as on a single host
    up = a.begin()
    up.write(b"partial")
    os.utime(up.tmp, (now - TMP_KEPT - 10, now - TMP_KEPT - 10))
    a.prune(now, 7 * DAY)
    assert not os.path.exists(up.tmp)


@pytest.mark.pg_server
def test_postgresql_down_gives_a_clear_error_and_stores_nothing(pg, stores) -> None:
    a, b = stores("h1"), stores("h2")
    kept = a.put(b"kept" * 1000, "image/png", company="acme")
    b.local_path(kept.media_id)
    pg.stop()
    try:
        with pytest.raises(WaportError) as down:
            a.put(b"new bytes" * 1000, "image/png", company="acme")
        assert down.value.code == "timeout" and "media store (PostgreSQL) is unavailable" in down.value.message
        assert pg.dsn not in down.value.message
        with pytest.raises(WaportError) as unread:
            b.readable(kept.media_id, "acme")
        assert unread.value.code == "timeout"
        assert b.local_path(kept.media_id) == b.path(kept.media_id)  # what a host caches still sends
        assert b.release(kept.media_id, "acme") is False  # best effort: retention removes it later
        assert os.path.exists(b.path(kept.media_id))
        with pytest.raises(WaportError):
            b.prune(time.time(), 0)
    finally:
        pg.start()
    assert [r[0] for r in pg.sql("SELECT media_id FROM waport_media")] == [kept.media_id]
    assert a.put(b"new bytes" * 1000, "image/png", company="acme").size == 9000  # the next call connects again


@pytest.mark.parametrize("mib", [16])
def test_a_large_file_goes_through_postgresql_in_bounded_time(pg, stores, mib: int) -> None:
    a, b = stores("h1"), stores("h2")
    data = os.urandom(mib << 20)
    began = time.monotonic()
    info = a.put(data, "video/mp4", company="acme")
    put = time.monotonic() - began
    began = time.monotonic()
    path = b.local_path(info.media_id)
    fetched = time.monotonic() - began
    assert os.path.getsize(path) == len(data)
    print(f"{mib} MiB: put {put:.2f} s (cache + PostgreSQL), fetched into another cache {fetched:.2f} s")
    assert put < 30 and fetched < 30
