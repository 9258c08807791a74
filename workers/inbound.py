"""Inbound messages: the one normalization both backends use, so consumers see one shape.

The `message` report (workers/backend.py) is ``{"id", "chat", "from", "push_name", "type", "text",
"ts", "is_group"}``, plus the DESIGN.md §11 fields a message of its kind carries (`message_extras`):
``reply_to``, ``latitude``/``longitude``/``name``, ``reaction_to``/``emoji``, and for media ``media``
and ``_fetch`` (what the neonize backend downloads it by). The `sim` backend hands plain text; the
`neonize` backend hands WhatsApp's ``Message`` protobuf (waE2E), read here by duck typing
(``HasField`` / ``ListFields``) so this module never imports neonize: the supervisor and the `sim`
workers must not load its Go runtime.

Choices made here, for every backend alike:

- ``from``/``chat`` are phone digits for phone-number JIDs (``15551234567@s.whatsapp.net`` and its
  device form ``15551234567:3@s.whatsapp.net``); any other JID (groups ``…@g.us``, ``…@lid``,
  ``…@newsletter``) is kept whole, since it is not a phone number.
- ``ts`` is epoch seconds (float). Values above 1e11 are milliseconds (neonize's
  ``Info.Timestamp``): no date after 1973 is below that in ms, none before year 5138 above it in s.
- Own messages (typed on the company's phone or another linked device, ``IsFromMe``) are not
  inbound: they are dropped, so an assistant never answers its own operator or itself.
- Protocol traffic (revokes, edits, key shares, history-sync notices, poll votes, pins) is not a
  message from a person: dropped. Unknown kinds are kept with the type named after the field.
- Status updates (chat ``status@broadcast``) and channel posts (``…@newsletter``) are broadcasts
  the company's phone sees, not conversations with it: dropped.
"""

from __future__ import annotations

import base64
import time
from typing import Any

PHONE_SERVERS = frozenset({"s.whatsapp.net", "c.us"})
GROUP_SERVER = "g.us"
STATUS_CHAT = "status@broadcast"
NEWSLETTER_SERVER = "newsletter"
MS_THRESHOLD = 1e11
MAX_WRAPPING = 5  # ephemeral(view-once(document-with-caption(...))) nests a few levels at most

# field of waE2E.Message -> (type, fields holding its text, first non-empty wins)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "extendedTextMessage": ("text", ("text",)),
    "imageMessage": ("image", ("caption",)),
    "videoMessage": ("video", ("caption",)),
    "ptvMessage": ("video", ("caption",)),
    "audioMessage": ("audio", ()),
    "documentMessage": ("document", ("caption", "fileName", "title")),
    "stickerMessage": ("sticker", ()),
    "locationMessage": ("location", ("name", "address", "comment")),
    "liveLocationMessage": ("location", ("caption",)),
    "contactMessage": ("contact", ("displayName",)),
    "contactsArrayMessage": ("contact", ("displayName",)),
    "reactionMessage": ("reaction", ("text",)),
    "pollCreationMessage": ("poll", ("name",)),
    "pollCreationMessageV2": ("poll", ("name",)),
    "pollCreationMessageV3": ("poll", ("name",)),
    "pollCreationMessageV5": ("poll", ("name",)),
    "pollCreationMessageV6": ("poll", ("name",)),
    "buttonsResponseMessage": ("text", ("selectedDisplayText",)),
    "templateButtonReplyMessage": ("text", ("selectedDisplayText",)),
    "listResponseMessage": ("text", ("title",)),
    "interactiveResponseMessage": ("text", ()),  # text in body.text, below
    "groupInviteMessage": ("group_invite", ("caption", "groupName")),
    "eventMessage": ("event", ("name",)),
}
# Fields that ride along with content or are protocol traffic, never a person's message.
NOT_CONTENT = frozenset(
    {
        "messageContextInfo",
        "senderKeyDistributionMessage",
        "fastRatchetKeySenderKeyDistributionMessage",
        "protocolMessage",
        "pollUpdateMessage",
        "encReactionMessage",
        "encEventResponseMessage",
        "encCommentMessage",
        "keepInChatMessage",
        "pinInChatMessage",
        "placeholderMessage",
        "secretEncryptedMessage",
        "stickerSyncRmrMessage",
        "messageHistoryBundle",
        "messageHistoryNotice",
        "groupRootKeyShare",
        "rootSecretDistributeMessage",
        "statusNotificationMessage",
        "call",
        "chat",
    }
)
# Media a person sends; the worker downloads it after journaling the message (DESIGN.md §11).
MEDIA_FIELDS = frozenset(
    {"imageMessage", "videoMessage", "ptvMessage", "audioMessage", "documentMessage", "stickerMessage"}
)
# whatsmeow's DownloadAny looks at five fields only; a round video note (ptv) is a VideoMessage.
DOWNLOAD_AS = {"ptvMessage": "videoMessage"}
# What whatsmeow's Download reads of a media message: the handle keeps these, not the thumbnail or the
# quoted message (it is journaled with the message, so it stays small).
DOWNLOAD_KEYS = ("URL", "directPath", "mediaKey", "fileSHA256", "fileEncSHA256", "fileLength", "mimetype",
                 "mediaKeyTimestamp")
