"""ipc/webhooks.py: secrets, signatures (checked by the Standard Webhooks reference library), schedule, verdicts."""

from __future__ import annotations

import base64
import random
import time
from email.utils import formatdate

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from ipc import webhooks as wh
from ipc.errors import WaportError


def headers(secrets: list[str], msg_id: str, body: bytes, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    keys = [wh.secret_key(s) for s in secrets]
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": wh.sign(keys, msg_id, ts, body)}


def test_a_new_secret_is_whsec_and_32_random_bytes() -> None:
    a, b = wh.new_secret(), wh.new_secret()
    assert a.startswith("whsec_") and a != b
    assert len(wh.secret_key(a)) == 32


def test_the_reference_library_accepts_our_signature_and_refuses_a_changed_body() -> None:
    secret = wh.new_secret()
    body = b'{"type":"message","company":"acme","id":"evt_1","seq":1}'
    h = headers([secret], "evt_1", body)
    Webhook(secret).verify(body, h)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"acme", b"acne"), h)
    with pytest.raises(WebhookVerificationError):
        Webhook(wh.new_secret()).verify(body, h)


def test_after_a_rotation_both_secrets_verify() -> None:
    old, new = wh.new_secret(), wh.new_secret()
    body = b"{}"
    h = headers([new, old], "evt_2", body)
    assert h["webhook-signature"].count("v1,") == 2
    Webhook(old).verify(body, h)
    Webhook(new).verify(body, h)


@pytest.mark.parametrize("bad", ["", "secret", "whsec_", "whsec_!!!notbase64",
                                 "whsec_" + base64.b64encode(b"x" * 10).decode(),
                                 "whsec_" + base64.b64encode(b"x" * 65).decode(), 42])
def test_a_malformed_secret_is_refused_with_the_key_named(bad: object) -> None:
    with pytest.raises(WaportError) as err:
        wh.secret_key(bad, "webhook_secret")  # type: ignore[arg-type]
    assert err.value.code == "bad_request" and "webhook_secret" in err.value.message


@pytest.mark.parametrize("bad", ["ftp://example.com/x", "http://", "example.com/hook", "http://a b/", "", None,
                                 "javascript:alert(1)", "http://host:port/", "https://" + "a" * 2100])
def test_only_http_and_https_urls_with_a_host(bad: object) -> None:
    with pytest.raises(WaportError) as err:
        wh.validate_url(bad, "webhook_url")
    assert "webhook_url" in err.value.message


def test_good_urls_pass_unchanged() -> None:
    for url in ("http://127.0.0.1:8080/hook", "https://hooks.example.com/w?x=1", "http://[::1]:9/h"):
        assert wh.validate_url(url) == url


def test_events_default_and_unknown_types_named() -> None:
    assert wh.validate_events(None) == wh.DEFAULT_EVENTS
    assert wh.validate_events("message, sent,message") == ("message", "sent")
    with pytest.raises(WaportError, match="'mesage'"):
        wh.validate_events(["mesage"])


def test_schedule_about_5s_30s_2min_then_every_2h() -> None:
    rng = random.Random(1)
    for failures, base in [(1, 5), (2, 30), (3, 120), (4, 600), (5, 1800), (6, 3600), (7, 7200), (30, 7200)]:
        d = wh.retry_delay(failures, rng)
        assert base * 0.9 <= d <= base * 1.1


def test_verdicts() -> None:
    assert wh.judge(200).outcome == wh.judge(204).outcome == wh.OK
    gone = wh.judge(410)
    assert gone.outcome == wh.DISABLED
    busy = wh.judge(429, "7")
    assert (busy.outcome, busy.endpoint_trouble, busy.retry_after) == (wh.RETRY, True, 7.0)
    assert wh.judge(503, None).retry_after is None
    assert wh.judge(500).endpoint_trouble and wh.judge(None).endpoint_trouble and wh.judge(302).endpoint_trouble
    bad_event = wh.judge(400)
    assert bad_event.outcome == wh.RETRY and not bad_event.endpoint_trouble  # the next events still go out


def test_retry_after_seconds_or_http_date() -> None:
    now = time.time()
    assert wh.parse_retry_after("120") == 120
    assert 59 <= wh.parse_retry_after(formatdate(now + 60, usegmt=True), now) <= 61
    assert wh.parse_retry_after(formatdate(now - 60, usegmt=True), now) == 0
    assert wh.parse_retry_after("soon") is None and wh.parse_retry_after(None) is None
    assert wh.parse_retry_after("1e12") == 24 * 3600  # capped


def test_ids_are_stable_for_the_same_message_and_fresh_otherwise() -> None:
    a = wh.event_id("acme", "message", {"id": "WA1"})
    assert a == wh.event_id("acme", "message", {"id": "WA1"}) and a.startswith("evt_")
    assert a != wh.event_id("beta", "message", {"id": "WA1"}) != wh.event_id("acme", "sent", {"message_id": "WA1"})
    assert wh.event_id("acme", "state", {"state": "connected"}) != wh.event_id("acme", "state", {"state": "connected"})


def test_latency_buckets_are_upper_bounds() -> None:
    assert wh.bucket_of(0.0) == 0 and wh.bucket_of(0.005) == 0 and wh.bucket_of(0.006) == 1
    assert wh.bucket_of(1e9) == len(wh.LATENCY_BUCKETS)  # +Inf
