"""Cluster mode's store against a real PostgreSQL (DESIGN.md §12): one owner per company, epochs that only
grow, refused writes from an older epoch, fencing of an older epoch's connections, the database's clock,
and an outage that fails fast and heals."""

from __future__ import annotations

import contextlib
import datetime
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import PgServer, wait_for

from ipc.clusterschema import MIGRATION_LOCK, PUT_CREDENTIALS_SQL, SCHEMA_VERSION, application_name
from waportd.clusterstore import ClusterLink, ClusterListener, ClusterStore, Lease, Letter, StoreError, StoreUnavailable

SECRET = "hunter2-not-for-logs"


@pytest.fixture
def stores(pg: PgServer) -> Iterator[Callable[..., ClusterStore]]:
    """Stores for hosts of one cluster; the first migrates the schema."""
    made: list[ClusterStore] = []

    def make(host_id: str, lease_ttl: float = 15.0, **kwargs: Any) -> ClusterStore:
        store = ClusterStore(pg.dsn, host_id, lease_ttl, **kwargs)
        if not made:
            store.migrate()
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def claim(store: ClusterStore, company: str) -> Lease | None:
    """One company's claim; None: another host holds it."""
    return store.claim_many([company]).get(company)


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released together; their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def tables(pg: PgServer) -> set[str]:
    return {r[0] for r in pg.sql("SELECT tablename FROM pg_tables WHERE tablename LIKE 'waport%%'")}


def test_migrate_is_idempotent_and_safe_from_two_hosts_at_once(pg: PgServer) -> None:
    a, b = ClusterStore(pg.dsn, "a", 15), ClusterStore(pg.dsn, "b", 15)
    found = at_once(a.migrate, b.migrate)
    assert sorted(found) == [0, SCHEMA_VERSION]  # one created it, the other waited and found it done
    assert tables(pg) == {"waport_schema", "waport_hosts", "waport_companies", "waport_leases",
                          "waport_credentials", "waport_mail", "waport_outbox", "waport_inbox", "waport_store_upgrades",
                          "waport_webhook_endpoints", "waport_webhook_disabled", "waport_webhook_seqs",
                          "waport_webhook_events", "waport_tokens", "waport_media", "waport_media_chunks"}
    assert a.migrate() == SCHEMA_VERSION
    assert pg.sql("SELECT version FROM waport_schema") == [(SCHEMA_VERSION,)]
    a.close()
    b.close()


def test_migrate_waits_for_another_hosts_migration_past_its_timeouts(pg: PgServer) -> None:
    store = ClusterStore(pg.dsn, "b", 15, statement_timeout=0.3, call_timeout=0.5)
    with pg.connect() as holder:  # another host, migrating
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        waiting = threading.Thread(target=lambda: found.append(store.migrate()))
        found: list[int] = []
        waiting.start()
        wait_for(lambda: pg.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                 == [(1,)], what="b to wait for the lock")
        time.sleep(1)  # longer than b's statement and call timeouts: it must still be waiting, not failed
        assert waiting.is_alive() and found == []
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    waiting.join(10)
    assert found == [0]
    assert store.hosts() == []  # back to its usual timeouts, and working
    store.close()


def test_a_newer_schema_is_refused_with_a_clear_error(pg: PgServer, stores: Callable[..., ClusterStore]) -> None:
    a = stores("a")
    pg.sql("UPDATE waport_schema SET version = %s", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="newer than this waportd"):
        a.migrate()


def test_two_hosts_claiming_at_once_one_wins(stores: Callable[..., ClusterStore]) -> None:
    a, b = stores("a"), stores("b")
    for i in range(20):
        company = f"c{i}"
        got = at_once(lambda c=company: claim(a, c), lambda c=company: claim(b, c))
        assert not any(isinstance(g, BaseException) for g in got), got
        winners = [host for host, lease in zip("ab", got, strict=True) if lease is not None]
        assert len(winners) == 1, (company, got)
        owners = {row.company: row.owner for row in a.leases()}
        assert owners[company] == winners[0]
        assert [g for g in got if g is not None][0].epoch == 1


