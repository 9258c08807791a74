"""The log line format: masking, journald priorities, company tags (ipc/logfmt.py, waportd/logsetup.py)."""

from __future__ import annotations

import io
import logging
import os

import pytest

from ipc.logfmt import CompanyTag, LineFormatter, mask_phones, priority, under_journald
from waportd import logsetup


@pytest.mark.parametrize("raw,masked", [
    ("send to 15550109999 ok", "send to 15*******99 ok"),
    ("jid 15550109999@s.whatsapp.net", "jid 15*******99@s.whatsapp.net"),
    ("+1 (555) 010-9999 wrote", "+15*******99 wrote"),
    ("+4915112345678", "+49*********78"),
    ("worker 4194304 exited", "worker 4194304 exited"),  # a 7-digit pid is not a phone number
    ("until 1712345678.25", "until 1712345678.25"),  # nor a timestamp
    ("id 3EB0ABCDEF12345678", "id 3EB0ABCDEF12345678"),  # nor part of a message id
    ("two 15550109999, 4915112345678.", "two 15*******99, 49*********78."),
])
def test_mask_phones(raw, masked):
    assert mask_phones(raw) == masked


def test_priorities():
    assert [priority(x) for x in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL,
                                  logging.INFO + 5)] == [7, 6, 4, 3, 2, 6]


def record(msg: str, *args: object, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("waport.test", level, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


def test_plain_and_journald_lines():
    plain = LineFormatter(journald=False).format(record("sent to %s", "15550109999"))
    assert plain.endswith(f" waportd[{os.getpid()}] INFO waport.test: sent to 15*******99")
    assert plain[:4].isdigit() and "T" in plain[:11]  # ISO time first
    journal = LineFormatter(journald=True).format(record("lost", level=logging.WARNING, company="acme",
                                                         process=77))
    assert journal == "<4>worker[acme/77] WARNING waport.test: lost"


def test_the_record_itself_is_not_changed_and_tracebacks_are_masked():
    try:
        raise ValueError("bad number 15550109999")
    except ValueError:
        import sys

        r = record("failed for %s", "15550109999", exc_info=sys.exc_info())
    out = LineFormatter().format(r)
    assert "15550109999" not in out and "ValueError: bad number 15*******99" in out
    assert r.getMessage() == "failed for 15550109999"  # other handlers see the original


def test_company_tag_marks_untagged_records_only():
    tag = CompanyTag("acme")
    r = record("x")
    assert tag.filter(r) and r.company == "acme"
    other = record("x", company="bistro")
    tag.filter(other)
    assert other.company == "bistro"


def test_under_journald_compares_the_stream(tmp_path):
    with open(tmp_path / "f", "w") as fh:
        st = os.fstat(fh.fileno())
        assert under_journald(fh, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not under_journald(fh, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})  # inherited, not ours
        assert not under_journald(fh, {})
        assert not under_journald(fh, {"JOURNAL_STREAM": "garbage"})


def test_configure_replaces_the_root_handlers():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        out = io.StringIO()
        logsetup.configure("warning", out)
        logging.getLogger("waport.x").info("hidden")
        logging.getLogger("waport.x").warning("call %s", "+1 555 010 9999")
        assert out.getvalue().endswith("WARNING waport.x: call +15*******99\n")
        assert "hidden" not in out.getvalue()
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