LOCATION_FIELDS = frozenset({"locationMessage", "liveLocationMessage"})


def phone_from_jid(jid: Any) -> str:
    """The phone digits of a phone-number JID; any other JID whole; bare digits unchanged.

    Accepts a string (``user[:device]@server`` or a phone) or a JID protobuf (``User``, ``Server``).
    """
    if jid is None:
        return ""
    if isinstance(jid, str):
        user, at, server = jid.strip().partition("@")
        if not at:
            return user
    else:
        user, server = str(getattr(jid, "User", "")), str(getattr(jid, "Server", ""))
        if not server:
            return user
    if server in PHONE_SERVERS:
        return user.split(":", 1)[0].split(".", 1)[0]
    return f"{user.split(':', 1)[0]}@{server}" if user else server


def epoch_seconds(ts: Any) -> float:
    """Epoch seconds from seconds or milliseconds; now when missing or not a number."""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts <= 0:
        return time.time()
    return ts / 1000.0 if ts > MS_THRESHOLD else float(ts)


def message_content(message: Any) -> tuple[str, str] | None:
    """``(type, text)`` of a WhatsApp ``Message`` protobuf; None when it is not a person's message."""
    found = _locate(message, 0)
    return None if found is None else _kind_and_text(found[1], found[2])


def message_extras(message: Any) -> dict[str, Any]:
    """The §11 fields of a WhatsApp ``Message`` protobuf beyond type and text: ``reply_to``, a location's
    ``latitude``/``longitude``/``name``, a reaction's ``reaction_to``/``emoji``, and for media ``media``
    ``{mimetype, size, filename?, sha256?}`` with ``_fetch`` (`media_handle`). Empty for plain text."""
    found = _locate(message, 0)
    return {} if found is None else _extras(*found)


def _locate(message: Any, depth: int) -> tuple[Any, str, Any] | None:
    """The content of a message: (the ``Message`` holding it, its field name, its value), wrappers
    (ephemeral, view-once, document-with-caption, ...) opened; None for protocol traffic."""
    if depth > MAX_WRAPPING:
        return None
    unknown: tuple[str, Any] | None = None
    wrapped: Any = None
    for field, value in message.ListFields():
        name = field.name
        if name == "conversation" or name in KINDS:
            return message, name, value
        if name in NOT_CONTENT:
            continue
        if wrapped is None and _has(value, "message"):
            wrapped = value.message  # FutureProofMessage / DeviceSentMessage: the content is inside
        elif unknown is None:
            unknown = name, value
    if wrapped is not None:
        return _locate(wrapped, depth + 1)
    if unknown is not None:
        return message, unknown[0], unknown[1]
    return None


def _kind_and_text(name: str, value: Any) -> tuple[str, str]:
    if name == "conversation":
        return "text", str(value)
    if name in KINDS:
        kind, text_fields = KINDS[name]
        return kind, _text_of(name, value, text_fields)
    return _kind_name(name), ""


