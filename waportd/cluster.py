"""This host's part of a cluster (DESIGN.md §12): beat, renew what it owns, claim what placement gives it,
and fence itself when it cannot renew.

Every lease_renew_interval one round goes to PostgreSQL (on a link and thread of its own: the loop never
waits for the database, and a renewal never waits behind claims or forwarded commands): this host's beat,
the renewal of every lease it holds, and the cluster's view (hosts, leases, desired companies). A lease
missing from the renewal's answer is lost — another host holds a newer epoch — and its worker is stopped at
once. Each worker hears its lease deadline with every heartbeat (the renewal's expiry on the database
clock, turned into this host's monotonic clock, and never later than `fence_after` past the last
successful round), and stops its session by itself before it passes: a supervisor frozen or cut from the
database loses its sessions before anyone may claim them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipc.errors import BAD_REQUEST, WaportError
from ipc.events import LEASE_ACQUIRED, LEASE_LOST
from ipc.states import STARTING, STOPPED
from ipc.validation import validate_company
from waportd.controller import KEEP, proxy_arg
from waportd.placement import DOWN, DRAINING, UP, HostView, LeaseView, Wanted, next_expiry, plan
from waportd.roster import Roster
from waportd.services import Services
from waportd.session import Session

log = logging.getLogger("waport.cluster")
CLAIMS_PER_ROUND = 1000
EXPIRY_MARGIN = 0.05  # seconds past a foreign lease's expiry before the round that may claim it

Submit = Callable[[Callable[[Any], Any], Callable[[Any], None]], None]  # (work on the store, done with its result)


@dataclass
class Owned:
    epoch: int
    deadline: float  # this host's monotonic clock: the lease's expiry as the database last granted it


@dataclass
class View:
    """The cluster as the last round saw it."""

    hosts: list[HostView] = field(default_factory=list)
    leases: dict[str, LeaseView] = field(default_factory=dict)
    wanted: dict[str, Wanted] = field(default_factory=dict)


@dataclass
class Round:
    renewed: dict[str, Any]  # company -> Lease (epoch, expires_at, db_now)
    hosts: list[Any]
    leases: list[Any]
    wanted: list[Any]


class Cluster:
    def __init__(self, services: Services, roster: Roster, submit: Submit, submit_round: Submit | None = None) -> None:
        """`submit_round`: where the rounds go — a link of their own, so a renewal never waits behind
        hundreds of claims or forwarded commands (`submit`)."""
        self.services = services
        self.roster = roster
        self.submit = submit
        self.submit_round = submit_round or submit
        self.owned: dict[str, Owned] = {}
        self.claiming: set[str] = set()
        self.releasing: set[str] = set()
        self.view = View()
        self.last_ok: float | None = None  # monotonic start of the last round that renewed
        self.in_round = False
        self.next_round = 0.0
        self.unclaimed_since: dict[str, float] = {}
        self.booted = False
        self.after_round: list[Callable[[], None]] = []  # what waits for the next view (waportd/forwarding.py)
        self.on_claimed: list[Callable[[list[str]], None]] = []  # companies now ours (waportd/webhooks.py)
        self.on_lost: list[Callable[[str], None]] = []  # a company no longer ours

    @property
    def cfg(self) -> Any:
        return self.services.cfg

    # ------------------------------------------------------------ the loop's calls

    def tick(self, now: float) -> None:
        self.fence_if_cut_off(now)
        if not self.in_round and now >= self.next_round:
            self.start_round(now)

    def figures(self) -> tuple[dict[str, int], int]:
        """For /metrics: hosts per state (a silent one counts as down), and the leases held here."""
        by_state: dict[str, int] = {}
        for h in self.view.hosts:
            state = h.seen_state(self.cfg.lease_ttl)
            by_state[state] = by_state.get(state, 0) + 1
        return by_state, len(self.owned)

    def deadline_of(self, company: str) -> float | None:
        """What a worker hears with each heartbeat: stop the session before this (monotonic) time."""
        owned = self.owned.get(company)
        if owned is None or self.last_ok is None:
            return self.services.clock.monotonic()  # not ours (any more): stop now
        return min(owned.deadline, self.last_ok + self.cfg.fence_after)

    # ------------------------------------------------------------ one round

    def start_round(self, now: float) -> None:
        self.in_round = True
        asked = {c: o.epoch for c, o in self.owned.items()}
        capacity, boot = self.cfg.host_capacity, not self.booted
        configured = list(self.cfg.companies)

        def work(store: Any) -> Round:
            if boot:
                for name in configured:  # the config's companies join the cluster's desired state
                    store.set_wanted(name, True)
            store.beat(capacity, len(asked), UP)  # a drained host's row stays `draining` (the store keeps it)
            return Round(store.renew(asked), store.hosts(), store.leases(), store.wanted())

        self.submit_round(work, lambda result: self.on_round(now, asked, result))

    def round_soon(self) -> None:
        """Someone waits for a fresh view: the next round starts at the loop's next cluster tick."""
        self.next_round = 0.0

    def on_round(self, started: float, asked: dict[str, int], result: Any) -> None:
        try:
            self.take_round(started, asked, result)
        finally:
            for then in self.after_round:
                then()

    def take_round(self, started: float, asked: dict[str, int], result: Any) -> None:
        self.in_round = False
        self.next_round = started + self.cfg.lease_renew_interval
        took = self.services.clock.monotonic() - started
        if took > self.cfg.lease_renew_interval:
            log.warning("cluster round took %.1f s (lease_renew_interval %g s)", took, self.cfg.lease_renew_interval)
        if isinstance(result, BaseException):
            self.services.counters[("lease_renew_failures",)] += 1
            log.warning("cluster round failed: %s", result)
            return
        self.booted = True
        self.last_ok = started
        for company, epoch in asked.items():
            lease = result.renewed.get(company)
            if lease is None or lease.epoch != epoch:
                self.lose(company, "lease lost: another host holds a newer epoch")
            elif company in self.owned:
                self.owned[company].deadline = lease.deadline(started)
                c = self.roster.get(company)
                if c is not None and c.ready:
                    c.beat(only_with_deadline=True)  # the worker hears its new deadline at once
        self.view = self.see(result)
        expiry = next_expiry(self.cfg.host_id, self.view.leases.values())
        if expiry is not None:  # measured at the database a moment ago: the round goes just after
            self.next_round = min(self.next_round, self.services.clock.monotonic() + expiry + EXPIRY_MARGIN)
        self.act(started)

    def see(self, result: Round) -> View:
        hosts = [HostView(h.host_id, h.state, h.heartbeat_age, h.capacity, h.companies) for h in result.hosts]
        leases = {row.company: LeaseView(row.company, row.owner, row.epoch, row.remaining) for row in result.leases}
        wanted = {w.company: Wanted(w.company, w.preferred_host, w.proxy) for w in result.wanted}
        return View(hosts, leases, wanted)

    def act(self, now: float) -> None:
        if self.services.shutting_down:
            return  # leaving: `leave` hands everything back
        me = self.cfg.host_id
        for company in self.owned:
            c = self.roster.get(company)
            if (c is not None and c.worker is None and c.state == STOPPED and c.due is None
                    and company not in self.releasing):  # stopped, and no start queued
                log.info("%s: the lease still holds (its worker fenced itself on a late renewal); starting again",
                         company)
                c.start(paced=True)
        live = {c for c, owner in self.live_owners().items() if owner != me}
        for company in self.view.wanted:
            if company in live or company in self.owned:
                self.unclaimed_since.pop(company, None)
            else:
                self.unclaimed_since.setdefault(company, now)
        unclaimed_for = {c: now - t for c, t in self.unclaimed_since.items()}
        capacity = self.cfg.host_capacity
        room = None if capacity == 0 else max(0, capacity - len(self.owned) - len(self.claiming))
        leases = {c: lease for c, lease in self.view.leases.items() if lease.owner != me}  # mine: claim again
        todo = plan(me, self.view.hosts, leases, self.view.wanted, set(self.owned) | self.claiming,
                    unclaimed_for, self.cfg.lease_ttl, room)
        for company in todo.release:
            if company in self.owned and company not in self.releasing:
                self.release(company)
        # A bounded batch a round (each claim is a callback on the loop; the starts are paced by its timers):
        # a dead host's companies are claimed in one round, and their starts spread over the next turns.
        self.claim([c for c in todo.claim if c not in self.claiming][:CLAIMS_PER_ROUND], now)

    # ------------------------------------------------------------ claim, lose, release

    def claim(self, companies: list[str], now: float) -> None:
        """Every company placement gives this host, in one call to the store (a round may bring hundreds)."""
        if not companies:
            return
        self.claiming.update(companies)

        def work(store: Any) -> list[Any]:
            leases = store.claim_many(companies)
            # a host that wakes late cannot write any more
            store.fence_older_many({c: lease.epoch for c, lease in leases.items() if lease.epoch > 1})
            return [leases.get(company) for company in companies]

        def done(result: Any) -> None:
            for i, company in enumerate(companies):
                self.claimed(company, now, result if isinstance(result, BaseException) else result[i])
            ours = [company for company in companies if company in self.owned]
            for then in self.on_claimed:
                then(ours)

        self.submit(work, done)

    def claimed(self, company: str, asked_at: float, lease: Any) -> None:
        self.claiming.discard(company)
        if lease is None or isinstance(lease, BaseException):
            if isinstance(lease, BaseException):
                log.warning("%s: claim failed: %s", company, lease)
            return
        self.owned[company] = Owned(lease.epoch, lease.deadline(asked_at))
        self.unclaimed_since.pop(company, None)
        wanted = self.view.wanted.get(company)
        c = self.roster.add(company)
        c.cluster_epoch = lease.epoch
        c.lease_deadline = lambda: self.deadline_of(company)
        if wanted is not None and wanted.proxy is not None:
            c.proxy = wanted.proxy
        log.info("%s: lease acquired (epoch %d); starting", company, lease.epoch)
        self.services.publish(company, LEASE_ACQUIRED, {"host": self.cfg.host_id, "epoch": lease.epoch}, None)
        c.start(paced=True)

    def lose(self, company: str, why: str) -> None:
        owned = self.owned.pop(company, None)
        if owned is None:
            return
        log.warning("%s: %s; stopping its session", company, why)
        for then in self.on_lost:
            then(company)
        self.services.publish(company, LEASE_LOST, {"host": self.cfg.host_id, "epoch": owned.epoch,
                                                    "reason": why}, None)
        c = self.roster.get(company)
        if c is not None:
            c.stop()

    def release(self, company: str) -> None:
        """Gracefully: the worker ends first, then the lease goes, so the next owner never overlaps."""
        owned = self.owned[company]
        self.releasing.add(company)
        c = self.roster.get(company)

        def released(_result: Any) -> None:
            self.releasing.discard(company)
            self.owned.pop(company, None)
            for then in self.on_lost:
                then(company)

        def give_up() -> None:
            self.submit(lambda store: store.release(company, owned.epoch), released)

        log.info("%s: releasing its lease (epoch %d)", company, owned.epoch)
        if c is None or c.worker is None:
            give_up()
            return
        c.stop()
        c.when_exited(give_up)

    def leave(self, store: Any) -> None:
        """A graceful stop of this host, its workers already ended: its leases go at once and it says it is
        down, so other hosts claim its companies within a round instead of a lease_ttl."""
        try:
            for company, owned in self.owned.items():
                store.release(company, owned.epoch)
            store.beat(self.cfg.host_capacity, 0, DOWN)
        except Exception as exc:  # noqa: BLE001 - the leases then simply expire
            log.warning("cluster: leaving without handing leases back (%s); they expire within lease_ttl", exc)
            return
        log.info("cluster: left; %d leases handed back", len(self.owned))
        self.owned.clear()

    def fence_if_cut_off(self, now: float) -> None:
        """No successful round for fence_after: this host stops every session before anyone may claim it."""
        if self.last_ok is None or not self.owned or now - self.last_ok < self.cfg.fence_after:
            return
        for company in list(self.owned):
            self.lose(company, f"fenced: no lease renewal for {self.cfg.fence_after:g} s")

    # ------------------------------------------------------------ commands

    def owner_of(self, company: str) -> str | None:
        """The other host holding `company`'s live lease, as the last round saw it (not one that left)."""
        lease = self.view.leases.get(company)
        if lease is None or not lease.live or lease.owner == self.cfg.host_id or not self.is_up(lease.owner):
            return None
        return lease.owner

    def up_hosts(self) -> set[str]:
        """The hosts that beat and have not said they are down, as the last round saw them."""
        return {h.host_id for h in self.view.hosts if h.seen_state(self.cfg.lease_ttl) != DOWN}

    def is_up(self, host: str) -> bool:
        return host in self.up_hosts()

    def live_owners(self) -> dict[str, str]:
        return {c: lease.owner for c, lease in self.view.leases.items() if lease.live}

    def record(self, company: str) -> dict[str, Any]:
        """A company's record from this host: its own if it runs here, else where the cluster has it (a
        command about it is forwarded there: waportd/forwarding.py)."""
        c = self.roster.get(company)
        if c is not None and company in self.owned:
            return {**c.record(), "host": self.cfg.host_id}
        host = self.owner_of(company)
        return {**Session(company).record(), "state": STARTING, "host": host,
                "reason": f"claimed by {host}" if host else "waiting for a host to claim it"}

    def cmd_start(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """The cluster's desired state: the host placement names claims it within a round."""
        name = validate_company(args.get("company"))
        proxy = proxy_arg(args.get("proxy"))
        keep = proxy is KEEP
        self.submit(lambda store: store.set_wanted(name, True, None if keep else proxy),
                    lambda r: answer(r, ok, fail, self.record(name)))

    def cmd_stop(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """Not wanted any more: its owner stops it at its next round (at once, if that is this host)."""
        name = validate_company(args.get("company"))

        def done(result: Any) -> None:
            if not isinstance(result, BaseException):
                self.view.wanted.pop(name, None)
                if name in self.owned and name not in self.releasing:
                    self.release(name)
            answer(result, ok, fail, self.record(name))

        self.submit(lambda store: store.set_wanted(name, False), done)

    def cmd_cluster(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        me = self.cfg.host_id
        owners = Counter(self.live_owners().values())
        ok({"host": me, "hosts": [
            {"host_id": h.host_id, "state": h.seen_state(self.cfg.lease_ttl),
             "heartbeat_age": round(h.heartbeat_age, 3), "companies": owners.get(h.host_id, 0),
             "capacity": h.capacity, "me": h.host_id == me} for h in sorted(self.view.hosts, key=lambda h: h.host_id)]})

    def known_host(self, args: dict[str, Any]) -> str:
        host = args.get("host")
        if not isinstance(host, str) or host not in {h.host_id for h in self.view.hosts}:
            raise WaportError(BAD_REQUEST, f"no host {str(host)[:63]!r} in the cluster (waportctl cluster lists them)")
        return host

    def cmd_drain(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        host = self.known_host(args)
        self.submit(lambda store: store.set_host_state(host, DRAINING), lambda r: answer(r, ok, fail, {"host": host,
                                                                                                  "state": DRAINING}))

    def cmd_move(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        company = validate_company(args.get("company"))
        host = self.known_host(args)
        self.submit(lambda store: store.set_preferred(company, host),
                    lambda r: answer(r, ok, fail, {"company": company, "host": host}))


CLUSTER_COMMANDS = ("cluster", "drain", "move")
CLUSTER_LIFECYCLE = ("start", "stop")  # the cluster's desired state, not this host's


class NoCluster:
    """The cluster's commands on a host that runs alone: a clear refusal."""

    def refuse(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        raise WaportError(BAD_REQUEST, "this waportd runs alone (cluster_dsn is empty): there is no cluster")

    cmd_cluster = cmd_drain = cmd_move = refuse


def answer(result: Any, ok: Callable, fail: Callable, shown: dict[str, Any]) -> None:
    if isinstance(result, BaseException):
        fail(WaportError(BAD_REQUEST, f"the cluster database did not answer: {result}"))
    else:
        ok(shown)