def test_a_batch_claim_takes_the_free_the_expired_and_its_own_and_two_batches_split_the_rest(
        stores: Callable[..., ClusterStore]) -> None:
    a, b, c = stores("a", lease_ttl=1), stores("b", lease_ttl=15), stores("c", lease_ttl=15)
    assert set(a.claim_many(["old1", "old2"])) == {"old1", "old2"}
    assert claim(b, "taken") is not None and claim(b, "mine") is not None
    wait_for(lambda: not any(r.live for r in a.leases() if r.owner == "a"), timeout=5, what="a's leases to end")
    got = b.claim_many(["old1", "old2", "taken", "mine", "new", "new"])
    assert {k: v.epoch for k, v in got.items()} == {"old1": 2, "old2": 2, "taken": 1, "mine": 1, "new": 1}
    assert c.claim_many(["old1", "taken", "new", "free"]).keys() == {"free"}  # b's live ones stay b's
    assert b.claim_many([]) == {}
    # Two hosts claiming the same hundred at once: each company goes to exactly one of them, none waits forever.
    names = [f"n{i:03d}" for i in range(100)]
    got2 = at_once(lambda: b.claim_many(names), lambda: c.claim_many(list(reversed(names))))
    assert not any(isinstance(g, BaseException) for g in got2), got2
    assert sorted([*got2[0], *got2[1]]) == names


def test_a_batch_claim_skips_a_row_another_transaction_holds_and_takes_it_next_time(
        pg: PgServer, stores: Callable[..., ClusterStore]) -> None:
    a, b = stores("a", lease_ttl=1), stores("b", lease_ttl=15, statement_timeout=3.0)
    a.claim_many(["x1", "x2", "x3"])
    wait_for(lambda: not any(r.live for r in a.leases()), timeout=5, what="a's leases to expire")
    # a stalled transaction of a's (a lease check of its webhook writer, say) keeps x2's row locked
    with pg.connect() as held:
        held.execute("BEGIN")
        held.execute("SELECT epoch FROM waport_leases WHERE company = 'x2' FOR SHARE")
        # not held up: waiting would end in the 3 s statement timeout, an error for the whole batch
        assert set(b.claim_many(["x1", "x2", "x3", "x4"])) == {"x1", "x3", "x4"}
        held.execute("ROLLBACK")
    assert b.claim_many(["x2"])["x2"].epoch == 2


def test_renewal_keeps_the_epoch_and_counts_on_the_database_clock(stores: Callable[..., ClusterStore]) -> None:
    a = stores("a", lease_ttl=15)
    first = claim(a, "acme")
    assert first is not None and first.epoch == 1
    assert first.expires_at - first.db_now == datetime.timedelta(seconds=15)
    renewed = a.renew({"acme": 1})
    assert set(renewed) == {"acme"} and renewed["acme"].epoch == 1
    assert renewed["acme"].expires_at - renewed["acme"].db_now == datetime.timedelta(seconds=15)
    assert renewed["acme"].expires_at >= first.expires_at
    again = claim(a, "acme")  # my own live lease: kept, not bumped
    assert again is not None and again.epoch == 1
    started = time.monotonic()
    assert again.deadline(started) == pytest.approx(started + 15)
    assert a.renew({"acme": 2}) == {}  # not the epoch I hold
    assert a.renew({}) == {}


def test_an_expired_lease_goes_to_another_host_with_a_new_epoch(stores: Callable[..., ClusterStore]) -> None:
    a, b = stores("a", lease_ttl=1), stores("b", lease_ttl=1)
    assert claim(a, "acme").epoch == 1  # type: ignore[union-attr]
    assert claim(b, "acme") is None  # live: a's
    wait_for(lambda: not a.leases()[0].live, timeout=5, what="a's lease to expire")
    assert a.renew({"acme": 1})["acme"].epoch == 1  # expired but nobody took it: still a's to renew
    taken: Lease = wait_for(lambda: claim(b, "acme"), timeout=5, what="a's lease to expire and b to take it")
    assert taken.epoch == 2
    assert a.renew({"acme": 1}) == {}  # lost
    assert claim(a, "acme") is None  # b holds it now
    row = {r.company: r for r in a.leases()}["acme"]
    assert (row.owner, row.epoch, row.live) == ("b", 2, True)


