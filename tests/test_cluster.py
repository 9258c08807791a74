"""Several hosts on one PostgreSQL (DESIGN.md §12): one owner per company, failover, fencing, drain, move.

Each "host" is a real waportd with its own state and run directories; all share a PostgreSQL server of
the test's own and one standalone simulated network, which sees any double session (`replaced`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import Daemon, EventTap, Netns, SimNetProcess, wait_for
from test_rich_messages import get, put

from ipc.errors import WaportError
from ipc.mediastore import WIRE_CHUNK
from ipc.tokens import TOKENS_FILE, TokenReader, TokenStore

WAPORTCTL = os.path.join(os.path.dirname(sys.executable), "waportctl")
TIMERS = {"lease_ttl": 6.0, "lease_renew_interval": 0.5, "fence_after": 3.0, "heartbeat_interval": 0.5}


class Hosts:
    def __init__(self, base: str, dsn: str, net: SimNetProcess) -> None:
        self.base, self.dsn, self.net = base, dsn, net
        self.daemons: dict[str, Daemon] = {}
        self.frozen: set[str] = set()  # SIGSTOPped: not asked (each call would wait for the client's timeout)

    def start(self, host_id: str, netns: Netns | None = None, **config: object) -> Daemon:
        """A host; in `netns`, it reaches PostgreSQL through that namespace's veth (and the simulated network,
        a unix socket, as every host does)."""
        os.makedirs(os.path.join(self.base, host_id), exist_ok=True)
        dsn = self.dsn if netns is None else self.pg.also_listen(netns.outside)
        d = Daemon(os.path.join(self.base, host_id), cluster_dsn=dsn, host_id=host_id,
                   sim_endpoint=self.net.endpoint, **{**TIMERS, **config})
        if netns is not None:
            d.prefix = netns.prefix
        self.daemons[host_id] = d
        return d.start()

    def epochs(self) -> dict[str, tuple[str, int]]:
        return {c: (owner, epoch) for c, owner, epoch in self.pg.sql("SELECT company, owner, epoch FROM waport_leases")}

    def owners(self, company: str) -> list[str]:
        """The hosts whose own record (not one forwarded from another host) says the company is connected."""
        found = []
        for host_id, d in self.daemons.items():
            if d.proc is None or d.proc.poll() is not None or host_id in self.frozen:
                continue
            try:
                record = d.status(company)
            except Exception:  # noqa: BLE001 - unknown here, or a frozen daemon
                continue
            if record["state"] == "connected" and record.get("host") == host_id:
                found.append(host_id)
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
    hosts.pg = pg
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
    # h1's view is refreshed once a round (lease_renew_interval): the claim of acme may be newer than it.
    listed = wait_for(lambda: len(hs := cluster.daemons["h1"].ctl("cluster")["hosts"]) == 3
                      and sum(h["companies"] for h in hs) == 1 and hs,
                      what="h1 to see the three hosts and acme's lease")
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
    cluster.frozen.add(first)
    try:
        # The worker fences itself (its lease deadline passes), then the other host claims the company.
        wait_for(lambda: not cluster.net.connections().get("acme"), timeout=TIMERS["lease_ttl"],
                 what="the frozen host's worker to end its session by itself")
        other = next(h for h in cluster.daemons if h != first)
        assert cluster.owner("acme", timeout=TIMERS["lease_ttl"] + 10, exclude=(first,)) == other
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        cluster.frozen.discard(first)
    # Woken, the old host finds its lease gone and stays away: no fight, no double session; asked about
    # acme, it answers with the new owner's record.
    wait_for(lambda: frozen.status("acme")["host"] == other, timeout=10, what="the woken host to give acme up")
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
    # Claimed well before the lease it held could have expired (it was renewed moments before); then
    # connected there (a first worker's spawn and connect on a slow machine are not the lease's business).
    wait_for(lambda: cluster.epochs()["acme"][0] == other, timeout=TIMERS["lease_ttl"] - 1,
             what=f"{other} to claim acme")
    assert cluster.owner("acme") == other
    # It said so itself before it exited (after handing its leases back: `other` may have claimed acme in a
    # round between the two); `other` sees it at its next round, well before silence alone would say down.
    assert cluster.pg.sql("SELECT state FROM waport_hosts WHERE host_id = %s", first) == [("down",)]
    wait_for(lambda: {h["host_id"]: h["state"] for h in cluster.daemons[other].ctl("cluster")["hosts"]}[first]
             == "down", timeout=2 * TIMERS["lease_renew_interval"] + 1, what=f"{other} to list {first} down")
    assert cluster.net.stats()["replaced"] == 0 and cluster.net.stats()["pairings"] == 1


def test_any_host_answers_commands_and_streams_events_for_the_whole_cluster(cluster):
    h1, h2 = cluster.start("h1"), cluster.start("h2")
    names = ["acme", "beta", "gamma", "delta"]
    for name in names:
        h2.ctl("start", company=name)
    owners = {name: cluster.owner(name) for name in names}
    away = {d: next((n for n in names if owners[n] != d), None) for d in ("h1", "h2")}
    assert all(away.values()), f"placement put everything on one host: {owners}"  # rendezvous over 2 hosts

    for asker in (h1, h2):  # each host lists the whole cluster, each record from its owner
        listed = wait_for(lambda a=asker: len(s := a.ctl("list")["sessions"]) == len(names) and s,
                          what="the whole cluster listed")
        assert [(r["company"], r["state"], r["host"]) for r in listed] == [
            (n, "connected", owners[n]) for n in sorted(names)]
        assert "unanswered" not in asker.ctl("list")
    shown = subprocess.run([WAPORTCTL, "--run-dir", h1.run_dir, "list"], capture_output=True, text=True, timeout=20)
    lines = shown.stdout.splitlines()
    assert shown.returncode == 0 and lines[0].split()[:3] == ["COMPANY", "STATE", "HOST"]
    assert sorted(line.split()[:3] for line in lines[1:]) == [[n, "connected", owners[n]] for n in sorted(names)]

    asker, company = h1, away["h1"]  # h1 asked about a company h2 runs
    taps = {h: EventTap(d.run_dir, prefix=company.encode()) for h, d in cluster.daemons.items()}
    record = asker.status(company)
    assert record["host"] == owners[company] and record["state"] == "connected" and record["pid"]
    sent = asker.ctl("send", company=company, to="15550100001", text="forwarded", idempotency_key="k1")
    again = asker.ctl("send", company=company, to="15550100001", text="forwarded", idempotency_key="k1")
    assert again["message_id"] == sent["message_id"]  # answered by the owner's journal both times
    for tap in taps.values():  # the owner's `sent` event, on both hosts' sockets
        tap.wait(lambda e: e["type"] == "sent" and e["data"].get("message_id") == sent["message_id"],
                 what="the sent event")
    cluster.net.call("inbound", company=company, **{"from": "15550100009"}, text="hello there")
    for tap in taps.values():
        tap.wait(lambda e: e["type"] == "message" and e["data"].get("text") == "hello there", what="the inbound")
    for tap in taps.values():
        assert sum(e["type"] == "sent" for e in tap.seen) == 1  # relayed once, never echoed back
        tap.close()
    shown = asker.ctl("messages", company=company)
    assert [m["message_id"] for m in shown["outbound"]] == [sent["message_id"]]
    assert [m["text"] for m in cluster.net.call("sent", company=company)["messages"]] == ["forwarded"]

    # Bundles are for single hosts; unknown companies stay unknown.
    out = subprocess.run([WAPORTCTL, "--run-dir", asker.run_dir, "export", company, "--output",
                          os.path.join(cluster.base, "x.bundle")], capture_output=True, text=True, timeout=20)
    assert out.returncode == 1 and "pg_dump" in out.stderr
    with pytest.raises(WaportError) as unknown:
        asker.status("nobody")
    assert unknown.value.code == "unknown_company"
    assert cluster.net.stats()["replaced"] == 0


def test_sends_accepted_before_a_host_dies_are_sent_by_the_next_owner_once(cluster):
    h1 = cluster.start("h1")
    cluster.start("h2")
    h1.ctl("start", company="acme")
    first = cluster.owner("acme")
    other = next(h for h in cluster.daemons if h != first)
    asker = cluster.daemons[other]  # the sends go through the host that will survive, to the owner
    cluster.net.call("outage", seconds=TIMERS["lease_ttl"] + 2)  # nothing can go out for now
    wait_for(lambda: asker.status("acme")["state"] != "connected", what="acme cut off")
    ids = [asker.ctl("send", company="acme", to="15550100001", text=f"booking {i}", idempotency_key=f"b{i}")
           ["message_id"] for i in range(5)]
    assert cluster.pg.sql("SELECT count(*) FROM waport_outbox WHERE company = 'acme' AND status = 'queued'") == [(5,)]
    victim = cluster.daemons[first]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    assert cluster.owner("acme", timeout=TIMERS["lease_ttl"] + 15, exclude=(first,)) == other
    wait_for(lambda: sorted(m["message_id"] for m in asker.ctl("messages", company="acme")["outbound"]
                            if m["status"] == "sent") == sorted(ids), timeout=20, what="the five sends sent")
    texts = [m["text"] for m in cluster.net.call("sent", company="acme")["messages"]]
    assert sorted(texts) == [f"booking {i}" for i in range(5)]  # each once, none lost
    epochs = cluster.pg.sql("SELECT DISTINCT epoch FROM waport_outbox WHERE company = 'acme'")
    assert len(epochs) == 1 and epochs[0][0] >= 2  # taken by the new owner's epoch
    assert cluster.net.stats()["replaced"] == 0 and cluster.net.stats()["pairings"] == 1


def test_api_tokens_work_on_every_host_and_a_revocation_reaches_every_host(cluster):
    # h2 ran alone before it joined: a token of its own, which the cluster keeps
    state = os.path.join(cluster.base, "h2", "state")
    os.makedirs(state, mode=0o700)
    own = TokenStore()
    early, early_token = own.create(None, None, time.time())
    own.save(os.path.join(state, TOKENS_FILE))
    h1, h2 = cluster.start("h1"), cluster.start("h2")
    readers = {h: TokenReader(os.path.join(d.state_dir, TOKENS_FILE)) for h, d in cluster.daemons.items()}

    made = h1.ctl("token_create", company="acme")  # through h1, checked by h2's API's token check
    wait_for(lambda: readers["h2"].verify(made["token"], time.time()), timeout=10, what="h1's token on h2")
    wait_for(lambda: readers["h1"].verify(early_token, time.time()), timeout=10, what="h2's own token on h1")
    assert readers["h2"].verify(early_token, time.time()) == early
    for d in (h1, h2):
        assert {t["id"]: t["state"] for t in d.ctl("token_list")["tokens"]} == {made["id"]: "active",
                                                                               early.id: "active"}
    rows = cluster.pg.sql("SELECT record FROM waport_tokens")
    assert len(rows) == 2 and made["token"] not in repr(rows) and early_token not in repr(rows)

    h2.ctl("token_revoke", id=made["id"])  # through h2: h1 stops it within a round or two
    assert readers["h2"].verify(made["token"], time.time()) is None
    wait_for(lambda: readers["h1"].verify(made["token"], time.time()) is None,
             timeout=4 * TIMERS["lease_renew_interval"] + 3, what="the revocation on h1")
    assert readers["h1"].verify(early_token, time.time()) == early
    assert "wp_" not in h1.logs() + h2.logs()


@pytest.mark.pg_server
def test_a_host_cut_from_postgresql_fences_itself_and_nothing_moves_back_after_the_heal(cluster, netns):
    ns = netns()
    h1 = cluster.start("h1", netns=ns)
    names = [f"c{i}" for i in range(4)]
    for name in names:
        h1.ctl("start", company=name)
    for name in names:
        assert cluster.owner(name) == "h1"
    h2 = cluster.start("h2")
    wait_for(lambda: len(h2.ctl("cluster")["hosts"]) == 2, what="h2 in the cluster")
    assert {c: owner for c, (owner, _) in cluster.epochs().items()} == dict.fromkeys(names, "h1")  # sticky

    ns.cut()  # h1 reaches the simulated network still, PostgreSQL no more: the dangerous case
    # Polled fast (the database and the network only: a host asked about a company whose owner is cut off
    # answers once that host is seen gone, seconds later), each look with the leases' owners at that moment.
    seen: list[tuple[dict[str, int], set[str]]] = []

    def fenced_then_moved() -> bool:
        seen.append((cluster.net.connections(), {owner for owner, _ in cluster.epochs().values()}))
        connections, owners = seen[-1]
        return owners == {"h2"} and all(connections.get(n) for n in names)

    wait_for(fenced_then_moved, timeout=TIMERS["lease_ttl"] + 15, interval=0.05, what="h2 runs every company")
    assert max(max(c.values(), default=0) for c, _ in seen) <= 1, "two live connections for one company"
    assert any(not any(c.get(n) for n in names) and owners == {"h1"} for c, owners in seen), \
        "h2 claimed before h1's sessions had ended"
    for name in names:
        assert cluster.owner(name) == "h2"
    moved = cluster.epochs()
    assert {owner for owner, _ in moved.values()} == {"h2"}

    ns.heal()
    # h1 beats again and learns it holds nothing; three more of its rounds must not take anything back.
    beat = wait_for(lambda: next(h["heartbeat_age"] for h in h2.ctl("cluster")["hosts"] if h["host_id"] == "h1")
                    < TIMERS["lease_renew_interval"] * 2 and cluster.pg.sql(
                        "SELECT heartbeat_at FROM waport_hosts WHERE host_id = 'h1'")[0][0],
                    timeout=20, what="h1 back in the cluster")
    wait_for(lambda: (cluster.pg.sql("SELECT heartbeat_at FROM waport_hosts WHERE host_id = 'h1'")[0][0] - beat)
             .total_seconds() >= 3 * TIMERS["lease_renew_interval"], timeout=10, what="three rounds of h1")
    assert cluster.epochs() == moved
    stats = cluster.net.stats()
    assert stats["replaced"] == 0 and stats["pairings"] == len(names)
    assert all(h1.status(n)["host"] == "h2" for n in names)  # h1 answers again, from the owner


@pytest.mark.pg_server
def test_postgresql_restarting_for_a_moment_stops_no_session(cluster):
    timers = {"lease_ttl": 20.0, "fence_after": 15.0}  # room for a restart on a slow machine
    h1 = cluster.start("h1", **timers)
    cluster.start("h2", **timers)
    names = ["acme", "beta", "gamma"]
    for name in names:
        h1.ctl("start", company=name)
    owners = {n: cluster.owner(n) for n in names}
    before, connects = cluster.epochs(), cluster.net.stats()["connects"]
    cluster.pg.stop()
    cluster.pg.start()
    asker = cluster.daemons["h2"]
    # a try that timed out may still have been queued: the key makes the next one the same send
    wait_for(lambda: asker.ctl("send", company="acme", to="15550100001", text="after the restart",
                               idempotency_key="after-restart"), timeout=15, what="a send after the restart")
    wait_for(lambda: [m["text"] for m in cluster.net.call("sent", company="acme")["messages"]]
             == ["after the restart"], timeout=15, what="the send sent")
    assert cluster.epochs() == before and {n: cluster.owner(n) for n in names} == owners
    stats = cluster.net.stats()
    assert stats["replaced"] == 0 and stats["connects"] == connects  # no session ended, none started again


def test_a_company_s_webhook_endpoint_and_undelivered_events_move_with_it(cluster, receiver):
    for host in ("h1", "h2"):
        cluster.start(host, webhook_retry_scale=0.01)
    cluster.daemons["h1"].ctl("start", company="acme")
    first = cluster.owner("acme")
    other = next(h for h in cluster.daemons if h != first)
    asker = cluster.daemons[other]  # set through the host that will survive: the owner stores it
    hook = asker.ctl("webhook_set", company="acme", url=receiver.url("acme"), events="message")
    receiver.secrets("acme", hook["secret"])

    def texts() -> list[tuple[int, str]]:
        return sorted((r["seq"], r["data"]["text"]) for r in receiver.delivered("acme"))

    cluster.net.call("inbound", company="acme", **{"from": "15550100009"}, text="one")
    wait_for(lambda: texts() == [(1, "one")], what="the first event delivered by the owner")
    receiver.behave("acme", status=503)  # the endpoint is down when the owner dies
    cluster.net.call("inbound", company="acme", **{"from": "15550100009"}, text="two")
    wait_for(lambda: any(r.get("seq") == 2 for r in receiver.received()), what="the second event tried once")
    victim = cluster.daemons[first]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    receiver.behave("acme", status=204)
    assert cluster.owner("acme", timeout=TIMERS["lease_ttl"] + 15, exclude=(first,)) == other
    wait_for(lambda: texts() == [(1, "one"), (2, "two")], timeout=20,
             what="the event the dead host could not deliver, delivered by the next owner")
    cluster.net.call("inbound", company="acme", **{"from": "15550100009"}, text="three")
    wait_for(lambda: texts() == [(1, "one"), (2, "two"), (3, "three")], what="the seq counting on")
    assert receiver.all_valid(receiver.received())  # the same secret signs on the new owner
    assert asker.ctl("webhook_show", company="acme")["url"] == receiver.url("acme")
    wait_for(lambda: asker.ctl("webhook_deliveries", company="acme")["counts"] == {"ok": 3, "pending": 0, "dead": 0},
             what="the three recorded as delivered")
    assert cluster.pg.sql("SELECT seq, host FROM waport_webhook_events ORDER BY seq") == [
        (1, first), (2, first), (3, other)]


def test_media_stored_through_one_host_is_sent_and_read_from_the_next_owner_after_a_kill(cluster):
    """The media store is in PostgreSQL: an upload (in chunks, through the owner) and an inbound file the
    owner's worker downloaded are both there for the next owner once the first host is gone, disk and all."""
    for host in ("h1", "h2"):
        cluster.start(host)
    cluster.daemons["h1"].ctl("start", company="acme")
    first = cluster.owner("acme")
    other = next(h for h in cluster.daemons if h != first)
    owner, survivor = cluster.daemons[first], cluster.daemons[other]
    menu = os.urandom(2 * (1 << 20) + 77)  # three media_put chunks and three store chunks
    uploaded = put(owner, menu, "application/pdf", company="acme", filename="menu.pdf")
    photo = os.urandom(300_000)
    tap = EventTap(owner.run_dir, prefix=b"acme.message")
    cluster.net.call("inbound", company="acme", **{"from": "15550100001"}, type="image",
                     media_b64=base64.b64encode(photo).decode(), mimetype="image/jpeg", id="WA-PHOTO")
    inbound = tap.wait(lambda e: e["data"]["id"] == "WA-PHOTO", what="the photo stored")["data"]["media"]
    tap.close()
    assert inbound["status"] == "stored" and inbound["sha256"] == hashlib.sha256(photo).hexdigest()
    assert cluster.pg.sql("SELECT count(*) FROM waport_media") == [(2,)]
    assert not os.path.exists(os.path.join(survivor.state_dir, "media", uploaded["media_id"][:2], uploaded["media_id"]))
    # an upload in chunks through a host that does not run the company: every chunk is taken there (none
    # forwarded), and the owner reads it at once
    logo = os.urandom(WIRE_CHUNK + 1)
    elsewhere = put(survivor, logo, "image/png", company="acme")
    assert get(owner, elsewhere["media_id"], company="acme") == logo

    os.kill(owner.proc.pid, signal.SIGKILL)  # its disk is as good as gone: the survivor never reads it
    owner.proc.wait(10)
    assert cluster.owner("acme", timeout=TIMERS["lease_ttl"] + 15, exclude=(first,)) == other
    assert get(survivor, inbound["id"], company="acme") == photo  # straight from PostgreSQL
    sent = survivor.ctl("send", company="acme", to="15550109999", type="document", media=uploaded["media_id"],
                        idempotency_key="menu")
    wait_for(lambda: [m["status"] for m in survivor.ctl("messages", company="acme")["outbound"]
                      if m["message_id"] == sent["message_id"]] == ["sent"], timeout=20, what="the menu sent")
    (out,) = cluster.net.call("sent", company="acme")["messages"]
    assert (out["sha256"], out["size"]) == (uploaded["sha256"], len(menu))
    # the new owner's worker brought the file into its host's cache to send it
    with open(os.path.join(survivor.state_dir, "media", uploaded["media_id"][:2], uploaded["media_id"]), "rb") as fh:
        assert fh.read() == menu
