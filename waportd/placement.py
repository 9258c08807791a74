"""Which host runs a company (DESIGN.md §12): pure policy, no database.

Rendezvous (highest-random-weight) hashing over the live hosts with room: every host computes the same
answer from the same rows, without talking to the others, and a host that joins takes only the
companies for which it now ranks first *and* which have no live lease — a company with a live lease
stays where it is (sticky), so a join moves nothing. A company that the named host leaves unclaimed for
a whole lease_ttl (its host is slow, full, or dying) may be claimed by anyone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

UP, DRAINING, DOWN = "up", "draining", "down"


@dataclass(frozen=True)
class HostView:
    host_id: str
    state: str  # up | draining | down (as the host said in its last beat)
    heartbeat_age: float  # seconds, on the database's clock
    capacity: int  # 0 = unlimited
    companies: int

    def live(self, lease_ttl: float) -> bool:
        """Beating: a host silent for a whole lease_ttl holds no live lease anyway."""
        return self.state != DOWN and self.heartbeat_age < lease_ttl

    def has_room(self) -> bool:
        return self.state == UP and (self.capacity == 0 or self.companies < self.capacity)

    def seen_state(self, lease_ttl: float) -> str:
        """Its state as others should show it: a silent host is down, whatever it said last."""
        return self.state if self.live(lease_ttl) else DOWN


@dataclass(frozen=True)
class LeaseView:
    company: str
    owner: str
    epoch: int
    remaining: float  # seconds left on the database's clock (negative: expired)

    @property
    def live(self) -> bool:
        return self.remaining > 0


@dataclass
class Wanted:
    company: str
    preferred_host: str | None = None
    proxy: str | None = None


def weight(company: str, host_id: str) -> int:
    digest = hashlib.blake2b(f"{company}\0{host_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def place(company: str, hosts: list[HostView], lease_ttl: float, preferred: str | None = None) -> str | None:
    """The live host with room that ranks first for `company` (the preferred one when it can take it)."""
    candidates = [h for h in hosts if h.live(lease_ttl) and h.has_room()]
    if preferred is not None and any(h.host_id == preferred for h in candidates):
        return preferred
    best = max(candidates, key=lambda h: weight(company, h.host_id), default=None)
    return best.host_id if best else None


@dataclass
class Plan:
    claim: list[str] = field(default_factory=list)  # wanted, unleased, and placed here (or left too long)
    release: list[str] = field(default_factory=list)  # owned here but no longer wanted, draining or moved away


def plan(me: str, hosts: list[HostView], leases: dict[str, LeaseView], wanted: dict[str, Wanted],
         owned: set[str], unclaimed_for: dict[str, float], lease_ttl: float, room: int | None) -> Plan:
    """What this host should claim and release this round. `unclaimed_for`: seconds each wanted company has
    been without a live lease, as this host saw it; `room`: how many more it may take (None: unlimited)."""
    out = Plan()
    me_view = next((h for h in hosts if h.host_id == me), None)
    draining = me_view is not None and me_view.state == DRAINING
    for company in sorted(owned):
        want = wanted.get(company)
        if want is None or draining:
            out.release.append(company)
        elif want.preferred_host not in (None, me) and any(
                h.host_id == want.preferred_host and h.live(lease_ttl) and h.has_room() for h in hosts):
            out.release.append(company)  # moved: its preferred host is there to take it
    if draining:
        return out
    for company in sorted(wanted):
        lease = leases.get(company)
        if company in owned or (lease is not None and lease.live):
            continue
        if room is not None and len(out.claim) >= room:
            break
        named = place(company, hosts, lease_ttl, wanted[company].preferred_host)
        if named == me or unclaimed_for.get(company, 0.0) >= lease_ttl:
            out.claim.append(company)
    return out


def next_expiry(me: str, leases: Iterable[LeaseView]) -> float | None:
    """Seconds until the first live lease of another host runs out (None: there is none). A live host
    renews long before; a dead host's companies are claimable then, so the next round goes at that moment
    rather than up to a renewal interval later."""
    return min((lease.remaining for lease in leases if lease.owner != me and lease.live), default=None)
