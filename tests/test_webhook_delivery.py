"""Webhooks end to end (DESIGN.md §10): a real daemon, the real delivery process, and a real receiver
(tests/webhook_receiver.py) that checks every request with the `standardwebhooks` reference library."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest
from conftest import ROOT, EventTap, WebhookReceiver, wait_for

from ipc.webhooks import new_secret

pytestmark = pytest.mark.e2e


def webhook_config(receiver: WebhookReceiver, secret: str, **extra: Any) -> dict[str, Any]:
    return {"webhook_url": receiver.url("all"), "webhook_secret": secret, "webhook_retry_scale": 0.01, **extra}


def inbound(net: Any, company: str, msg_id: str, **extra: Any) -> None:
    net.call("inbound", company=company, **{"from": "15550100001"}, text=f"hello {msg_id}", id=msg_id, **extra)


def delivery_pid(d: Any) -> int:
    kids = psutil.Process(d.proc.pid).children()
    return next(c.pid for c in kids if "waportd.webhook_delivery" in " ".join(c.cmdline()))


def test_every_event_signed_in_seq_order_and_counted(daemon_factory, simnet, receiver):
    secret = new_secret()
    receiver.secrets("all", secret)
    d = daemon_factory(sim_endpoint=simnet.endpoint, **webhook_config(receiver, secret)).start()
    d.ctl("start", company="acme")
    d.wait_state("acme", "connected")
    sent = [d.ctl("send", company="acme", to="+15550109999", text=f"m{i}")["message_id"] for i in range(5)]
    for i in range(4):
        inbound(simnet, "acme", f"IN-{i}")
    inbound(simnet, "acme", "IN-4", type="image", media_b64=base64.b64encode(b"\xff\xd8 a photo").decode(),
            mimetype="image/jpeg")  # the §11 media object, never the bytes

    def complete() -> list[dict[str, Any]]:
        got = receiver.delivered("all")
        types = [r["type"] for r in got]
        return got if types.count("message") == 5 and types.count("sent") == 5 and "state" in types else []

    got = wait_for(complete, timeout=20, what="5 message and 5 sent webhooks")
    assert WebhookReceiver.all_valid(got), [r["valid"] for r in got]
    assert [r["seq"] for r in got] == sorted(r["seq"] for r in got)  # in seq order while the endpoint answers
    assert len({r["id"] for r in got}) == len(got) and all(r["id"] == r["event_id"] for r in got)
    assert {r["data"]["id"] for r in got if r["type"] == "message"} == {f"IN-{i}" for i in range(5)}
    assert {r["data"]["message_id"] for r in got if r["type"] == "sent"} == set(sent)
    (photo,) = [r["data"] for r in got if r["type"] == "message" and r["data"]["id"] == "IN-4"]
    assert (photo["type"], photo["media"]["status"], photo["media"]["size"]) == ("image", "stored", 10)
    assert "media_b64" not in json.dumps(photo) and "_fetch" not in photo
    assert ["starting", "connecting"] == [r["data"]["state"] for r in got if r["type"] == "state"][:2]

    listing = wait_for(lambda: (x := d.ctl("webhook_deliveries", company="acme"))["counts"]["pending"] == 0 and x,
                       what="nothing pending")
    assert listing["counts"]["ok"] >= 10
    assert listing["endpoint"]["url"] == receiver.url("all") and "secret" not in listing["endpoint"]

    def ok_counted() -> float:
        return sum(s["value"] for s in d.ctl("metrics")["metrics"] if s["name"] == "waport_webhook_deliveries_total"
                   and s["labels"] == {"company": "acme", "outcome": "ok"})

    wait_for(lambda: ok_counted() >= len(got), what="deliveries in waport_webhook_deliveries_total")


def test_own_endpoint_rotation_410_and_replay(daemon_factory, simnet, receiver):
    d = daemon_factory(sim_endpoint=simnet.endpoint, webhook_retry_scale=0.01).start()
    d.ctl("start", company="acme")
    d.wait_state("acme", "connected")
    with pytest.raises(Exception, match="url"):
        d.ctl("webhook_set", company="acme", url="ftp://nowhere/x")
    first = d.ctl("webhook_set", company="acme", url=receiver.url("acme"), events="message")
    assert first["secret"].startswith("whsec_") and first["created"]
    assert "secret" not in d.ctl("webhook_show", company="acme")
    rotated = d.ctl("webhook_rotate", company="acme")
    receiver.secrets("acme", first["secret"])  # a receiver that has not switched yet still verifies
    inbound(simnet, "acme", "R-1")
    got = wait_for(lambda: receiver.delivered("acme"), what="the message webhook")
    assert got[0]["signatures"] == 2 and WebhookReceiver.all_valid(got) and got[0]["type"] == "message"
    receiver.secrets("acme", rotated["secret"])
    inbound(simnet, "acme", "R-2")
    wait_for(lambda: len(receiver.delivered("acme")) == 2, what="the second message")
    assert WebhookReceiver.all_valid(receiver.delivered("acme")[1:])

    tap = EventTap(d.run_dir, b"acme.webhook_disabled")
    receiver.behave("acme", status=410)
    inbound(simnet, "acme", "R-3")
    tap.wait(lambda e: e["type"] == "webhook_disabled", what="webhook_disabled event")
    tap.close()
    shown = wait_for(lambda: (s := d.ctl("webhook_show", company="acme"))["disabled"] and s, what="disabled")
    assert "410" in shown["disabled"]["reason"]
    tap = EventTap(d.run_dir, b"acme.message")
    inbound(simnet, "acme", "R-4")  # not recorded: the endpoint said it is gone
    tap.wait(lambda e: e["data"]["id"] == "R-4", what="R-4 published while the endpoint is disabled")
    tap.close()
    wait_for(lambda: d.ctl("webhook_deliveries", company="acme")["counts"]["dead"] == 1, what="R-3 dead")

    receiver.behave("acme", status=200)
    again = d.ctl("webhook_set", company="acme", url=receiver.url("acme"), events="message")
    receiver.secrets("acme", again["secret"])
    assert not again["created"] and d.ctl("webhook_show", company="acme")["disabled"] is None
    assert d.ctl("webhook_replay", company="acme", dead=True)["replayed"] == 1
    r3 = wait_for(lambda: [r for r in receiver.delivered("acme") if r["data"]["id"] == "R-3"], what="R-3 replayed")
    assert WebhookReceiver.all_valid(r3)
    assert not [r for r in receiver.received() if r.get("data", {}).get("id") == "R-4"]


def test_500_429_and_a_receiver_down_lose_nothing(daemon_factory, simnet, receiver):
    secret = new_secret()
    receiver.secrets("all", secret)
    # Each failure in a row lengthens the lane's pause (5 s, 30 s, 2 min, ... 2 h): at 0.001 the longest is
    # 7.2 s, whatever number of attempts a slow machine lets through before the receiver comes back.
    d = daemon_factory(sim_endpoint=simnet.endpoint, **webhook_config(receiver, secret, webhook_events="message",
                                                                      webhook_retry_scale=0.001))
    d.start()
    d.ctl("start", company="acme")
    d.wait_state("acme", "connected")
    receiver.behave(status=500)
    for i in range(3):
        inbound(simnet, "acme", f"A-{i}")
    wait_for(lambda: len(receiver.received()) >= 2, what="attempts answered 500")
    listing = wait_for(lambda: (x := d.ctl("webhook_deliveries", company="acme"))["counts"]["pending"] == 3 and
                       any(e["last_status"] == 500 for e in x["events"]) and x, what="pending with last status 500")
    assert all(e["status"] == "pending" for e in listing["events"])

    receiver.behave(status=429, retry_after=1)
    before = len(receiver.received())
    wait_for(lambda: len(receiver.received()) > before, timeout=15, what="an attempt answered 429")
    first_429 = receiver.received()[before]["at"]
    wait_for(lambda: len(receiver.received()) > before + 1, timeout=15, what="the attempt after Retry-After")
    assert receiver.received()[before + 1]["at"] - first_429 >= 0.9  # Retry-After: 1 was honoured

    receiver.stop()
    for i in range(3, 6):
        inbound(simnet, "acme", f"A-{i}")
    wait_for(lambda: any("Connect" in (e["last_error"] or "") for e in
                         d.ctl("webhook_deliveries", company="acme")["events"]), what="connection refused visible")
    receiver.start()
    receiver.secrets("all", secret)
    got = wait_for(lambda: {r["data"]["id"] for r in receiver.delivered("all")} == {f"A-{i}" for i in range(6)}
                   and receiver.delivered("all"), timeout=30, what="all six delivered after the receiver came back")
    assert WebhookReceiver.all_valid(got)


def test_a_hanging_endpoint_delays_no_other_company(daemon_factory, simnet, receiver):
    # the slow endpoint's first request must still be pending when the fast company's five have arrived
    d = daemon_factory(sim_endpoint=simnet.endpoint, webhook_timeout=8, webhook_retry_scale=0.01).start()
    for company in ("slow", "fast"):
        d.ctl("start", company=company)
        d.ctl("webhook_set", company=company, url=receiver.url(company), events="message")
    d.wait_state("slow", "connected")
    d.wait_state("fast", "connected")
    receiver.behave("slow", status=200, delay=20)
    inbound(simnet, "slow", "S-1")
    wait_for(lambda: receiver.received(), what="the slow endpoint's first attempt")
    for i in range(5):
        inbound(simnet, "fast", f"F-{i}")
    assert d.ctl("send", company="slow", to="+15550109999", text="still answered")["status"] == "queued"
    wait_for(lambda: len(receiver.delivered("fast")) == 5, timeout=10, what="the fast company's 5 webhooks")
    attempts_slow = [r for r in receiver.received() if r["path"] == "/hook/slow"]
    assert len(attempts_slow) == 1  # all of that while the slow endpoint still held its first request
    receiver.behave("slow", status=200)
    wait_for(lambda: any(e["last_error"] and "no answer" in e["last_error"]
                         for e in d.ctl("webhook_deliveries", company="slow")["events"]) or
             d.ctl("webhook_deliveries", company="slow")["counts"]["ok"], timeout=15, what="the timeout recorded")
    wait_for(lambda: d.ctl("webhook_deliveries", company="slow")["counts"]["ok"] == 1, timeout=20,
             what="S-1 delivered on a later attempt")


def test_daemon_delivery_and_worker_sigkill_lose_nothing(daemon_factory, simnet, receiver):
    secret = new_secret()
    receiver.secrets("all", secret)
    receiver.behave(status=200, delay=0.05)  # deliveries in flight when the kills land
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme", "beta"],
                       rate_limit_max=1000,
                       **webhook_config(receiver, secret, webhook_events="message,sent,send_failed")).start()
    d.wait_state("acme", "connected")
    d.wait_state("beta", "connected")
    expected, accepted = set(), set()

    def burst(tag: str, n: int = 15) -> None:
        for i in range(n):
            for company in ("acme", "beta"):
                inbound(simnet, company, f"{tag}-{company}-{i}")
                expected.add(f"{tag}-{company}-{i}")
                if d.proc.poll() is None:
                    accepted.add(d.ctl("send", company=company, to="+15550109999", text=f"{tag} {i}")["message_id"])

    burst("a")
    os.kill(delivery_pid(d), signal.SIGKILL)
    burst("b")
    os.kill(d.status("acme")["pid"], signal.SIGKILL)
    burst("c")
    d.kill()
    burst("d")  # the network keeps them until the sessions are back
    d.start()
    burst("e")

    def ids() -> set[str]:
        return {r["data"]["id"] for r in receiver.delivered("all") if r["type"] == "message"}

    wait_for(lambda: ids() == expected, timeout=60, what="every inbound message delivered")

    def outcomes() -> dict[str, str]:
        return {r["data"]["message_id"]: r["type"] for r in receiver.delivered("all") if r["type"] != "message"}

    # Every accepted send ends in a webhook: `sent`, or `send_failed` (reason uncertain) for the few whose
    # worker was killed between the network taking them and the journal saying so (never resent blindly).
    wait_for(lambda: set(outcomes()) == accepted, timeout=60, what="an outcome webhook for every accepted send")
    at_network = {m["id"] for m in simnet.call("sent")["messages"]}
    assert at_network <= accepted
    assert all(mid in at_network for mid, type_ in outcomes().items() if type_ == "sent")
    got = receiver.delivered("all")
    assert WebhookReceiver.all_valid(got)
    by_event: dict[tuple[str, str], set[str]] = {}
    for r in got:
        by_event.setdefault((r["type"], r["data"].get("id") or r["data"]["message_id"]), set()).add(r["id"])
    assert all(len(v) == 1 for v in by_event.values()), "a redelivery carries the same webhook-id"


def test_dead_after_max_age_listed_and_replayable(daemon_factory, simnet, receiver, tmp_path):
    secret = new_secret()
    receiver.secrets("all", secret)
    receiver.behave(status=500)
    d = daemon_factory(sim_endpoint=simnet.endpoint,
                       **webhook_config(receiver, secret, webhook_events="message", webhook_max_age=2)).start()
    d.ctl("start", company="acme")
    d.wait_state("acme", "connected")
    for i in range(3):
        inbound(simnet, "acme", f"D-{i}")
    wait_for(lambda: d.ctl("webhook_deliveries", company="acme")["counts"]["dead"] == 3, timeout=15,
             what="three dead events")
    env = {**os.environ, "WAPORT_RUN_DIR": d.run_dir}
    cli = [os.path.join(os.path.dirname(sys.executable), "waportctl")]
    shown = subprocess.run([*cli, "webhooks", "acme"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert shown.returncode == 0 and "dead 3" in shown.stdout and "webhook_max_age" in shown.stdout, shown
    receiver.behave(status=204)
    replay = subprocess.run([*cli, "webhook", "replay", "acme", "--dead"], capture_output=True, text=True, env=env,
                            cwd=ROOT)
    assert replay.returncode == 0 and "3 events" in replay.stdout, replay
    got = wait_for(lambda: len(receiver.delivered("all")) == 3 and receiver.delivered("all"), what="3 replayed")
    assert WebhookReceiver.all_valid(got) and {r["data"]["id"] for r in got} == {"D-0", "D-1", "D-2"}
    bad = subprocess.run([*cli, "webhook", "set", "acme", "gopher://x"], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert bad.returncode == 1 and "url" in bad.stderr
