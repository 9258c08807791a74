"""The one inbound normalization (workers/inbound.py): phones from JIDs, text from message kinds,
timestamps, groups, own messages and protocol traffic — with WhatsApp's real protobufs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from workers.inbound import (
    epoch_seconds,
    media_handle,
    media_info,
    message_content,
    message_extras,
    normalize_message,
    phone_from_jid,
)

E2E = pytest.importorskip("neonize.proto.waE2E.WAWebProtobufsE2E_pb2")
NZ = pytest.importorskip("neonize.proto.Neonize_pb2")
KEY = pytest.importorskip("neonize.proto.waCommon.WACommon_pb2").MessageKey
Message = E2E.Message


@pytest.mark.parametrize(
    ("jid", "expected"),
    [
        ("15551234567@s.whatsapp.net", "15551234567"),
        ("15551234567:12@s.whatsapp.net", "15551234567"),
        ("15551234567.0:3@s.whatsapp.net", "15551234567"),
        ("15551234567@c.us", "15551234567"),
        ("120363025246125486@g.us", "120363025246125486@g.us"),
        ("987654321098765:4@lid", "987654321098765@lid"),
        ("status@broadcast", "status@broadcast"),
        ("15551234567", "15551234567"),
        ("", ""),
        (None, ""),
    ],
)
def test_phone_from_jid_strings(jid: str | None, expected: str) -> None:
    assert phone_from_jid(jid) == expected


def test_phone_from_jid_protobufs() -> None:
    assert phone_from_jid(NZ.JID(User="15551234567", Server="s.whatsapp.net", Device=7)) == "15551234567"
    assert phone_from_jid(NZ.JID(User="1203630", Server="g.us")) == "1203630@g.us"
    assert phone_from_jid(NZ.JID(User="42", Server="lid")) == "42@lid"
    assert phone_from_jid(NZ.JID()) == ""


def test_timestamps_are_epoch_seconds() -> None:
    assert epoch_seconds(1_700_000_000_123) == pytest.approx(1_700_000_000.123)  # neonize: milliseconds
    assert epoch_seconds(1_700_000_000) == 1_700_000_000.0  # seconds stay seconds
    assert epoch_seconds(1_700_000_000.5) == 1_700_000_000.5
    before = time.time()
    for missing in (None, 0, -5, "soon", True):
        assert before <= epoch_seconds(missing) <= time.time()


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (Message(conversation="hi"), ("text", "hi")),
        (Message(extendedTextMessage=E2E.ExtendedTextMessage(text="see https://x.y")), ("text", "see https://x.y")),
        (Message(imageMessage=E2E.ImageMessage(caption="look", mimetype="image/jpeg")), ("image", "look")),
        (Message(imageMessage=E2E.ImageMessage(mimetype="image/jpeg")), ("image", "")),
        (Message(videoMessage=E2E.VideoMessage(caption="clip")), ("video", "clip")),
        (Message(audioMessage=E2E.AudioMessage(PTT=True, seconds=3)), ("audio", "")),
        (Message(documentMessage=E2E.DocumentMessage(fileName="invoice.pdf")), ("document", "invoice.pdf")),
        (Message(documentMessage=E2E.DocumentMessage(fileName="a.pdf", caption="the bill")), ("document", "the bill")),
        (Message(stickerMessage=E2E.StickerMessage(mimetype="image/webp")), ("sticker", "")),
        (Message(locationMessage=E2E.LocationMessage(degreesLatitude=52.5, degreesLongitude=13.4)),
         ("location", "52.5,13.4")),
        (Message(locationMessage=E2E.LocationMessage(name="Office", degreesLatitude=1.0)), ("location", "Office")),
        (Message(contactMessage=E2E.ContactMessage(displayName="Ana")), ("contact", "Ana")),
        (Message(reactionMessage=E2E.ReactionMessage(text="👍")), ("reaction", "👍")),
        (Message(pollCreationMessage=E2E.PollCreationMessage(name="Lunch?")), ("poll", "Lunch?")),
        (Message(buttonsResponseMessage=E2E.ButtonsResponseMessage(selectedDisplayText="Yes")), ("text", "Yes")),
        (Message(listResponseMessage=E2E.ListResponseMessage(title="Option 2")), ("text", "Option 2")),
        (Message(orderMessage=E2E.OrderMessage(orderID="7")), ("order", "")),
    ],
)
def test_message_kinds(message: object, expected: tuple[str, str]) -> None:
    assert message_content(message) == expected


def test_wrapped_messages_are_unwrapped() -> None:
    inner = Message(imageMessage=E2E.ImageMessage(caption="once"))
    view_once = Message(viewOnceMessageV2=E2E.FutureProofMessage(message=inner))
    assert message_content(view_once) == ("image", "once")
    ephemeral = Message(ephemeralMessage=E2E.FutureProofMessage(message=view_once))
    assert message_content(ephemeral) == ("image", "once")
    doc = Message(documentWithCaptionMessage=E2E.FutureProofMessage(
        message=Message(documentMessage=E2E.DocumentMessage(caption="signed", fileName="x.pdf"))))
    assert message_content(doc) == ("document", "signed")


def test_protocol_traffic_is_not_a_message() -> None:
    revoke = Message(protocolMessage=E2E.ProtocolMessage(type=E2E.ProtocolMessage.REVOKE))
    assert message_content(revoke) is None
    keys = Message(senderKeyDistributionMessage=E2E.SenderKeyDistributionMessage(groupID="g"),
                   messageContextInfo=E2E.MessageContextInfo())
    assert message_content(keys) is None
    assert message_content(Message()) is None
    # Key distribution riding along with real content: the content counts.
    both = Message(senderKeyDistributionMessage=E2E.SenderKeyDistributionMessage(groupID="g"), conversation="yo")
    assert message_content(both) == ("text", "yo")


def test_normalize_a_neonize_message() -> None:
    msg = normalize_message(
        msg_id="3EB0C767D26A1D5A",
        chat=NZ.JID(User="120363025246125486", Server="g.us"),
        sender=NZ.JID(User="15551234567", Server="s.whatsapp.net", Device=2),
        content=Message(extendedTextMessage=E2E.ExtendedTextMessage(text="hello all")),
        push_name="Ana",
        ts=1_700_000_000_250,
        is_group=True,
    )
    assert msg == {
        "id": "3EB0C767D26A1D5A",
        "chat": "120363025246125486@g.us",
        "from": "15551234567",
        "push_name": "Ana",
        "type": "text",
        "text": "hello all",
        "ts": pytest.approx(1_700_000_000.25),
        "is_group": True,
    }


def test_normalize_sim_text_keeps_its_shape() -> None:
    ts = time.time()
    msg = normalize_message(msg_id="IN1", chat="15557654321", sender="15557654321", content="while away", ts=ts)
    assert msg == {"id": "IN1", "chat": "15557654321", "from": "15557654321", "push_name": "", "type": "text",
                   "text": "while away", "ts": ts, "is_group": False}


def test_group_flag_follows_the_chat_when_not_given() -> None:
    msg = normalize_message(msg_id="1", chat="1203630@g.us", sender="15551234567@s.whatsapp.net", content="x")
    assert msg is not None and msg["is_group"] is True and msg["chat"] == "1203630@g.us"


def test_own_messages_protocol_traffic_and_broadcasts_are_dropped() -> None:
    args = {"msg_id": "1", "chat": "15551234567", "sender": "15551234567"}
    assert normalize_message(**args, content="from my phone", from_me=True) is None
    assert normalize_message(**args, content=None) is None
    assert normalize_message(**args, content=Message(protocolMessage=E2E.ProtocolMessage())) is None
    status = NZ.JID(User="status", Server="broadcast")
    assert normalize_message(msg_id="2", chat=status, sender="15551234567", content="my day") is None
    assert normalize_message(msg_id="3", chat="1203630@newsletter", sender="1203630@newsletter", content="news") is None


def test_inbound_does_not_import_neonize() -> None:
    """The sim backend uses this module: it must not load neonize's Go runtime."""
    code = "import sys, workers.inbound, workers.sim_backend; assert 'neonize' not in sys.modules, 'loaded'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


