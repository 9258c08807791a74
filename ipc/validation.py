"""Input validation shared by every entry point: reject, never silently sanitize."""

from __future__ import annotations

import re

from ipc.errors import BAD_REQUEST, INVALID_COMPANY_ID, INVALID_PHONE, MESSAGE_TOO_LONG, WaportError

COMPANY_RE = re.compile(r"[A-Za-z0-9_-]{1,50}")
JID_RE = re.compile(r"[0-9A-Za-z.:_-]{1,64}@(s\.whatsapp\.net|g\.us|lid|broadcast|newsletter)")
MAX_TEXT_CHARS = 65536


def validate_company(company: object) -> str:
    """Return the company id unchanged, or raise `invalid_company_id`."""
    if not isinstance(company, str) or not COMPANY_RE.fullmatch(company):
        raise WaportError(
            INVALID_COMPANY_ID,
            f"invalid company id {company!r}: use 1-50 characters from A-Z a-z 0-9 _ -",
        )
    return company


def normalize_phone(phone: object) -> str:
    """Digits of a phone number, or a full JID unchanged; else `invalid_phone`.

    Spaces, dashes, parentheses and one leading `+` are removed; 7-15 digits remain.
    """
    if not isinstance(phone, str):
        raise WaportError(INVALID_PHONE, f"invalid phone {phone!r}: expected a string")
    text = phone.strip()
    if "@" in text:
        if JID_RE.fullmatch(text):
            return text
        raise WaportError(INVALID_PHONE, f"invalid JID {mask_phone(text)!r}")
    digits = re.sub(r"[\s\-()]", "", text)
    if digits.startswith("+"):
        digits = digits[1:]
    if not digits.isdigit() or not 7 <= len(digits) <= 15 or not digits.isascii():
        raise WaportError(
            INVALID_PHONE,
            "invalid phone number: expected 7-15 digits (spaces, dashes, parentheses "
            "and one leading + allowed) or a full JID",
        )
    return digits


def validate_text(text: object) -> str:
    if not isinstance(text, str) or not text:
        raise WaportError(BAD_REQUEST, "text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise WaportError(
            MESSAGE_TOO_LONG,
            f"message has {len(text)} characters; the limit is {MAX_TEXT_CHARS}",
            limit=MAX_TEXT_CHARS,
        )
    return text


def mask_phone(phone: str) -> str:
    """Keep a phone number recognisable in logs without writing it in full."""
    user, at, server = phone.partition("@")
    if len(user) <= 4:
        return "*" * len(user) + at + server
    return user[:2] + "*" * (len(user) - 4) + user[-2:] + at + server
