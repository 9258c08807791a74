"""Redis end to end (DESIGN.md §6): a real redis-server that the tests stop and start."""

from __future__ import annotations

import base64
import hashlib
import json

from conftest import EventTap, wait_for

from waportd.redis_bridge import INBOX, RedisBridge, flat


def stream(r, name):
    return [fields for _, fields in r.xrange(name)]


def test_flat_fields():
    assert flat({"a": True, "b": None, "c": 1.5, "d": "x"}) == {"a": "1", "b": "", "c": "1.5", "d": "x"}


def test_a_message_sent_again_by_its_worker_is_one_inbox_entry(redis_server):
    """A worker sends an unacknowledged message again every 5 s: while Redis is down (the copy waits in the
    backlog) and after it went in (its ACK was lost). Each copy is answered `added`; waport:inbox has one."""
    redis_server.stop()
    bridge = RedisBridge(redis_server.url, wake=lambda: None)
    bridge.start()
    try:
        entry = {"company": "acme", "id": "WA-1", "text": "hello"}
        for _ in range(3):
            bridge.put_stream(INBOX, entry, token=("acme", "WA-1"))
        redis_server.start()
        results = wait_for(lambda: bridge.take_results() or None, timeout=15, what="the backlog written")
        assert ("added", ("acme", "WA-1")) in results
        bridge.put_stream(INBOX, entry, token=("acme", "WA-1"))  # its ACK went missing: the worker asks again
        assert bridge.take_results() == [("added", ("acme", "WA-1"))]
        bridge.put_stream(INBOX, {**entry, "id": "WA-2"}, token=("acme", "WA-2"))
        wait_for(lambda: len(stream(redis_server.client(), INBOX)) == 2, what="the next message written")
        assert [e["id"] for e in stream(redis_server.client(), INBOX)] == ["WA-1", "WA-2"]
    finally:
        bridge.stop()


def test_session_mirror_inbox_and_events_streams(daemon_factory, simnet, redis_server):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], redis_url=redis_server.url).start()
    d.wait_state("acme", "connected")
    r = redis_server.client()
    mirror = wait_for(lambda: (h := r.hgetall("waport:session:acme")).get("state") == "connected" and h,
                      what="the session mirror")
    assert mirror["company"] == "acme" and mirror["pid"] == str(d.status("acme")["pid"])
    assert 0 < r.ttl("waport:session:acme") <= 120
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="hello", id="WA-1")
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="hello", id="WA-1")  # redelivery
    inbox = wait_for(lambda: stream(r, "waport:inbox"), what="waport:inbox")
    assert inbox == [{"company": "acme", "id": "WA-1", "chat": "15550100001", "from": "15550100001",
                      "push_name": inbox[0]["push_name"], "type": "text", "text": "hello",
                      "ts": inbox[0]["ts"], "is_group": "0"}]
    events = wait_for(lambda: [e for e in stream(r, "waport:events") if e["type"] == "message"], what="events")
    assert json.loads(events[0]["data"])["id"] == "WA-1"
    wait_for(lambda: d.ctl("messages", company="acme")["inbound"][0]["delivered"], what="the ACK to the worker")
    # a photo: its media fields, never its bytes (DESIGN.md §11)
    photo = b"\xff\xd8" + bytes(range(256)) * 10
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, type="image", text="this one",
                media_b64=base64.b64encode(photo).decode(), mimetype="image/jpeg", id="WA-2", reply_to="WA-1")
    entry = wait_for(lambda: len(s := stream(r, "waport:inbox")) == 2 and s[1], what="the photo in waport:inbox")
    digest = hashlib.sha256(photo).hexdigest()
    assert {k: entry[k] for k in ("type", "text", "media_id", "mimetype", "size", "sha256", "media_status",
                                  "reply_to")} == {"type": "image", "text": "this one", "media_id": digest,
                                                   "mimetype": "image/jpeg", "size": str(len(photo)),
                                                   "sha256": digest, "media_status": "stored", "reply_to": "WA-1"}
    assert len(json.dumps(entry)) < 1000