# ---------------------------------------------------------------------------------- DESIGN.md §11 fields

KEYS = {"URL": "https://mmg.whatsapp.net/d/f/x.enc", "directPath": "/v/t62.7118-24/x.enc", "mediaKey": b"k" * 32,
        "fileSHA256": b"\x00\xff" * 16, "fileEncSHA256": b"e" * 32, "fileLength": 1234, "mediaKeyTimestamp": 17}
QUOTE = E2E.ContextInfo(stanzaID="WA-PREV", participant="15557654321@s.whatsapp.net",
                        quotedMessage=Message(conversation="earlier"))


def held(handle: dict[str, str]) -> object:
    return Message.FromString(base64.b64decode(handle["message"], validate=True))


def test_plain_text_has_no_extras_and_keeps_its_shape() -> None:
    assert message_extras(Message(conversation="hi")) == {}
    assert message_extras(Message(extendedTextMessage=E2E.ExtendedTextMessage(text="x"))) == {}
    assert message_extras(Message(protocolMessage=E2E.ProtocolMessage())) == {}
    msg = normalize_message(msg_id="1", chat="15551234567", sender="15551234567", content=Message(conversation="hi"),
                            ts=5)
    assert msg == {"id": "1", "chat": "15551234567", "from": "15551234567", "push_name": "", "type": "text",
                   "text": "hi", "ts": 5.0, "is_group": False}


def test_media_info_reads_what_the_message_announces() -> None:
    doc = E2E.DocumentMessage(**KEYS, mimetype="application/pdf", fileName="a.pdf", caption="c")
    assert media_info("documentMessage", doc) == {"mimetype": "application/pdf", "size": 1234, "filename": "a.pdf",
                                                  "sha256": "00ff" * 16}
    # A file name only for documents; nothing announced, nothing made up.
    assert media_info("imageMessage", E2E.ImageMessage()) == {"mimetype": None, "size": None}
    assert media_info("audioMessage", E2E.AudioMessage(mimetype="audio/ogg", fileLength=0)) == {
        "mimetype": "audio/ogg", "size": 0}


