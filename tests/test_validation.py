import pytest

from ipc.errors import INVALID_COMPANY_ID, INVALID_PHONE, MESSAGE_TOO_LONG, WaportError
from ipc.validation import MAX_TEXT_CHARS, mask_phone, normalize_phone, validate_company, validate_text


@pytest.mark.parametrize("company", ["acme", "A", "salon_42", "x-y", "a" * 50])
def test_valid_company_ids_are_unchanged(company):
    assert validate_company(company) == company


@pytest.mark.parametrize(
    "company", ["", "a" * 51, "acme corp", "../etc", "acmé", "a/b", "a.b", None, 42, "acme\n", ["acme"]]
)
def test_invalid_company_ids_are_rejected_not_sanitized(company):
    with pytest.raises(WaportError) as exc:
        validate_company(company)
    assert exc.value.code == INVALID_COMPANY_ID
    assert "invalid company id" in exc.value.message


@pytest.mark.parametrize(
    "raw,digits",
    [
        ("+49 (151) 234-5678", "491512345678"),
        ("1234567", "1234567"),
        ("123456789012345", "123456789012345"),
        ("  +1 555 010 9999 ", "15550109999"),
        ("491512345678@s.whatsapp.net", "491512345678@s.whatsapp.net"),
        ("120363012345678901@g.us", "120363012345678901@g.us"),
    ],
)
def test_phone_normalization(raw, digits):
    assert normalize_phone(raw) == digits


@pytest.mark.parametrize(
    "raw", ["123456", "1234567890123456", "++491512345678", "49-151-abc", "", None, "+", "٤٩١٥١٢٣٤٥٦٧", "x@example.com"]
)
def test_invalid_phones(raw):
    with pytest.raises(WaportError) as exc:
        normalize_phone(raw)
    assert exc.value.code == INVALID_PHONE


def test_text_limits():
    assert validate_text("hi") == "hi"
    with pytest.raises(WaportError) as exc:
        validate_text("x" * (MAX_TEXT_CHARS + 1))
    assert exc.value.code == MESSAGE_TOO_LONG and exc.value.extra["limit"] == MAX_TEXT_CHARS


def test_mask_phone_hides_the_middle():
    assert mask_phone("491512345678") == "49********78"
    assert "1512345" not in mask_phone("491512345678@s.whatsapp.net")
