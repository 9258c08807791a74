"""Placement of companies on hosts (DESIGN.md §12): pure policy."""

from __future__ import annotations

from collections import Counter

from waportd.placement import DOWN, DRAINING, UP, HostView, LeaseView, Wanted, next_expiry, place, plan

TTL = 15.0


def hosts(*ids: str, **over: dict) -> list[HostView]:
    return [HostView(**{"host_id": h, "state": UP, "heartbeat_age": 1.0, "capacity": 0, "companies": 0,
                        **over.get(h, {})}) for h in ids]


def test_every_host_computes_the_same_owner_and_companies_spread():
    names = [f"c{i:03d}" for i in range(300)]
    a = [place(c, hosts("h1", "h2", "h3"), TTL) for c in names]
    b = [place(c, list(reversed(hosts("h1", "h2", "h3"))), TTL) for c in names]
    assert a == b
    spread = Counter(a)
    assert set(spread) == {"h1", "h2", "h3"} and min(spread.values()) > 60


def test_a_joining_host_takes_only_what_ranks_it_first_and_a_leaving_one_only_loses_its_own():
    names = [f"c{i:03d}" for i in range(300)]
    before = {c: place(c, hosts("h1", "h2"), TTL) for c in names}
    after = {c: place(c, hosts("h1", "h2", "h3"), TTL) for c in names}
    assert all(after[c] in (before[c], "h3") for c in names)  # nothing moves between h1 and h2
    gone = {c: place(c, hosts("h1", "h3"), TTL) for c in names}
    assert all(gone[c] == after[c] for c in names if after[c] != "h2")


def test_dead_draining_and_full_hosts_get_nothing_and_a_preferred_host_wins_when_it_can():
    hs = hosts("h1", "h2", "h3", "h4", h1={"heartbeat_age": 20.0}, h2={"state": DRAINING},
               h3={"capacity": 2, "companies": 2}, h4={"state": DOWN})
    assert place("acme", hs, TTL) is None
    hs = hosts("h1", "h2", h2={"capacity": 5, "companies": 1})
    assert place("acme", hs, TTL, preferred="h2") == "h2"
    assert place("acme", hosts("h1", h1={}), TTL, preferred="gone") == "h1"


def test_plan_claims_what_is_placed_here_and_unleased_and_keeps_live_leases_where_they_are():
    hs = hosts("h1", "h2")
    wanted = {c: Wanted(c) for c in ("a", "b", "c", "d", "e", "f")}
    mine = {c for c in wanted if place(c, hs, TTL) == "h1"}
    p = plan("h1", hs, {}, wanted, set(), {}, TTL, None)
    assert set(p.claim) == mine and not p.release
    # A live lease elsewhere stays there, even for a company placement would give to h1 (sticky).
    leases = {c: LeaseView(c, "h2", 3, 10.0) for c in mine}
    assert plan("h1", hs, leases, wanted, set(), {}, TTL, None).claim == []
    # An expired one is claimed again by the host placement names.
    leases = {c: LeaseView(c, "h2", 3, -1.0) for c in mine}
    assert set(plan("h1", hs, leases, wanted, set(), {}, TTL, None).claim) == mine


def test_plan_lets_anyone_claim_what_stayed_unclaimed_a_whole_ttl_and_respects_room():
    hs = hosts("h1", "h2")
    theirs = next(c for c in (f"x{i}" for i in range(50)) if place(c, hs, TTL) == "h2")
    wanted = {theirs: Wanted(theirs)}
    assert plan("h1", hs, {}, wanted, set(), {theirs: 5.0}, TTL, None).claim == []
    assert plan("h1", hs, {}, wanted, set(), {theirs: TTL}, TTL, None).claim == [theirs]
    many = {f"m{i}": Wanted(f"m{i}") for i in range(20)}
    assert len(plan("h1", hosts("h1"), {}, many, set(), {}, TTL, 3).claim) == 3


def test_plan_releases_what_is_no_longer_wanted_moved_away_or_everything_when_draining():
    hs = hosts("h1", "h2")
    wanted = {"a": Wanted("a"), "b": Wanted("b", preferred_host="h2")}
    p = plan("h1", hs, {}, wanted, {"a", "b", "gone"}, {}, TTL, None)
    assert p.release == ["b", "gone"]
    drained = plan("h1", hosts("h1", "h2", h1={"state": DRAINING}), {}, wanted, {"a", "b"}, {}, TTL, None)
    assert drained.release == ["a", "b"] and drained.claim == []
    # a move to a host that is not there waits: the company stays
    hs_dead = hosts("h1", "h2", h2={"heartbeat_age": 99.0})
    assert plan("h1", hs_dead, {}, wanted, {"a", "b"}, {}, TTL, None).release == []


def test_the_next_round_may_come_when_another_host_s_first_lease_runs_out():
    leases = [LeaseView("a", "h1", 1, 4.0), LeaseView("b", "h2", 3, 1.5), LeaseView("c", "h2", 1, 9.0),
              LeaseView("d", "h3", 2, -2.0)]  # d: expired already, claimable now
    assert next_expiry("h1", leases) == 1.5
    assert next_expiry("h2", leases) == 4.0  # its own leases it renews
    assert next_expiry("h1", [LeaseView("a", "h1", 1, 4.0), LeaseView("d", "h3", 2, -2.0)]) is None
