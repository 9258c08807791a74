from waportd.backoff import RestartPolicy

P = RestartPolicy(base_delay=5, factor=2, max_delay=300, jitter=0.2, reset_after=60, max_restarts=10)


def test_delay_grows_exponentially_without_jitter():
    assert [P.delay(n, 0.5) for n in range(1, 6)] == [5, 10, 20, 40, 80]


def test_delay_is_capped():
    assert P.delay(7, 0.5) == 300  # 5 * 2**6 = 320 -> 300
    assert P.delay(10_000, 0.5) == 300  # no overflow


def test_jitter_bounds():
    lo, hi = P.bounds(1)
    assert (lo, hi) == (4.0, 6.0)
    assert P.delay(3, 0.0) == 16.0 and P.delay(3, 1.0) == 24.0


def test_random_delays_stay_within_bounds():
    lo, hi = P.bounds(4)
    for _ in range(1000):
        assert lo <= P.delay(4) <= hi


def test_failure_count_resets_after_a_stable_run():
    assert P.failures_after_exit(7, ran_for=59.9) == 8
    assert P.failures_after_exit(7, ran_for=60) == 1


def test_gives_up_after_max_restarts_except_for_network_failures():
    assert not P.gives_up(10, network=False)
    assert P.gives_up(11, network=False)
    assert not P.gives_up(10_000, network=True)