def test_release_lets_another_host_claim_with_a_higher_epoch(stores: Callable[..., ClusterStore]) -> None:
    a, b = stores("a"), stores("b")
    assert claim(a, "acme").epoch == 1  # type: ignore[union-attr]
    assert not a.release("acme", 2)  # not the epoch I hold: nothing happens
    assert claim(b, "acme") is None
    assert a.release("acme", 1)
    lease = claim(b, "acme")
    assert lease is not None and lease.epoch == 2  # the row stays: an epoch never goes back to 1
    assert not a.release("acme", 1)


def test_credentials_of_an_older_epoch_are_refused(pg: PgServer, stores: Callable[..., ClusterStore]) -> None:
    a, b = stores("a", lease_ttl=1), stores("b", lease_ttl=1)
    assert not a.put_credentials("acme", 1, {"k": "no lease yet"})
    assert a.credentials("acme") is None
    assert claim(a, "acme").epoch == 1  # type: ignore[union-attr]
    assert a.put_credentials("acme", 1, {"k": "one", "n": [1, 2]})
    assert b.credentials("acme") == {"k": "one", "n": [1, 2]}
    wait_for(lambda: claim(b, "acme"), timeout=5, what="b to take over acme")
    assert b.put_credentials("acme", 2, {"k": "two"})
    assert not a.put_credentials("acme", 1, {"k": "late write of the old owner"})
    assert a.credentials("acme") == {"k": "two"}
    # A worker runs the same statement from its own connection, with the data as JSON text.
    with pg.connect(application_name=application_name("acme", 2)) as conn:
        params = {"company": "acme", "epoch": 2, "data": json.dumps({"k": "from the worker"})}
        assert conn.execute(PUT_CREDENTIALS_SQL, params).fetchone() == (2,)
        assert conn.execute(PUT_CREDENTIALS_SQL, {**params, "epoch": 1}).fetchone() is None
    assert a.credentials("acme") == {"k": "from the worker"}


def test_fence_older_ends_only_the_older_epochs_connections(pg: PgServer,
                                                            stores: Callable[..., ClusterStore]) -> None:
    b = stores("b")
    long_name = "x" * 50
    old = pg.connect(application_name=application_name("acme", 1))
    older = pg.connect(application_name=application_name("acme", 3))
    current = pg.connect(application_name=application_name("acme", 4))
    other = pg.connect(application_name=application_name("acme2", 1))
    like = pg.connect(application_name=application_name("acm_", 1))  # `_` is no wildcard
    long_old = pg.connect(application_name=application_name(long_name, 1))
    try:
        assert b.fence_older_many({"acme": 4}) == 2
        for conn in (old, older):
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        for conn in (current, other, like, long_old):
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert b.fence_older_many({"acme": 4}) == 0
        assert b.fence_older_many({long_name: 2}) == 1
        with pytest.raises(psycopg.OperationalError):
            long_old.execute("SELECT 1")
    finally:
        for conn in (old, older, current, other, like, long_old):
            conn.close()


def test_fencing_many_companies_at_once_ends_every_older_connection_before_it_returns(
        pg: PgServer, stores: Callable[..., ClusterStore]) -> None:
    b = stores("b")
    names = [f"c{i:02d}" for i in range(20)]
    old = [pg.connect(application_name=application_name(n, 1)) for n in names]
    kept = [pg.connect(application_name=application_name(n, 2)) for n in names[:5]]
    try:
        assert b.fence_older_many({n: 2 for n in names}) == 20
        # gone when it returns, not merely signalled
        assert pg.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'waport/c__/1'") == [(0,)]
        for conn in kept:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert b.fence_older_many({n: 2 for n in names}) == 0 and b.fence_older_many({}) == 0
    finally:
        for conn in old + kept:
            conn.close()


