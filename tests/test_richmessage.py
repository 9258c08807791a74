"""ipc/richmessage.py: what each `send` type takes (DESIGN.md §11), checked without a process."""

from __future__ import annotations

import math

import pytest

from ipc.errors import WaportError
from ipc.mediastore import MediaInfo
from ipc.richmessage import SendSpec, check_media, inbound_media, parse_send

MEDIA = "ab" * 32


def code_of(args: dict) -> str:
    with pytest.raises(WaportError) as caught:
        parse_send(args)
    return caught.value.code


def test_text_is_the_default_type_and_needs_its_text() -> None:
    assert parse_send({"text": "hi"}) == SendSpec("text", "hi", {})
    assert code_of({}) == "bad_request"
    assert code_of({"text": "x" * 70_000}) == "message_too_long"
    assert parse_send({"text": "hi", "reply_to": "WA-1"}).references == ["WA-1"]


def test_media_types_take_a_media_id_an_optional_caption_and_their_own_fields() -> None:
    spec = parse_send({"type": "document", "media": MEDIA, "text": "prices", "filename": "p.pdf"})
    assert (spec.type, spec.text, spec.fields) == ("document", "prices", {"media": MEDIA, "filename": "p.pdf"})
    assert parse_send({"type": "audio", "media": MEDIA, "voice": True}).fields == {"media": MEDIA, "voice": True}
    assert parse_send({"type": "image", "media": MEDIA}).text == ""
    assert code_of({"type": "image"}) == "bad_request"
    assert code_of({"type": "image", "media": "../../etc/passwd"}) == "bad_request"
    assert code_of({"type": "image", "media": MEDIA, "voice": True}) == "bad_request"
    assert code_of({"type": "audio", "media": MEDIA, "voice": "yes"}) == "bad_request"
    assert code_of({"type": "video", "media": MEDIA, "filename": ""}) == "bad_request"


def test_location_needs_coordinates_in_range() -> None:
    spec = parse_send({"type": "location", "latitude": -33.86, "longitude": 151.2, "name": "Opera"})
    assert spec.fields == {"latitude": -33.86, "longitude": 151.2, "name": "Opera"} and spec.text == "Opera"
    for lat, lon in ((90.01, 0), (0, -180.01), (math.inf, 0), (True, 0), ("1", 2), (None, 2)):
        assert code_of({"type": "location", "latitude": lat, "longitude": lon}) == "bad_request"
    assert parse_send({"type": "location", "latitude": 90, "longitude": -180}).fields["longitude"] == -180.0


def test_a_reaction_names_its_message_and_an_emoji_which_may_be_empty() -> None:
    spec = parse_send({"type": "reaction", "message_id": "WA-1", "emoji": "👍🏽"})
    assert spec.fields == {"reaction_to": "WA-1", "emoji": "👍🏽"} and spec.references == ["WA-1"]
    assert parse_send({"type": "reaction", "message_id": "WA-1", "emoji": ""}).fields["emoji"] == ""
    assert code_of({"type": "reaction", "emoji": "👍"}) == "bad_request"
    assert code_of({"type": "reaction", "message_id": "WA-1", "emoji": "x" * 17}) == "bad_request"
    assert code_of({"type": "reaction", "message_id": "WA-1", "emoji": "👍", "text": "and words"}) == "bad_request"


def test_fields_of_another_type_and_unknown_types_are_refused() -> None:
    assert code_of({"type": "text", "text": "hi", "media": MEDIA}) == "bad_request"
    assert code_of({"type": "location", "latitude": 1, "longitude": 1, "emoji": "x"}) == "bad_request"
    assert code_of({"type": "sticker", "media": MEDIA}) == "bad_request"
    assert code_of({"text": "hi", "reply_to": ""}) == "bad_request"


def test_the_stored_file_must_exist_fit_the_limit_and_the_type() -> None:
    spec = parse_send({"type": "image", "media": MEDIA})
    jpeg = MediaInfo(MEDIA, 1000, "image/jpeg", "a.jpg")
    assert check_media(spec, jpeg, 10_000) == {"media": MEDIA, "mimetype": "image/jpeg", "size": 1000}
    for info, limit, code in ((None, 10_000, "not_found"), (jpeg, 999, "media_too_large"),
                              (MediaInfo(MEDIA, 10, "application/pdf"), 10_000, "bad_request")):
        with pytest.raises(WaportError) as caught:
            check_media(spec, info, limit)
        assert caught.value.code == code
    doc = check_media(parse_send({"type": "document", "media": MEDIA}), MediaInfo(MEDIA, 10, "text/csv", "a.csv"), 99)
    assert doc["filename"] == "a.csv"  # a document keeps the name it was stored under


def test_the_inbound_media_object_is_stored_or_failed_with_why() -> None:
    announced = {"mimetype": "image/jpeg", "size": 5, "sha256": "ff", "filename": "x.jpg"}
    stored = inbound_media(MediaInfo(MEDIA, 5, "image/jpeg"), announced)
    assert stored == {"id": MEDIA, "mimetype": "image/jpeg", "size": 5, "sha256": MEDIA, "filename": "x.jpg",
                      "status": "stored"}
    failed = inbound_media(None, announced, "timeout: slow")
    assert (failed["status"], failed["id"], failed["error"], failed["sha256"]) == (
        "failed", None, "timeout: slow", "ff")
