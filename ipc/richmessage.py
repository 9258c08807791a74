"""What a `send` carries beyond its recipient (DESIGN.md §11), checked the same way at every entry point.

A send is a type, its text (a text message's body, a media caption, a location's name; empty for a
reaction) and the type's fields, kept as JSON in the journal. The checks here are pure: whether a
media id is in the store and whether a referenced message is in the journal are asked by the caller
(`check_media`, and the ids `references` names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ipc.errors import BAD_REQUEST, MEDIA_TOO_LARGE, NOT_FOUND, WaportError
from ipc.mediastore import MediaInfo, validate_id, validate_mimetype
from ipc.validation import MAX_TEXT_CHARS, validate_text

TEXT = "text"
MEDIA_TYPES = ("image", "video", "audio", "document")
LOCATION = "location"
REACTION = "reaction"
SEND_TYPES = (TEXT, *MEDIA_TYPES, LOCATION, REACTION)
MAX_ID = 128
MAX_EMOJI = 16  # characters: one emoji with its modifiers and joiners
MAX_NAME = 1000
MAX_FILENAME = 255


@dataclass(frozen=True)
class SendSpec:
    type: str = TEXT
    text: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def media(self) -> str | None:
        return self.fields.get("media")

    @property
    def references(self) -> list[str]:
        """Message ids this send points at, which the company's journal must know."""
        ids = [self.fields["reply_to"]] if "reply_to" in self.fields else []
        if self.type == REACTION:
            ids.append(self.fields["reaction_to"])
        return ids


def message_ref(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID or not value.isprintable():
        raise WaportError(BAD_REQUEST, f"{name}: a message id of 1-{MAX_ID} printable characters")
    return value


def coordinate(value: Any, name: str, limit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not -limit <= value <= limit:
        raise WaportError(BAD_REQUEST, f"{name}: a number of degrees from -{limit:g} to {limit:g}")
    return float(value)


PLAIN = frozenset({"company", "to", "text", "idempotency_key"})  # a text send: no field of another type to check
TYPE_FIELDS = ("media", "filename", "voice", "latitude", "longitude", "name", "message_id", "emoji")
SEND_ARGS = ("text", "type", *TYPE_FIELDS, "reply_to")  # what a send names beyond its company, recipient and key
# What an inbound `message` carries beyond the basics, by its type (its media aside): reply, location, reaction.
INBOUND_FIELDS = ("reply_to", "latitude", "longitude", "name", "emoji", "reaction_to")


def parse_send(args: dict[str, Any]) -> SendSpec:
    """The type, text and fields of a `send`'s arguments; `bad_request` (or `message_too_long`) else."""
    if args.keys() <= PLAIN:  # the common case, on the supervisor's loop for every send: one set test
        return SendSpec(TEXT, validate_text(args.get("text")))
    kind = args.get("type") or TEXT
    if kind not in SEND_TYPES:
        raise WaportError(BAD_REQUEST, f"type: one of {', '.join(SEND_TYPES)}")
    text = args.get("text")
    fields: dict[str, Any] = {}
    if kind == TEXT:
        text = validate_text(text)
    elif text is None or text == "":
        text = ""
    elif kind == REACTION:
        raise WaportError(BAD_REQUEST, "a reaction carries no text: its emoji is the field 'emoji'")
    else:
        text = validate_text(text)
    if kind in MEDIA_TYPES:
        fields["media"] = validate_id(args.get("media"))
        filename = args.get("filename")
        if filename is not None:
            if not isinstance(filename, str) or not 0 < len(filename) <= MAX_FILENAME:
                raise WaportError(BAD_REQUEST, f"filename: 1-{MAX_FILENAME} characters")
            fields["filename"] = filename
        voice = args.get("voice")
        if voice is not None:
            if not isinstance(voice, bool) or (voice and kind != "audio"):
                raise WaportError(BAD_REQUEST, "voice: true or false, and only for type audio")
            if voice:
                fields["voice"] = True
    elif kind == LOCATION:
        fields["latitude"] = coordinate(args.get("latitude"), "latitude", 90)
        fields["longitude"] = coordinate(args.get("longitude"), "longitude", 180)
        name = args.get("name")
        if name is not None:
            if not isinstance(name, str) or len(name) > MAX_NAME:
                raise WaportError(BAD_REQUEST, f"name: up to {MAX_NAME} characters")
            fields["name"] = name
            text = text or name
    elif kind == REACTION:
        fields["reaction_to"] = message_ref(args.get("message_id"), "message_id")  # not the send's own id
        emoji = args.get("emoji")
        if not isinstance(emoji, str) or len(emoji) > MAX_EMOJI or (emoji and not emoji.isprintable()):
            raise WaportError(BAD_REQUEST, f"emoji: one emoji (up to {MAX_EMOJI} characters); empty removes it")
        fields["emoji"] = emoji
    taken = {*fields, "message_id"} if kind == REACTION else {*fields, "name"} if kind == LOCATION else set(fields)
    stray = [k for k in TYPE_FIELDS if args.get(k) is not None and k not in taken]
    if stray:
        raise WaportError(BAD_REQUEST, f"a {kind} message takes no {', '.join(stray)}")
    if args.get("reply_to") is not None:
        fields["reply_to"] = message_ref(args["reply_to"], "reply_to")
    assert isinstance(text, str) and len(text) <= MAX_TEXT_CHARS
    return SendSpec(kind, text, fields)


def check_media(spec: SendSpec, info: MediaInfo | None, max_bytes: int) -> dict[str, Any]:
    """The stored file a media send names, fit for its type: the fields to journal with it."""
    if spec.media is None:
        return spec.fields
    if info is None:
        raise WaportError(NOT_FOUND, f"no media {spec.media}: store it first (POST /v1/media, waportctl media put)")
    if info.size > max_bytes:
        raise WaportError(MEDIA_TOO_LARGE, f"media exceeds media_max_bytes ({max_bytes} bytes)", max_bytes=max_bytes)
    mimetype = validate_mimetype(info.mimetype, spec.type)
    out = {**spec.fields, "mimetype": mimetype, "size": info.size}
    if "filename" not in out and info.filename and spec.type == "document":
        out["filename"] = info.filename
    return out


def inbound_media(info: MediaInfo | None, announced: dict[str, Any], error: str | None = None) -> dict[str, Any]:
    """The §11 `media` object of an inbound message: stored (with the store's id) or failed (with why)."""
    out: dict[str, Any] = {"mimetype": announced.get("mimetype"), "size": announced.get("size")}
    if announced.get("filename"):
        out["filename"] = announced["filename"]
    if info is not None:
        out.update(id=info.media_id, mimetype=info.mimetype, size=info.size, sha256=info.sha256, status="stored")
    else:
        out.update(id=None, sha256=announced.get("sha256"), status="failed", error=error or "download failed")
    return out