def test_hosts_and_desired_state(stores: Callable[..., ClusterStore]) -> None:
    a, b = stores("a"), stores("b")
    a.beat(capacity=10, companies=3)
    b.beat(capacity=0, companies=0, state="draining")
    hosts = {h.host_id: h for h in a.hosts()}
    assert (hosts["a"].state, hosts["a"].capacity, hosts["a"].companies) == ("up", 10, 3)
    assert hosts["b"].state == "draining"
    assert 0 <= hosts["a"].heartbeat_age < 5
    with pytest.raises(ValueError, match="not one of"):
        a.beat(1, 0, state="sleeping")
    assert a.set_host_state("b", "up") and b.hosts()[1].state == "up"
    assert a.set_host_state("b", "draining")  # `waportctl drain b` on host a
    b.beat(capacity=0, companies=0)  # b's next beat says up: it stays draining
    assert {h.host_id: h.state for h in a.hosts()}["b"] == "draining"
    assert not a.set_host_state("nobody", "draining")
    restarted = stores("b")
    restarted.beat(capacity=0, companies=0)  # b restarted (a new store): up again
    assert {h.host_id: h.state for h in a.hosts()}["b"] == "up"
    a.set_wanted("acme", True, proxy="socks5://p:1080")
    assert a.set_preferred("acme", "b")
    assert not a.set_preferred("nobody", "b")
    assert [(w.company, w.proxy, w.preferred_host) for w in b.wanted()] == [("acme", "socks5://p:1080", "b")]
    a.set_wanted("acme", False)
    a.set_wanted("beta", True)
    assert [w.company for w in b.wanted()] == ["beta"]
    a.set_wanted("acme", True)
    assert [(w.company, w.proxy, w.preferred_host) for w in b.wanted()] == [
        ("acme", None, "b"), ("beta", None, None)]  # the move survived the stop


@pytest.mark.pg_server
def test_postgres_down_fails_fast_and_heals(pg: PgServer) -> None:
    store = ClusterStore(pg.dsn.replace("postgres@", f"postgres:{SECRET}@"), "a", 15, connect_timeout=2,
                         call_timeout=3)
    store.migrate()
    store.beat(0, 0)
    assert SECRET not in repr(store) and SECRET not in str(store)
    pg.stop()
    for _ in range(2):  # the broken connection, then a refused reconnect
        began = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            store.hosts()
        assert time.monotonic() - began < 3
        assert SECRET not in str(info.value) and info.value.__context__ is None
    pg.start()
    assert [h.host_id for h in store.hosts()] == ["a"]
    pg.pause()  # a server that answers nothing: the call still ends, by call_timeout
    try:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer in 3 s"):
            store.hosts()
        assert time.monotonic() - began < 5
    finally:
        pg.resume()
    assert [h.host_id for h in store.hosts()] == ["a"]
    pg.kill()
    with pytest.raises(StoreUnavailable):
        claim(store, "acme")
    pg.start()  # crash recovery: what was committed is there
    assert [h.host_id for h in store.hosts()] == ["a"]
    store.close()


