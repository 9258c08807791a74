import pytest

from waportd.ratelimit import FallbackLimiter, Limits, MemoryLimiter, RedisLimiter

LIMITS = Limits(per_recipient=30, window=60.0)


def burst(limiter, n, now=1000.0, company="acme", to="15550109999"):
    return [limiter.check(company, to, now + i * 0.01) for i in range(n)]


def test_the_31st_message_in_the_window_is_refused_with_the_time_to_wait():
    lim = MemoryLimiter(LIMITS)
    decisions = burst(lim, 31)
    assert all(d.allowed for d in decisions[:30]) and not decisions[30].allowed
    # the first one (at t=1000.00) leaves the window at t=1060.00; the 31st came at t=1000.30
    assert decisions[30].retry_after_ms == 59700
    assert not lim.check("acme", "15550109999", 1059.99).allowed
    assert lim.check("acme", "15550109999", 1060.0).allowed


def test_windows_are_per_recipient_and_per_company():
    lim = MemoryLimiter(LIMITS)
    burst(lim, 30)
    assert lim.check("acme", "15550100000", 1001).allowed
    assert lim.check("bistro", "15550109999", 1001).allowed
    capped = MemoryLimiter(Limits(per_recipient=30, window=10, per_company=3))
    assert [capped.check("acme", f"155501000{i}", 5.0).allowed for i in range(4)] == [True, True, True, False]


def test_a_refusal_does_not_use_up_the_window():
    lim = MemoryLimiter(Limits(per_recipient=1, window=10))
    assert lim.check("a", "1", 0).allowed
    for t in range(1, 10):
        assert not lim.check("a", "1", t).allowed
    assert lim.check("a", "1", 10).allowed


def test_prune_forgets_idle_keys():
    lim = MemoryLimiter(LIMITS)
    burst(lim, 3)
    lim.prune(2000)
    assert lim.log == {}


def test_redis_limiter_agrees_with_the_memory_one(redis_server):
    lim = RedisLimiter(redis_server.client(), LIMITS)
    decisions = burst(lim, 31)
    assert all(d.allowed for d in decisions[:30]) and not decisions[30].allowed
    assert decisions[30].retry_after_ms == 59700
    ttl = redis_server.client().pttl("waport:rl:acme:15550109999")
    assert 0 < ttl <= 60_000


def test_both_windows_are_checked_atomically(redis_server):
    lim = RedisLimiter(redis_server.client(), Limits(per_recipient=2, window=60, per_company=3))
    got = [lim.check("acme", to, 10.0).allowed for to in ("1", "1", "1", "2", "3")]
    assert got == [True, True, False, True, False]
    assert redis_server.client().zcard("waport:rl:acme") == 3  # refusals charged nothing


def test_fallback_to_memory_when_redis_is_down(redis_server):
    lim = FallbackLimiter(LIMITS, redis_server.client(), retry_after=0.0)
    assert lim.check("acme", "1", 1.0).allowed and lim.fallbacks == 0
    redis_server.stop()
    decisions = [lim.check("acme", "1", 2.0 + i) for i in range(30)]
    assert lim.fallbacks >= 1
    assert all(d.allowed for d in decisions[:30])
    assert not lim.check("acme", "1", 40.0).allowed  # memory enforces the same limit meanwhile


@pytest.mark.parametrize("window", [0.001, 3600.0])
def test_retry_after_is_never_zero_for_a_refusal(window):
    lim = MemoryLimiter(Limits(per_recipient=1, window=window))
    lim.check("a", "1", 5.0)
    refused = lim.check("a", "1", 5.0)
    assert not refused.allowed and refused.retry_after_ms >= 1
