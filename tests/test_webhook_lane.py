"""waportd/webhook_delivery.py's Lane, without a process: seq order, retries waiting their turn, retry_now;
and what a replay reloads."""

from __future__ import annotations

import asyncio
import time

import pytest

from ipc.webhookstore import DEAD, OK, Busy, Event, Settled, WebhookStore
from waportd.webhook_delivery import Delivery, Lane


def ev(n: int, seq: int, next_at: float = 0.0) -> Event:
    return Event(n, f"evt_{n}", "acme", seq, "message", b"{}", 0.0, 0, next_at)


def test_due_events_go_in_seq_order_and_a_failed_one_waits_its_time() -> None:
    lane = Lane("acme")
    for n, seq in [(3, 30), (1, 10), (2, 20)]:
        lane.add(ev(n, seq), now=100.0)
    first, _ = lane.take(100.0)
    assert first is not None and first.seq == 10
    first.next_at = 105.0
    lane.later(first)  # it failed: the next one goes now
    assert lane.take(100.0)[0].seq == 20
    assert lane.take(100.0)[0].seq == 30
    assert lane.take(101.0) == (None, 4.0)
    assert lane.take(105.0)[0].seq == 10


def test_a_paused_lane_waits_and_retry_now_ends_pause_and_waits() -> None:
    lane = Lane("acme")
    lane.add(ev(1, 1, next_at=500.0), now=100.0)
    lane.paused_until = 200.0
    assert lane.take(100.0) == (None, 100.0)
    lane.retry_now()
    got, _ = lane.take(100.0)
    assert got is not None and got.n == 1


def test_an_event_already_held_is_not_added_twice_and_expiry_finds_the_old() -> None:
    lane = Lane("acme")
    lane.add(ev(1, 1), now=0.0)
    lane.add(ev(1, 1), now=0.0)
    assert len(lane.ready) == 1
    assert [e.n for e in lane.expired(now=10.0, max_age=5.0)] == [1]


class BusyOnce(WebhookStore):
    """The store is busy for the delivery process's next write (another process holds it)."""

    busy = False

    def settle(self, results: list[Settled]) -> None:
        if self.busy:
            self.busy = False
            raise Busy("locked")
        super().settle(results)


@pytest.mark.parametrize("busy", [False, True], ids=["written", "store-busy"])
def test_a_replay_does_not_hand_out_again_an_event_delivered_a_moment_ago(tmp_path, busy: bool) -> None:
    store = BusyOnce(str(tmp_path / "webhooks.db"))
    now = time.time()
    store.add_events([(f"evt_{s}", "acme", s, "message", "{}", now) for s in (1, 2, 3)], {"acme": 3})

    async def scenario() -> list[int]:
        delivery = Delivery(store, str(tmp_path), timeout=1.0, max_age=3600.0, concurrency=1)
        delivery.read_new()  # the lanes' tasks never run: this test plays their part
        lane = delivery.lanes["acme"]
        first, _ = lane.take(now)
        delivery.finish(lane, first, DEAD, now, 500, "HTTP 500", "dead")
        delivery.flush()
        second, _ = lane.take(now)
        delivery.finish(lane, second, OK, now, 200, None, "ok")  # delivered; its result not yet written
        store.busy = busy
        assert store.replay("acme", dead_only=True, since=None, now=now) == 1
        delivery.reload_lane("acme")
        for task in delivery.tasks.values():
            task.cancel()
        return sorted(e.seq for e in lane.events.values())

    assert asyncio.run(scenario()) == [1, 3]
    store.close()
