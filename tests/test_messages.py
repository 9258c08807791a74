"""DESIGN.md §6 end to end: nothing accepted is lost, nothing is sent or delivered twice."""

from __future__ import annotations

import os
import signal
from collections import Counter

from conftest import EventTap, wait_for

from ipc.control import ControlClient
from ipc.errors import WaportError


def settled(d, company: str) -> dict[str, int] | None:
    counts = d.ctl("messages", company=company, limit=1)["counts"]
    return None if counts.get("queued") or counts.get("sending") else counts


def test_kill_9_during_a_burst_of_1000_sends_loses_nothing_and_duplicates_nothing(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], rate_limit_max=100_000,
                       restart_base_delay=0.2).start()
    pid = d.wait_state("acme", "connected")["pid"]
    client = ControlClient(d.run_dir, timeout=10)
    accepted: dict[str, str] = {}
    for i in range(1000):
        if i == 300:
            os.kill(pid, signal.SIGKILL)  # mid-burst: some sends in flight, the rest queue up
        r = client.call("send", company="acme", to=f"1555{i % 50:07d}", text=f"message {i}",
                        idempotency_key=f"burst-{i}")
        assert r["status"] in ("queued", "sent")
        accepted[r["message_id"]] = f"message {i}"
    client.close()
    assert len(accepted) == 1000
    counts = wait_for(lambda: settled(d, "acme"), timeout=120, what="the outbox to drain")
    at_network = Counter(m["id"] for m in simnet.call("sent", company="acme")["messages"])
    duplicates = {mid: n for mid, n in at_network.items() if n > 1}
    uncertain = counts.get("uncertain", 0)
    print(f"\n1000 accepted: {counts.get('sent', 0)} sent, {uncertain} uncertain, "
          f"{len(duplicates)} duplicated at the network")
    assert not duplicates
    assert set(at_network) <= set(accepted)
    assert counts.get("sent", 0) + uncertain == 1000 and not counts.get("send_failed")
    # every message marked sent reached the network exactly once; an uncertain one at most once
    journal = d.ctl("messages", company="acme", limit=1000)["outbound"]
    for m in journal:
        if m["status"] == "sent":
            assert at_network[m["message_id"]] == 1, m
    assert d.status("acme")["restarts"] == 1
    assert simnet.stats()["replaced"] == 0


def test_duplicate_inbound_deliveries_make_one_inbox_entry(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"]).start()
    pid = d.wait_state("acme", "connected")["pid"]
    tap = EventTap(d.run_dir, b"acme.message")
    for _ in range(3):
        simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="is 10:00 free?", id="WA-1")
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="or 11:00?", id="WA-2")
    tap.wait(lambda e: e["data"]["id"] == "WA-2", what="the second message")
    # a restarted worker and a redelivery after it: still one entry, one event
    os.kill(pid, signal.SIGKILL)
    d.wait_state("acme", "connected")
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="is 10:00 free?", id="WA-1")
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="thanks", id="WA-3")
    tap.wait(lambda e: e["data"]["id"] == "WA-3", what="the third message")

    def all_delivered() -> dict:
        # An ACK the killed worker never read is made good by its successor's redelivery (≤ 5 s + a beat).
        found = {m["id"]: m for m in d.ctl("messages", company="acme")["inbound"]}
        return found if len(found) == 3 and all(m["delivered"] for m in found.values()) else {}

    inbound = wait_for(all_delivered, timeout=30, what="every inbound message acknowledged")
    tap.pump(200)
    tap.close()
    assert Counter(e["data"]["id"] for e in tap.seen) == {"WA-1": 1, "WA-2": 1, "WA-3": 1}
    assert set(inbound) == {"WA-1", "WA-2", "WA-3"}
    assert inbound["WA-1"]["copies"] >= 3
    assert inbound["WA-1"]["text"] == "is 10:00 free?" and inbound["WA-1"]["from"] == "15550100001"


def test_the_31st_message_to_one_recipient_is_refused(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], rate_limit_max=30,
                       rate_limit_window=60).start()
    d.wait_state("acme", "connected")
    tap = EventTap(d.run_dir, b"acme.rate_limited")
    for i in range(30):
        d.ctl("send", company="acme", to="15550109999", text=f"m{i}")
    try:
        d.ctl("send", company="acme", to="15550109999", text="one too many")
        raise AssertionError("the 31st message was accepted")
    except WaportError as exc:
        assert exc.code == "rate_limited"
        assert 55_000 <= exc.extra["retry_after_ms"] <= 60_000
    event = tap.wait(lambda e: True, what="rate_limited event")
    tap.close()
    assert event["data"]["to"] == "15550109999" and event["data"]["retry_after_ms"] > 0
    assert d.ctl("send", company="acme", to="15550100000", text="someone else")["status"] == "queued"
    wait_for(lambda: len(simnet.call("sent", company="acme")["messages"]) == 31, what="31 sends")
    # the network holds all 31 a moment before the worker's outcomes reach the journal
    assert wait_for(lambda: settled(d, "acme"), what="the outbox to settle") == {"sent": 31}


def test_sends_queue_while_restarting_and_go_out_after(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], restart_base_delay=3.0).start()
    pid = d.wait_state("acme", "connected")["pid"]
    os.kill(pid, signal.SIGKILL)
    d.wait_state("acme", "backoff")
    r = d.ctl("send", company="acme", to="15550109999", text="while down")
    assert r["status"] == "queued" and d.status("acme")["queued"] >= 1
    wait_for(lambda: [m["id"] for m in simnet.call("sent", company="acme")["messages"]] == [r["message_id"]],
             timeout=20, what="the queued message to go out after the restart")
    wait_for(lambda: d.status("acme")["queued"] == 0, what="queued back to 0")


def test_with_journal_sync_full_every_send_is_answered_and_sent_once(daemon_factory, simnet):
    companies = ["acme", "beta", "gamma"]
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=companies, journal_sync="full",
                       rate_limit_max=100_000).start()
    for c in companies:
        d.wait_state(c, "connected")
    client = ControlClient(d.run_dir, timeout=10)
    ids = {client.call("send", company=companies[i % 3], to="15550109999", text=f"m{i}")["message_id"]
           for i in range(300)}
    client.close()
    assert len(ids) == 300
    for c in companies:
        assert wait_for(lambda c=c: settled(d, c), timeout=60, what=f"{c}'s outbox") == {"sent": 100}
    at_network = Counter(m["id"] for m in simnet.call("sent")["messages"])
    assert set(at_network) == ids and max(at_network.values()) == 1