def _extras(holder: Any, name: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if name == "conversation":
        return out
    if _has(value, "contextInfo") and value.contextInfo.stanzaID:
        out["reply_to"] = str(value.contextInfo.stanzaID)
    if name in LOCATION_FIELDS:
        if _has(value, "degreesLatitude") and _has(value, "degreesLongitude"):
            out["latitude"] = float(value.degreesLatitude)
            out["longitude"] = float(value.degreesLongitude)
        if getattr(value, "name", ""):
            out["name"] = str(value.name)
    elif name == "reactionMessage":
        if _has(value, "key") and value.key.ID:
            out["reaction_to"] = str(value.key.ID)
        out["emoji"] = str(value.text)  # empty: the reaction was removed
    elif name in MEDIA_FIELDS:
        out["media"] = media_info(name, value)
        out["_fetch"] = media_handle(holder, name, value)
    return out


def media_info(name: str, value: Any) -> dict[str, Any]:
    """What a media message announces: ``{mimetype, size, filename?, sha256?}`` (sha256 in hex, as the
    store names files; the worker checks the downloaded bytes against it)."""
    info: dict[str, Any] = {
        "mimetype": str(value.mimetype) if _has(value, "mimetype") else None,
        "size": int(value.fileLength) if _has(value, "fileLength") else None,
    }
    if name == "documentMessage" and getattr(value, "fileName", ""):
        info["filename"] = str(value.fileName)
    digest = bytes(value.fileSHA256) if _has(value, "fileSHA256") else b""
    if digest:
        info["sha256"] = digest.hex()
    return info


def media_handle(holder: Any, name: str, value: Any) -> dict[str, str]:
    """A JSON-safe handle to download a media message by later: a ``Message`` holding just its download
    keys (serialized, base64) in a field whatsmeow's DownloadAny reads, and the field it came in."""
    keys = type(value)()
    for key in DOWNLOAD_KEYS:
        if _has(value, key):
            setattr(keys, key, getattr(value, key))
    message = type(holder)()
    getattr(message, DOWNLOAD_AS.get(name, name)).CopyFrom(keys)
    return {"message": base64.b64encode(message.SerializeToString()).decode("ascii"), "kind": name}


def _text_of(name: str, value: Any, fields: tuple[str, ...]) -> str:
    if name == "interactiveResponseMessage":
        return str(value.body.text) if _has(value, "body") else ""
    if name == "locationMessage" and not any(getattr(value, f, "") for f in fields):
        if _has(value, "degreesLatitude") and _has(value, "degreesLongitude"):
            return f"{value.degreesLatitude},{value.degreesLongitude}"
    for f in fields:
        text = getattr(value, f, "")
        if text:
            return str(text)
    return ""


def _kind_name(field: str) -> str:
    """``orderMessage`` -> ``order``, ``scheduledCallCreationMessage`` -> ``scheduled_call_creation``."""
    if field.endswith("Message") and len(field) > len("Message"):
        field = field[: -len("Message")]
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in field).lstrip("_")


def _has(obj: Any, field: str) -> bool:
    try:
        return bool(obj.HasField(field))
    except (AttributeError, ValueError):
        return False


def normalize_message(
    *,
    msg_id: Any,
    chat: Any,
    sender: Any,
    content: Any,
    push_name: str = "",
    ts: Any = None,
    is_group: bool | None = None,
    from_me: bool = False,
) -> dict[str, Any] | None:
    """The `message` report for one inbound message, or None when it must not be reported.

    `content` is the text (str) or a WhatsApp ``Message`` protobuf (whose §11 fields are added, see
    `message_extras`); `chat`/`sender` are JIDs (strings or protobufs) or phone digits. None: own
    messages, protocol traffic, broadcasts.
    """
    if from_me:
        return None
    extras: dict[str, Any] = {}
    if isinstance(content, str):
        kind, text = "text", content
    elif content is None:
        return None
    else:
        found = _locate(content, 0)
        if found is None:
            return None
        kind, text = _kind_and_text(found[1], found[2])
        extras = _extras(*found)
    chat_id = phone_from_jid(chat)
    if chat_id == STATUS_CHAT or chat_id.endswith("@" + NEWSLETTER_SERVER):
        return None
    sender_id = phone_from_jid(sender) or chat_id
    if is_group is None:
        is_group = chat_id.endswith("@" + GROUP_SERVER)
    return {
        "id": "" if msg_id is None else str(msg_id),
        "chat": chat_id or sender_id,
        "from": sender_id,
        "push_name": push_name or "",
        "type": kind,
        "text": text,
        "ts": epoch_seconds(ts),
        "is_group": bool(is_group),
        **extras,
    }
