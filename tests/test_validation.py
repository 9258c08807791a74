import pytest

from ipc.errors import BAD_REQUEST, INVALID_COMPANY_ID, INVALID_PHONE, MESSAGE_TOO_LONG, WaportError
from ipc.validation import (
    MAX_TEXT_CHARS,
    is_utf8,
    mask_phone,
    normalize_phone,
    parse_duration,
    parse_listen,
    validate_company,
    validate_text,
)


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


def test_text_with_a_lone_surrogate_is_refused():
    # json.loads('"\\ud800"') gives one: SQLite would refuse it later, in the supervisor's loop.
    assert not is_utf8("\ud800") and is_utf8("é😀")
    with pytest.raises(WaportError) as exc:
        validate_text("hi \ud800")
    assert exc.value.code == BAD_REQUEST


@pytest.mark.parametrize("value,seconds", [(3600, 3600.0), (1.5, 1.5), ("3600", 3600.0), ("3600s", 3600.0),
                                           ("90m", 5400.0), ("12h", 43200.0), ("30d", 2592000.0),
                                           ("250ms", 0.25), (" 2 min ", 120.0), (0, 0.0)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "", "1w", "-5", -5, True, None, [1], "1e3", float("inf"), 10**400,
                                   "9" * 400 + "d"])
def test_parse_duration_refuses(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_listen_names_its_key():
    assert parse_listen(" 127.0.0.1:8480 ", "http_listen") == ("127.0.0.1", 8480)
    with pytest.raises(ValueError, match="^http_listen '8480': expected host:port"):
        parse_listen("8480", "http_listen")
    with pytest.raises(ValueError):
        parse_listen("host:\u00b2", "http_listen")  # a digit to str.isdigit, not to int()


def test_proxy_urls_and_their_masked_form() -> None:
    from ipc.validation import mask_url, validate_proxy

    assert validate_proxy("") == "" and validate_proxy(None) == ""
    assert validate_proxy("http://proxy.internal:3128") == "http://proxy.internal:3128"
    for bad in ("proxy:3128", "ftp://p:21", "socks5://p", "http://p:99999", 7):
        with pytest.raises(WaportError):
            validate_proxy(bad)
    assert mask_url("socks5://op:s3cret@10.0.0.5:1080") == "socks5://op:***@10.0.0.5:1080"
    assert mask_url("http://p:3128") == "http://p:3128"
