"""waportd/webhook_delivery.py's Lane, without a process: seq order, retries waiting their turn, retry_now."""

from __future__ import annotations

from ipc.webhookstore import Event
from waportd.webhook_delivery import Lane


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
