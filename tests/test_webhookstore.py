"""ipc/webhookstore.py: what the supervisor records and the delivery process settles, on a real SQLite file."""

from __future__ import annotations

import os
import stat
import time

import pytest

from ipc.webhooks import GLOBAL, new_secret
from ipc.webhookstore import DEAD, OK, PENDING, Busy, Endpoint, Settled, WebhookStore


@pytest.fixture
def store(tmp_path) -> WebhookStore:
    s = WebhookStore(str(tmp_path / "webhooks" / "webhooks.db"))
    yield s
    s.close()


def row(eid: str, company: str, seq: int, created: float | None = None) -> tuple:
    return (eid, company, seq, "message", f'{{"seq":{seq}}}', created or time.time())


def test_file_and_directory_keep_secrets_private(tmp_path, store: WebhookStore) -> None:
    store.put_endpoint(Endpoint("acme", "http://h/x", new_secret(), ("message",)))
    assert stat.S_IMODE(os.stat(tmp_path / "webhooks").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "webhooks" / "webhooks.db").st_mode) == 0o600


def test_endpoints_round_trip_and_set_again_enables(store: WebhookStore) -> None:
    ep = Endpoint("acme", "http://h/x", new_secret(), ("message", "sent"))
    store.put_endpoint(ep)
    store.put_endpoint(Endpoint(GLOBAL, "http://h/all", new_secret(), ("state",)))
    got = store.endpoints()
    assert got["acme"].events == ("message", "sent") and got[GLOBAL].url == "http://h/all"
    store.disable("acme", "http://h/x", "HTTP 410", time.time())
    assert ("acme", "http://h/x") in store.disabled()
    store.put_endpoint(ep)
    assert store.disabled() == {}
    assert store.delete_endpoint("acme") and not store.delete_endpoint("acme")


def test_a_rotated_secret_signs_for_a_day() -> None:
    now = time.time()
    ep = Endpoint("acme", "http://h", "new", ("message",), old_secret="old", old_until=now + 10)
    assert ep.secrets(now) == ["new", "old"] and ep.secrets(now + 11) == ["new"]
    assert "new" not in ep.public().values() and "old" not in ep.public().values()


def test_events_are_kept_once_and_read_in_order(store: WebhookStore) -> None:
    store.add_events([row("evt_a", "acme", 1), row("evt_b", "acme", 2), row("evt_c", "beta", 1)],
                     {"acme": 2, "beta": 1})
    store.add_events([row("evt_a", "acme", 3)], {"acme": 3})  # the same message heard again after a crash
    assert [e.id for e in store.pending_after(0, 10)] == ["evt_a", "evt_b", "evt_c"]
    assert store.seqs() == {"acme": 3, "beta": 1}
    assert [e.seq for e in store.pending_of("acme", 1, 10)] == [2]


def test_settle_replay_and_prune(store: WebhookStore) -> None:
    t = time.time()
    store.add_events([row("evt_a", "acme", 1, t), row("evt_b", "acme", 2, t), row("evt_c", "acme", 3, t)],
                     {"acme": 3})
    a, b, c = store.pending_after(0, 10)
    store.settle([Settled(a.n, OK, 1, t, t, 204, None), Settled(b.n, DEAD, 9, t, t, 500, "HTTP 500"),
                  Settled(c.n, PENDING, 1, t + 5, t, None, "timeout")])
    listing = store.deliveries("acme", 10)
    assert listing["counts"] == {PENDING: 1, OK: 1, DEAD: 1}
    by_id = {e["id"]: e for e in listing["events"]}
    assert by_id["evt_c"]["last_error"] == "timeout" and by_id["evt_c"]["next_attempt_at"] == t + 5
    assert by_id["evt_b"]["last_status"] == 500 and by_id["evt_b"]["next_attempt_at"] is None
    assert store.replay("acme", True, None, t + 1) == 1  # the dead one
    assert {e.id for e in store.pending_after(0, 10)} == {"evt_b", "evt_c"}
    assert store.replay("acme", False, t - 1, t + 1) == 1  # every settled one since: the delivered one
    assert store.prune(t + 100, t + 100) == 0  # nothing settled any more
    store.settle([Settled(a.n, OK, 2, t, t, 204, None)])
    assert store.prune(t + 1, t - 1) == 1


def test_a_410_kills_what_is_pending_for_that_company_only(store: WebhookStore) -> None:
    store.add_events([row("evt_a", "acme", 1), row("evt_b", "beta", 1)], {"acme": 1, "beta": 1})
    assert store.disable("acme", "http://h", "HTTP 410", time.time()) == 1
    assert [e.company for e in store.pending_after(0, 10)] == ["beta"]


def test_the_supervisor_never_waits_for_the_lock(tmp_path, store: WebhookStore) -> None:
    other = WebhookStore(store.db.execute("PRAGMA database_list").fetchone()[2], busy_ms=0)
    store.db.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(Busy):
            other.add_events([row("evt_x", "acme", 1)], {"acme": 1})
        assert time.monotonic() - started < 0.5
    finally:
        store.db.execute("ROLLBACK")
        other.close()
    assert store.forget("acme") is None and store.seqs() == {}
