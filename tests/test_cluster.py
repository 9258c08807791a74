"""Several hosts on one PostgreSQL (DESIGN.md §12): one owner per company, failover, fencing, drain, move.

Each "host" is a real waportd with its own state and run directories; all share a PostgreSQL server of
the test's own and one standalone simulated network, which sees any double session (`replaced`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import Daemon, SimNetProcess, wait_for

WAPORTCTL = os.path.join(os.path.dirname(sys.executable), "waportctl")
TIMERS = {"lease_ttl": 6.0, "lease_renew_interval": 0.5, "fence_after": 3.0, "heartbeat_interval": 0.5}


class Hosts:
    def __init__(self, base: str, dsn: str, net: SimNetProcess) -> None:
        self.base, self.dsn, self.net = base, dsn, net
        self.daemons: dict[str, Daemon] = {}

    def start(self, host_id: str, **config: object) -> Daemon:
        os.makedirs(os.path.join(self.base, host_id))
        d = Daemon(os.path.join(self.base, host_id), cluster_dsn=self.dsn, host_id=host_id,
                   sim_endpoint=self.net.endpoint, **{**TIMERS, **config})
        self.daemons[host_id] = d
        return d.start()

    def owners(self, company: str) -> list[str]:
        """The hosts whose own record says the company is connected there."""
        found = []
        for host_id, d in self.daemons.items():
            if d.proc is None or d.proc.poll() is not None:
                continue
            try:
                if d.status(company)["state"] == "connected":
                    found.append(host_id)
            except Exception:  # noqa: BLE001 - unknown here, or a frozen daemon
                continue
        return found

    def owner(self, company: str, timeout: float = 20, exclude: tuple[str, ...] = ()) -> str:
        def one() -> str | None:
            found = [h for h in self.owners(company) if h not in exclude]
            return found[0] if len(found) == 1 else None
        try:
            return wait_for(one, timeout=timeout, what=f"{company} connected on one host")
        except AssertionError as exc:
            logs = "\n".join(f"--- {h}\n{d.logs()}" for h, d in self.daemons.items())
            raise AssertionError(f"{exc}\n{logs}") from None

    def cleanup(self) -> None:
        for d in self.daemons.values():
            if d.proc is not None and d.proc.poll() is None:
                os.kill(d.proc.pid, signal.SIGCONT)
            d.cleanup()


@pytest.fixture
def cluster(short_tmp: str, pg) -> Iterator[Hosts]:
    net = SimNetProcess(short_tmp)
    hosts = Hosts(short_tmp, pg.dsn, net)
    yield hosts
    hosts.cleanup()
    net.stop()


def test_a_company_runs_on_one_host_and_moves_when_that_host_is_killed(cluster):
    for host in ("h1", "h2", "h3"):
        cluster.start(host)
    cluster.daemons["h2"].ctl("start", company="acme")  # any host takes the command
    first = cluster.owner("acme")
    pairings = cluster.net.stats()["pairings"]
    assert pairings == 1
    listed = wait_for(lambda: len(hs := cluster.daemons["h1"].ctl("cluster")["hosts"]) == 3 and hs,
                      what="h1 to see the three hosts")
    assert [h["host_id"] for h in listed] == ["h1", "h2", "h3"] and all(h["state"] == "up" for h in listed)
    assert sum(h["companies"] for h in listed) == 1

    victim = cluster.daemons[first]
    os.kill(victim.proc.pid, signal.SIGKILL)  # the whole host: its workers follow it (PDEATHSIG)
    victim.proc.wait(10)
    second = cluster.owner("acme", timeout=TIMERS["lease_ttl"] + 10, exclude=(first,))
    assert second != first
    stats = cluster.net.stats()
    assert stats["pairings"] == pairings  # its credentials came from PostgreSQL: no new device
    assert stats["replaced"] == 0 and cluster.net.connections().get("acme") == 1


def test_a_frozen_host_loses_its_sessions_before_another_host_claims_them(cluster):
    for host in ("h1", "h2"):
        cluster.start(host)
    cluster.daemons["h1"].ctl("start", company="acme")
    first = cluster.owner("acme")
    frozen = cluster.daemons[first]
    os.kill(frozen.proc.pid, signal.SIGSTOP)  # the supervisor stops; its worker does not
    try:
        # The worker fences itself (its lease deadline passes), then the other host claims the company.
        wait_for(lambda: not cluster.net.connections().get("acme"), timeout=TIMERS["lease_ttl"],
                 what="the frozen host's worker to end its session by itself")
        other = next(h for h in cluster.daemons if h != first)
        wait_for(lambda: cluster.daemons[other].status("acme")["state"] == "connected",
                 timeout=TIMERS["lease_ttl"] + 10, what="the other host to take acme over")
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    # Woken, the old host finds its lease gone and stays away: no fight, no double session.
    wait_for(lambda: frozen.status("acme")["state"] in ("stopped", "stopping"), timeout=10,
             what="the woken host to give acme up")
    assert cluster.net.stats()["replaced"] == 0 and cluster.net.connections().get("acme") == 1
    assert cluster.owners("acme") == [other]


def test_drain_and_move_hand_companies_over_gracefully(cluster):
    for host in ("h1", "h2"):
        cluster.start(host)
    names = [f"c{i}" for i in range(6)]
    for name in names:
        cluster.daemons["h1"].ctl("start", company=name)
    for name in names:
        cluster.owner(name)
    cluster.daemons["h2"].ctl("drain", host="h1")
    wait_for(lambda: all(cluster.owners(n) == ["h2"] for n in names), timeout=30, what="h1 drained")
    cluster.daemons["h2"].ctl("move", company="c0", host="h1")  # a drained host takes nothing
    assert cluster.owners("c0") == ["h2"]
    stats = cluster.net.stats()
    assert stats["replaced"] == 0 and stats["pairings"] == len(names)
    shown = subprocess.run([WAPORTCTL, "--run-dir", cluster.daemons["h2"].run_dir, "cluster"], capture_output=True,
                           text=True, timeout=20)
    assert shown.returncode == 0 and "h1" in shown.stdout and "draining" in shown.stdout
    samples = {(s["name"], tuple(sorted(s["labels"].items()))): s["value"]
               for s in cluster.daemons["h2"].ctl("metrics")["metrics"]}
    assert samples[("waport_leases_owned", ())] == len(names)
    assert samples[("waport_cluster_hosts", (("state", "draining"),))] == 1


def test_a_single_host_says_it_has_no_cluster(daemon_factory):
    d = daemon_factory().start()
    out = subprocess.run([WAPORTCTL, "--run-dir", d.run_dir, "cluster"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 1 and "no cluster" in out.stderr


def test_a_host_stopped_gracefully_hands_its_companies_over_without_waiting_for_the_lease(cluster):
    for host in ("h1", "h2"):
        cluster.start(host)
    cluster.daemons["h2"].ctl("start", company="acme")
    first = cluster.owner("acme")
    other = next(h for h in cluster.daemons if h != first)
    assert cluster.daemons[first].terminate() == 0  # its workers end first, then its leases go back
    # Taken over well before the lease it held could have expired (it was renewed moments before).
    assert cluster.owner("acme", timeout=TIMERS["lease_ttl"] - 1) == other
    listed = cluster.daemons[other].ctl("cluster")["hosts"]
    assert {h["host_id"]: h["state"] for h in listed}[first] == "down"
    assert cluster.net.stats()["replaced"] == 0 and cluster.net.stats()["pairings"] == 1