@pytest.mark.pg_server
def test_cluster_link_answers_through_the_loop_without_blocking_it(pg: PgServer) -> None:
    r, w = socket.socketpair()
    link = ClusterLink(pg.dsn, "a", 15, lambda: w.send(b"w"), connect_timeout=2, call_timeout=3)
    link.start()
    got: list[tuple[str, Any]] = []

    def results(n: int) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            if select.select([r], [], [], max(0, deadline - time.monotonic()))[0]:
                r.recv(64)
                link.take_done()
        assert len(got) == n, got
        return got

    def broken(store: ClusterStore) -> None:
        raise RuntimeError("a bug in a work")

    def bad_callback(result: Any) -> None:
        raise RuntimeError("a bug in a callback")

    try:
        # The schema is migrated before the first work: a claim works on an empty database.
        link.submit(lambda store: claim(store, "acme"), lambda lease: got.append(("claim", lease)))
        link.submit(broken, bad_callback)  # logged; the thread goes on
        link.submit(broken, lambda exc: got.append(("broken", exc)))
        link.submit(lambda store: store.renew({"acme": 1}), lambda leases: got.append(("renew", leases)))
        claimed, failed, renew = results(3)
        assert claimed[1].epoch == 1
        assert isinstance(failed[1], RuntimeError)
        assert set(renew[1]) == {"acme"}
        pg.stop()
        began = time.monotonic()
        link.submit(lambda store: store.renew({"acme": 1}), lambda leases: got.append(("down", leases)))
        assert time.monotonic() - began < 0.5  # the caller never waits for PostgreSQL
        assert isinstance(results(4)[3][1], StoreUnavailable)
    finally:
        link.stop()
        r.close()
        w.close()


def test_mail_reaches_the_host_it_is_for_even_when_posted_before_it_listened(pg: PgServer) -> None:
    a, b = ClusterStore(pg.dsn, "a", 15), ClusterStore(pg.dsn, "b", 15)
    a.migrate()
    a.post([("b", "request", "first"), ("c", "request", "not b's")])  # before b listens
    woken = threading.Event()
    ready = threading.Event()
    ready.set()
    listener = ClusterListener(b, woken.set, ready, sweep=30)
    listener.start()
    try:
        assert woken.wait(10)
        assert listener.take()[0] == [Letter("a", "request", "first")]
        assert listener.listening.wait(10)
        woken.clear()
        a.post([("b", "reply", "second"), ("b", "reply", "third")])  # the NOTIFY, not the 30 s sweep
        assert woken.wait(5)
        letters: list[Letter] = []
        deadline = time.monotonic() + 5
        while len(letters) < 2 and time.monotonic() < deadline:
            letters += listener.take()[0]
            time.sleep(0.01)
        assert [x.body for x in letters] == ["second", "third"]  # in the order posted
        a.broadcast(['{"h":"a"}', '{"h":"a","n":2}'])
        deadline = time.monotonic() + 5
        events: list[str] = []
        while len(events) < 2 and time.monotonic() < deadline:
            events += listener.take()[1]
            time.sleep(0.01)
        assert events == ['{"h":"a"}', '{"h":"a","n":2}']
        assert pg.sql("SELECT to_host, body FROM waport_mail") == [("c", "not b's")]  # taken mail is gone
        pg.sql("UPDATE waport_mail SET created_at = now() - interval '1 hour'")
        a.post([("b", "reply", "fourth")])  # and mail nobody took for long goes with the next post
        assert pg.sql("SELECT to_host FROM waport_mail WHERE to_host = 'c'") == []
    finally:
        listener.stop()
        a.close()
        b.close()


@pytest.mark.pg_server
def test_the_listener_comes_back_after_postgresql_restarts(pg: PgServer) -> None:
    a, b = ClusterStore(pg.dsn, "a", 15), ClusterStore(pg.dsn, "b", 15)
    a.migrate()
    ready = threading.Event()
    ready.set()
    listener = ClusterListener(b, lambda: None, ready)
    listener.start()
    try:
        assert listener.listening.wait(10)
        pg.stop()
        pg.start()
        got: list[str] = []

        def mail_arrives() -> bool:
            with contextlib.suppress(StoreUnavailable):  # the store's first call finds its connection gone
                a.post([("b", "k", "after")])
            got.extend(x.body for x in listener.take()[0])
            return bool(got)

        wait_for(mail_arrives, timeout=30, interval=0.5, what="mail after the restart")
        assert set(got) == {"after"}
    finally:
        listener.stop()
        a.close()
        b.close()