def test_media_handle_keeps_only_what_a_download_needs() -> None:
    image = E2E.ImageMessage(**KEYS, mimetype="image/jpeg", caption="secret caption", JPEGThumbnail=b"t" * 20_000,
                             contextInfo=QUOTE, width=800)
    handle = media_handle(Message(imageMessage=image), "imageMessage", image)
    assert handle["kind"] == "imageMessage" and json.loads(json.dumps(handle)) == handle
    assert held(handle) == Message(imageMessage=E2E.ImageMessage(**KEYS, mimetype="image/jpeg"))
    assert len(handle["message"]) < 400
    # A round video note is downloaded as the VideoMessage it is (whatsmeow's DownloadAny knows no ptv).
    ptv = E2E.VideoMessage(**KEYS, mimetype="video/mp4")
    handle = media_handle(Message(ptvMessage=ptv), "ptvMessage", ptv)
    assert handle["kind"] == "ptvMessage" and held(handle) == Message(videoMessage=ptv)


def test_extras_of_wrapped_media_come_from_the_inner_message() -> None:
    inner = E2E.DocumentMessage(**KEYS, mimetype="application/pdf", fileName="x.pdf", caption="signed",
                                contextInfo=QUOTE)
    wrapped = Message(ephemeralMessage=E2E.FutureProofMessage(message=Message(
        documentWithCaptionMessage=E2E.FutureProofMessage(message=Message(documentMessage=inner)))))
    extras = message_extras(wrapped)
    handle = extras.pop("_fetch")
    assert extras == {"reply_to": "WA-PREV", "media": {"mimetype": "application/pdf", "size": 1234,
                                                       "filename": "x.pdf", "sha256": "00ff" * 16}}
    assert handle["kind"] == "documentMessage"
    assert held(handle) == Message(documentMessage=E2E.DocumentMessage(**KEYS, mimetype="application/pdf"))


@pytest.mark.parametrize(
    ("message", "extras"),
    [
        (Message(locationMessage=E2E.LocationMessage(degreesLatitude=52.5, degreesLongitude=13.4, name="Office")),
         {"latitude": 52.5, "longitude": 13.4, "name": "Office"}),
        (Message(locationMessage=E2E.LocationMessage(name="somewhere")), {"name": "somewhere"}),  # no position given
        (Message(liveLocationMessage=E2E.LiveLocationMessage(degreesLatitude=1.0, degreesLongitude=2.0)),
         {"latitude": 1.0, "longitude": 2.0}),
        (Message(reactionMessage=E2E.ReactionMessage(key=KEY(ID="3EB0X", fromMe=True), text="🙏")),
         {"reaction_to": "3EB0X", "emoji": "🙏"}),
        (Message(reactionMessage=E2E.ReactionMessage(key=KEY(ID="3EB0X"))), {"reaction_to": "3EB0X", "emoji": ""}),
        (Message(extendedTextMessage=E2E.ExtendedTextMessage(text="ok", contextInfo=QUOTE)), {"reply_to": "WA-PREV"}),
        (Message(extendedTextMessage=E2E.ExtendedTextMessage(text="ok", contextInfo=E2E.ContextInfo(
            mentionedJID=["15551234567@s.whatsapp.net"]))), {}),  # a context without a quote is no reply
        (Message(contactMessage=E2E.ContactMessage(displayName="Ana", contextInfo=QUOTE)), {"reply_to": "WA-PREV"}),
    ],
    ids=["location", "location-name-only", "live-location", "reaction", "reaction-removed", "reply", "mention",
         "contact-reply"],
)
def test_location_reaction_and_reply_extras(message: object, extras: dict[str, object]) -> None:
    assert message_extras(message) == extras


def test_normalize_adds_the_extras_of_a_media_message() -> None:
    content = Message(imageMessage=E2E.ImageMessage(**KEYS, mimetype="image/jpeg", caption="menu", contextInfo=QUOTE))
    msg = normalize_message(msg_id="A1", chat=NZ.JID(User="1203630", Server="g.us"),
                            sender=NZ.JID(User="15551234567", Server="s.whatsapp.net"), content=content, ts=7,
                            is_group=True)
    assert msg is not None
    handle = msg.pop("_fetch")
    assert msg == {"id": "A1", "chat": "1203630@g.us", "from": "15551234567", "push_name": "", "type": "image",
                   "text": "menu", "ts": 7.0, "is_group": True, "reply_to": "WA-PREV",
                   "media": {"mimetype": "image/jpeg", "size": 1234, "sha256": "00ff" * 16}}
    assert held(handle) == Message(imageMessage=E2E.ImageMessage(**KEYS, mimetype="image/jpeg"))
