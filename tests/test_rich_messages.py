"""DESIGN.md §11 end to end: every send type and inbound media through a real daemon, worker and network."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from typing import Any

import pytest
from conftest import EventTap, wait_for

from ipc.control import ControlClient
from ipc.errors import WaportError
from ipc.mediastore import WIRE_CHUNK, put_args

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(150_000)  # bigger than one wire chunk would need, under one frame


def put(d: Any, data: bytes, mimetype: str, **last: Any) -> dict[str, Any]:
    upload = None
    chunks = [data[i:i + WIRE_CHUNK] for i in range(0, len(data), WIRE_CHUNK)]
    for n, chunk in enumerate(chunks):
        args = put_args(chunk, upload)
        if n == len(chunks) - 1:
            return d.ctl("media_put", **args, last=True, mimetype=mimetype, **last)
        upload = d.ctl("media_put", **args)["upload"]
    raise AssertionError("no data")


def get(d: Any, media_id: str, **scope: Any) -> bytes:
    out = b""
    while True:
        r = d.ctl("media_get", media_id=media_id, offset=len(out), **scope)
        out += base64.b64decode(r["data"])
        if r["eof"]:
            return out


def settled(d: Any, company: str = "acme") -> dict[str, int] | None:
    counts = d.ctl("messages", company=company, limit=1)["counts"]
    return None if counts.get("queued") or counts.get("sending") else counts


def refused(d: Any, **args: Any) -> WaportError:
    with pytest.raises(WaportError) as caught:
        d.ctl("send", company="acme", to="15550109999", **args)
    return caught.value


@pytest.fixture
def connected(daemon_factory, simnet):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], media_max_bytes=4 << 20).start()
    d.wait_state("acme", "connected")
    return d


def test_every_send_type_reaches_the_network_with_its_bytes_checked_by_sha256(connected, simnet) -> None:
    d = connected
    simnet.call("inbound", company="acme", **{"from": "15550109999"}, text="a table for two?", id="WA-IN-1")
    wait_for(lambda: d.ctl("messages", company="acme")["inbound"], what="the inbound message")
    image = put(d, PNG, "image/png")
    audio = put(d, b"OggS" + os.urandom(5000), "audio/ogg")
    video = put(d, os.urandom(3000), "video/mp4")
    doc = put(d, b"%PDF-1.4 " + os.urandom(2 * WIRE_CHUNK), "application/pdf", filename="prices.pdf")
    sends = [
        {"type": "image", "media": image["media_id"], "text": "our menu", "reply_to": "WA-IN-1"},
        {"type": "video", "media": video["media_id"]},
        {"type": "audio", "media": audio["media_id"], "voice": True},
        {"type": "document", "media": doc["media_id"], "filename": "prices.pdf", "text": "this week"},
        {"type": "location", "latitude": 52.52, "longitude": 13.405, "name": "the salon"},
        {"type": "reaction", "message_id": "WA-IN-1", "emoji": "👍"},
        {"text": "yes, at 8", "reply_to": "WA-IN-1"},
    ]
    ids = [d.ctl("send", company="acme", to="+1 555 010 9999", **s)["message_id"] for s in sends]
    assert wait_for(lambda: settled(d), what="every send to settle") == {"sent": len(sends)}
    at_network = {m["id"]: m for m in simnet.call("sent", company="acme")["messages"]}
    img, vid, aud, pdf, loc, react, reply = (at_network[i] for i in ids)
    assert (img["type"], img["text"], img["sha256"], img["size"], img["mimetype"], img["reply_to"]) == (
        "image", "our menu", hashlib.sha256(PNG).hexdigest(), len(PNG), "image/png", "WA-IN-1")
    assert (vid["type"], vid["sha256"], vid["size"]) == ("video", video["sha256"], video["size"])
    assert (aud["type"], aud["voice"], aud["sha256"]) == ("audio", True, audio["sha256"])
    assert (pdf["type"], pdf["filename"], pdf["sha256"], pdf["size"]) == ("document", "prices.pdf", doc["sha256"],
                                                                          doc["size"])
    assert (loc["type"], loc["latitude"], loc["longitude"], loc["name"]) == ("location", 52.52, 13.405, "the salon")
    assert (react["type"], react["reaction_to"], react["emoji"]) == ("reaction", "WA-IN-1", "👍")
    assert (reply["type"], reply["text"], reply["reply_to"]) == ("text", "yes, at 8", "WA-IN-1")
    journal = {m["message_id"]: m for m in d.ctl("messages", company="acme", limit=20)["outbound"]}
    assert journal[ids[0]]["type"] == "image" and journal[ids[0]]["media"] == image["media_id"]
    assert journal[ids[5]]["reaction_to"] == "WA-IN-1" and journal[ids[4]]["latitude"] == 52.52
    # the company sent it: a token scoped to it may read it back
    assert get(d, image["media_id"], company="acme") == PNG


def test_a_reply_to_our_own_sent_message_quotes_the_id_the_network_gave_it(connected, simnet) -> None:
    d = connected
    first = d.ctl("send", company="acme", to="15550109999", text="your booking: 10:00")["message_id"]
    wait_for(lambda: settled(d), what="the first send")
    d.ctl("send", company="acme", to="15550109999", text="see above", reply_to=first)
    d.ctl("send", company="acme", to="15550109999", type="reaction", message_id=first, emoji="✅")
    wait_for(lambda: settled(d) == {"sent": 3}, what="the reply and the reaction")
    sent = simnet.call("sent", company="acme")["messages"]
    assert sent[1]["reply_to"] == first and sent[2]["reaction_to"] == first


def test_bad_sends_get_clear_errors_and_queue_nothing(connected, simnet) -> None:
    d = connected
    too_big = put(d, os.urandom(900_000), "image/jpeg")
    d.write_config(media_max_bytes=500_000)  # a stored file that a later, smaller limit no longer allows
    d.ctl("reload")
    assert refused(d, type="image", media=too_big["media_id"]).code == "media_too_large"
    text_file = put(d, b"just words", "text/plain")
    err = refused(d, type="image", media=text_file["media_id"])
    assert err.code == "bad_request" and "image/*" in err.message
    assert refused(d, type="image", media="0" * 64).code == "not_found"
    err = refused(d, type="reaction", message_id="NO-SUCH-ID", emoji="👍")
    assert err.code == "not_found" and "react" in err.message
    assert refused(d, text="hi", reply_to="NO-SUCH-ID").code == "not_found"
    for lat, lon in ((91, 0), (0, 180.5), ("52", 13), (float("nan"), 0)):
        assert refused(d, type="location", latitude=lat, longitude=lon).code == "bad_request"
    assert refused(d, type="sticker", media=text_file["media_id"]).code == "bad_request"
    assert refused(d, type="audio", media=text_file["media_id"], voice="yes").code == "bad_request"
    assert refused(d, type="location", latitude=1, longitude=2, emoji="x").code == "bad_request"
    assert refused(d, type="reaction", message_id="x", emoji="👍", text="hi").code == "bad_request"
    # a file over the limit never gets into the store
    with pytest.raises(WaportError) as caught:
        put(d, os.urandom(600_000), "image/png")
    assert caught.value.code == "media_too_large"
    assert d.ctl("messages", company="acme")["counts"] == {}
    assert simnet.call("sent", company="acme")["messages"] == []
    assert d.status("acme")["state"] == "connected"


def test_media_sends_queue_while_disconnected_and_go_once_with_an_idempotency_key(connected, simnet) -> None:
    d = connected
    image = put(d, PNG, "image/png")
    simnet.call("outage", seconds=60)  # until both sends are in
    d.wait_state("acme", "disconnected", "connecting")
    first = d.ctl("send", company="acme", to="15550109999", type="image", media=image["media_id"],
                  idempotency_key="menu-1")
    again = d.ctl("send", company="acme", to="15550109999", type="image", media=image["media_id"],
                  idempotency_key="menu-1")
    assert first["status"] == "queued" and again["message_id"] == first["message_id"]
    simnet.call("outage", seconds=0)
    assert wait_for(lambda: settled(d), timeout=20, what="the queued image to go") == {"sent": 1}
    (sent,) = simnet.call("sent", company="acme")["messages"]
    assert sent["sha256"] == image["sha256"] and sent["id"] == first["message_id"]


def test_inbound_media_is_stored_then_published_everywhere_without_its_bytes(connected, simnet) -> None:
    d = connected
    tap = EventTap(d.run_dir, b"acme.message")
    photo = os.urandom(200_000)
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, type="image", text="is this ok?",
                media_b64=base64.b64encode(photo).decode(), mimetype="image/jpeg", id="WA-PHOTO",
                push_name="Ana", reply_to="WA-EARLIER")
    event = tap.wait(lambda e: e["data"]["id"] == "WA-PHOTO", what="the photo message")
    data = event["data"]
    digest = hashlib.sha256(photo).hexdigest()
    assert (data["type"], data["text"], data["reply_to"]) == ("image", "is this ok?", "WA-EARLIER")
    assert data["media"] == {"id": digest, "mimetype": "image/jpeg", "size": len(photo), "sha256": digest,
                             "status": "stored"}
    assert not any(k.startswith("_") for k in data) and "media_b64" not in str(data)
    assert get(d, digest, company="acme") == photo
    with pytest.raises(WaportError) as caught:
        get(d, digest, company="other")  # a company reads only what it sent or received
    assert caught.value.code == "not_found"
    path = os.path.join(d.state_dir, "media", digest[:2], digest)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(d.state_dir, "media")).st_mode) == 0o700
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, type="location", latitude=-33.86,
                longitude=151.2, name="Opera House", id="WA-LOC")
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, type="reaction", emoji="❤️",
                reaction_to="WA-PHOTO", id="WA-REACT")
    loc = tap.wait(lambda e: e["data"]["id"] == "WA-LOC", what="the location")["data"]
    react = tap.wait(lambda e: e["data"]["id"] == "WA-REACT", what="the reaction")["data"]
    tap.close()
    assert (loc["type"], loc["latitude"], loc["longitude"], loc["name"]) == ("location", -33.86, 151.2, "Opera House")
    assert (react["type"], react["reaction_to"], react["emoji"]) == ("reaction", "WA-PHOTO", "❤️")
    listed = {m["id"]: m for m in d.ctl("messages", company="acme")["inbound"]}
    assert listed["WA-PHOTO"]["media"]["status"] == "stored" and "_fetch" not in listed["WA-PHOTO"]


def test_a_large_document_goes_through_a_file_in_chunks(daemon_factory, simnet, short_tmp) -> None:
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"]).start()
    d.wait_state("acme", "connected")
    tap = EventTap(d.run_dir, b"acme.message")
    path = os.path.join(short_tmp, "big.pdf")
    with open(path, "wb") as fh:
        fh.write(os.urandom(5 * (1 << 20) + 123))
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, type="document", media_path=path,
                mimetype="application/pdf", filename="../../etc/contract.pdf", id="WA-DOC")
    media = tap.wait(lambda e: e["data"]["id"] == "WA-DOC", what="the document")["data"]["media"]
    tap.close()
    assert (media["status"], media["sha256"], media["size"]) == ("stored", digest, 5 * (1 << 20) + 123)
    assert media["filename"] == "../../etc/contract.pdf"  # shown as the sender named it, never used as a path
    assert sorted(os.listdir(os.path.join(d.state_dir, "media", digest[:2]))) == [digest, digest + ".json"]
    assert simnet.stats()["downloads"] == 6  # 1 MiB at a time


def test_a_failed_download_still_delivers_the_message_and_media_fetch_tries_again(connected, simnet) -> None:
    d = connected
    tap = EventTap(d.run_dir, b"acme.message")
    simnet.call("media_fault", count=3)  # every attempt of the first download fails
    voice = os.urandom(4000)
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, type="audio",
                media_b64=base64.b64encode(voice).decode(), mimetype="audio/ogg; codecs=opus", id="WA-VOICE")
    media = tap.wait(lambda e: e["data"]["id"] == "WA-VOICE", what="the voice note")["data"]["media"]
    assert media["status"] == "failed" and "unavailable" in media["error"] and media["id"] is None
    result = ControlClient(d.run_dir, timeout=30).call("media_fetch", company="acme", message_id="WA-VOICE")
    assert result["media"]["status"] == "stored" and result["media"]["mimetype"] == "audio/ogg"
    assert get(d, result["media"]["id"]) == voice
    listed = {m["id"]: m for m in d.ctl("messages", company="acme")["inbound"]}
    assert listed["WA-VOICE"]["media"]["status"] == "stored"
    # too large by its announcement: refused before any download
    before = simnet.stats()["downloads"]
    simnet.call("inbound", company="acme", **{"from": "15550100001"}, type="video",
                media_b64=base64.b64encode(b"x" * 100).decode(), mimetype="video/mp4", size=5 << 20, id="WA-HUGE")
    media = tap.wait(lambda e: e["data"]["id"] == "WA-HUGE", what="the huge video")["data"]["media"]
    tap.close()
    assert media["status"] == "failed" and "media_too_large" in media["error"]
    assert simnet.stats()["downloads"] == before
    assert d.status("acme")["state"] == "connected"