def test_redis_outage_changes_nothing_but_the_fallback(daemon_factory, simnet, redis_server):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], redis_url=redis_server.url,
                       rate_limit_max=3).start()
    pid = d.wait_state("acme", "connected")["pid"]
    r = redis_server.client()
    wait_for(lambda: r.exists("waport:session:acme"), what="the mirror")
    redis_server.stop()
    tap = EventTap(d.run_dir, b"acme.message")
    # sends are accepted and sent; rate limits still hold (in memory)
    ids = [d.ctl("send", company="acme", to="15550109999", text=f"m{i}")["message_id"] for i in range(3)]
    try:
        d.ctl("send", company="acme", to="15550109999", text="m3")
        raise AssertionError("the rate limit did not hold while Redis was down")
    except Exception as exc:  # noqa: BLE001
        assert getattr(exc, "code", None) == "rate_limited"
    wait_for(lambda: {m["id"] for m in simnet.call("sent", company="acme")["messages"]} == set(ids),
             what="sends during the outage")
    # inbound messages reach the events socket at once ...
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, text="during the outage", id="WA-9")
    tap.wait(lambda e: e["data"]["id"] == "WA-9", what="the message event")
    tap.close()
    assert d.status("acme")["state"] == "connected" and d.status("acme")["pid"] == pid
    # ... and reach waport:inbox when Redis is back
    redis_server.start()
    r = redis_server.client()
    inbox = wait_for(lambda: stream(r, "waport:inbox"), timeout=30, what="the inbox to catch up")
    assert [e["id"] for e in inbox] == ["WA-9"]
    wait_for(lambda: r.exists("waport:session:acme"), timeout=40, what="the mirror to come back")
    assert d.status("acme")["pid"] == pid


def test_outbox_stream_end_to_end(daemon_factory, simnet, redis_server):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], redis_url=redis_server.url).start()
    d.wait_state("acme", "connected")
    r = redis_server.client()
    r.xadd("waport:outbox", {"company": "acme", "to": "+1 555 010 9999", "text": "from a producer",
                             "idempotency_key": "order-17"})
    r.xadd("waport:outbox", {"company": "acme", "to": "+1 555 010 9999", "text": "from a producer",
                             "idempotency_key": "order-17"})  # a producer retry
    r.xadd("waport:outbox", {"company": "acme", "to": "12", "text": "bad number", "idempotency_key": "bad-1"})
    r.xadd("waport:outbox", {"company": "nobody", "to": "15550109999", "text": "x"})
    sent = wait_for(lambda: simnet.call("sent", company="acme")["messages"], what="the send")
    results = wait_for(lambda: (x := [e for e in stream(r, "waport:events") if e["type"] == "outbox_result"])
                       and len(x) == 4 and x, what="four outbox results")
    ok = [e for e in results if e["ok"] == "1"]
    assert {e["idempotency_key"] for e in ok} == {"order-17"} and len({e["message_id"] for e in ok}) == 1
    errors = {e["idempotency_key"] if e["idempotency_key"] != "" else "?": e["error"] for e in results
              if e["ok"] == "0"}
    assert "invalid_phone" in errors.values() and "unknown_company" in errors.values()
    sent_event = wait_for(lambda: [e for e in stream(r, "waport:events") if e["type"] == "sent"], what="sent")
    assert json.loads(sent_event[0]["data"])["idempotency_key"] == "order-17"
    assert [m["text"] for m in sent] == ["from a producer"]
    assert r.xpending("waport:outbox", "waportd")["pending"] == 0


def test_outbox_entries_not_in_utf8_are_rejected_and_the_bridge_carries_on(daemon_factory, simnet, redis_server):
    """Malformed input (DESIGN.md §9): a field in another encoding is answered `bad_request`, and the
    Redis thread, which decodes the entry, does not die of it."""
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], redis_url=redis_server.url).start()
    d.wait_state("acme", "connected")
    r = redis_server.client()
    r.xadd("waport:outbox", {"company": "acme", "to": "15550109999", "text": "caf\xe9".encode("latin-1"),
                             "idempotency_key": "latin-1"})
    r.xadd("waport:outbox", {"company": "acme", "to": "15550109999", "text": "café", "idempotency_key": "utf-8"})
    results = wait_for(lambda: (x := [e for e in stream(r, "waport:events") if e["type"] == "outbox_result"])
                       and len(x) == 2 and x, what="two outbox results")
    by_key = {e["idempotency_key"]: e for e in results}
    assert (by_key["latin-1"]["ok"], by_key["latin-1"]["error"]) == ("0", "bad_request")
    assert by_key["utf-8"]["ok"] == "1"
    sent = wait_for(lambda: simnet.call("sent", company="acme")["messages"], what="the send")
    assert [m["text"] for m in sent] == ["café"]
    samples = d.ctl("metrics")["metrics"]
    assert [s["value"] for s in samples if s["name"] == "waport_loop_errors_total"] == [0]
