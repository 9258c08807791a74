"""Retention and erasure of journal messages: `journal_retention` and `waportctl messages purge` (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import EventTap, wait_for

from waportd.retention import MAX_SWEEP_EVERY, sweep_every

WAPORTCTL = os.path.join(os.path.dirname(sys.executable), "waportctl")


def test_the_sweep_runs_four_times_per_retention_at_most_hourly_at_least_every_second():
    assert sweep_every(8) == 2 and sweep_every(0.5) == 1.0
    assert sweep_every(30 * 86400) == MAX_SWEEP_EVERY == 3600


def waportctl(run_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WAPORTCTL, "--run-dir", run_dir, *args], capture_output=True, text=True, timeout=20)


def outbound_texts(d, company: str = "acme") -> list[str]:
    return [m["text"] for m in d.ctl("messages", company=company, limit=100)["outbound"]]


def inbound_texts(d, company: str = "acme") -> list[str]:
    return [m["text"] for m in d.ctl("messages", company=company, limit=100)["inbound"]]


def purged(d, company: str) -> float | None:
    return next((s["value"] for s in d.ctl("metrics")["metrics"]
                 if s["name"] == "waport_messages_purged_total" and s["labels"].get("company") == company), None)


def test_messages_older_than_the_retention_are_erased_and_promised_sends_kept(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], journal_retention="3s").start()
    d.wait_state("acme", "connected")
    tap = EventTap(d.run_dir, b"acme.")
    sent = d.ctl("send", company="acme", to="15550100001", text="your booking is at 10:00")
    simnet.call("inbound", company="acme", **{"from": "15550100002"}, text="can I come at 11?", id="IN-1")
    tap.wait(lambda e: e["type"] == "sent" and e["data"].get("message_id") == sent["message_id"], what="the send")
    tap.wait(lambda e: e["type"] == "message", what="the inbound message")
    wait_for(lambda: inbound_texts(d) and d.ctl("messages", company="acme")["inbound"][0]["delivered"],
             what="the inbound message delivered")
    simnet.call("outage", seconds=60)  # the session is down: a send now is queued, promised
    d.wait_state("acme", "disconnected", "connecting", "backoff")
    queued = d.ctl("send", company="acme", to="15550100003", text="waiting for the session")
    assert queued["status"] == "queued"
    wait_for(lambda: outbound_texts(d) == ["waiting for the session"] and not inbound_texts(d), timeout=20,
             what="the sweep to erase the old messages")
    wait_for(lambda: purged(d, "acme") == 2, what="the purge counted")
    # Long past the retention, the promised send is still there and goes out when the session is back.
    simnet.call("outage", seconds=0)
    wait_for(lambda: "waiting for the session" in [m["text"] for m in simnet.call("sent", company="acme")["messages"]],
             timeout=30, what="the kept send to go out")


def test_an_erasure_request_erases_one_chat_and_nothing_else(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"]).start()
    d.wait_state("acme", "connected")
    for to, text in (("15550100001", "to the asker"), ("15550100002", "to someone else")):
        d.ctl("send", company="acme", to=to, text=text)
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="please forget me", id="IN-1")
    simnet.call("inbound", company="acme", **{"from": "15550100002"}, text="hello", id="IN-2")
    wait_for(lambda: len(inbound_texts(d)) == 2 and all(
        m["delivered"] for m in d.ctl("messages", company="acme")["inbound"]) and all(
        m["status"] == "sent" for m in d.ctl("messages", company="acme")["outbound"]), what="both ways settled")

    refused = waportctl(d.run_dir, "messages", "purge", "acme", "--chat", "+1 555 010 0001")
    assert refused.returncode == 2 and "--yes" in refused.stderr  # no terminal to confirm on: nothing erased
    assert len(outbound_texts(d)) == 2
    bad = waportctl(d.run_dir, "messages", "purge", "acme", "--before", "last tuesday", "--yes")
    assert bad.returncode == 2 and "is not a time" in bad.stderr

    done = waportctl(d.run_dir, "messages", "purge", "acme", "--chat", "+1 555 010 0001", "--yes")
    assert done.returncode == 0, done.stderr
    assert "erased 1 sent and 1 received messages" in done.stdout
    assert outbound_texts(d) == ["to someone else"] and inbound_texts(d) == ["hello"]
    journal = os.path.join(d.state_dir, "sessions", "acme", "journal.db")
    on_disk = b"".join(open(p, "rb").read() for p in (journal, journal + "-wal") if os.path.exists(p))
    assert b"please forget me" not in on_disk and b"to the asker" not in on_disk
    # The listing still works as before, and a purge of everything up to now leaves an empty journal.
    listed = waportctl(d.run_dir, "messages", "acme", "--limit", "5")
    assert listed.returncode == 0 and "to someone else" in listed.stdout
    everything = waportctl(d.run_dir, "--json", "messages", "purge", "acme", "--before", "0d", "--yes")
    assert everything.returncode == 0, everything.stderr
    assert outbound_texts(d) == [] and inbound_texts(d) == []
    unknown = waportctl(d.run_dir, "messages", "purge", "nobody", "--yes")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    assert d.status("acme")["state"] == "connected"
