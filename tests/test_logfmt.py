"""The log line format, its parser, journald's native protocol (ipc/logfmt.py, ipc/journald.py, waportd/logsetup.py)."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import socket
import struct

import pytest
from conftest import CollectRecords

from ipc import journald
from ipc.journald import JournalSender
from ipc.logfmt import (
    About,
    CompanyTag,
    JournalHandler,
    LineFormatter,
    journal_fields,
    log_to_stderr,
    mask_phones,
    parse_line,
    parse_log,
    priority,
    stderr_handler,
    under_journald,
)
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
                                                         process=77, program="worker"))
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


# ---------------------------------------------------------------- reading lines back


def test_parse_log_reads_every_origin_and_joins_continuation_lines():
    fmt = LineFormatter(program="simnet")
    try:
        raise ValueError("bad\nnumber 15550109999")
    except ValueError:
        import sys

        crashed = record("send failed", level=logging.ERROR, exc_info=sys.exc_info())
    text = "\n".join([
        fmt.format(record("listening on %s", "ipc:///run/x")),
        fmt.format(crashed),
        LineFormatter(program="api").format(record("two\nlines", level=logging.WARNING)),
        LineFormatter(journald=True).format(record("lost", level=logging.WARNING, company="acme", process=77,
                                                   program="worker")),
        LineFormatter(journald=True).format(record("a\nb", level=logging.ERROR)),
    ])
    lines = list(parse_log(text))
    assert [(x.program, x.company, x.level, x.priority) for x in lines] == [
        ("simnet", None, "INFO", None), ("simnet", None, "ERROR", None), ("api", None, "WARNING", None),
        ("worker", "acme", "WARNING", 4), ("waportd", None, "ERROR", 3)]
    assert lines[0].message == "listening on ipc:///run/x" and lines[0].time and lines[0].pid == os.getpid()
    assert lines[1].message.startswith("send failed\nTraceback (most recent call last):\n")
    assert lines[1].message.endswith("ValueError: bad\nnumber 15*******99")
    assert lines[2].message == "two\nlines" and lines[3].pid == 77 and lines[3].time is None
    assert text.splitlines()[-1] == "<3>  | b"  # under journald every line keeps its priority


@pytest.mark.parametrize("bad", [
    "Traceback (most recent call last):",  # a bare traceback: not through logging
    "2026-01-01 12:00:00,000 simnet INFO listening",  # simnet's old style
    "INFO:root:hello",
    "  | a continuation with nothing before it",
])
def test_parse_log_names_the_first_foreign_line(bad):
    good = LineFormatter().format(record("fine"))
    with pytest.raises(ValueError, match="line 1 is not a waport log line"):
        list(parse_log([bad, good]))
    assert parse_line(bad) is None


# ---------------------------------------------------------------- journald's native protocol


def test_journal_datagrams_round_trip_binary_safe_values():
    fields = [("MESSAGE", "line one\nline two"), ("PRIORITY", 4), ("WAPORT_COMPANY", "acme"), ("EMPTY", "")]
    data = journald.encode(fields)
    assert b"PRIORITY=4\n" in data and b"MESSAGE\n" + struct.pack("<Q", 17) + b"line one\nline two\n" in data
    assert journald.decode(data) == [(k, str(v).encode()) for k, v in fields]
    with pytest.raises(ValueError):
        journald.encode([("_PID", "1")])  # journald's trusted fields are not ours to set
    with pytest.raises(ValueError):
        journald.encode([("lower", "x")])


def test_journal_fields_of_a_worker_record_and_of_the_supervisor_about_a_company():
    fmt = LineFormatter(journald=True, program="waportd", prefix=False)
    r = record("connected as %s", "15550109999", level=logging.WARNING, company="acme", process=4242,
               program="worker", event="connected", funcName="connect", lineno=12)
    fields = dict(journal_fields(r, fmt))
    assert fields["MESSAGE"] == "worker[acme/4242] WARNING waport.test: connected as 15*******99"
    assert (fields["PRIORITY"], fields["SYSLOG_IDENTIFIER"], fields["SYSLOG_PID"]) == (4, "waport-worker", 4242)
    assert (fields["WAPORT_COMPANY"], fields["WAPORT_EVENT"]) == ("acme", "connected")
    assert (fields["CODE_FILE"], fields["CODE_LINE"], fields["CODE_FUNC"]) == (__file__, 12, "connect")
    assert parse_line(fields["MESSAGE"]).company == "acme"  # `journalctl -o cat` reads like the stderr lines
    got = CollectRecords()
    log = logging.getLogger("waport.test.about")
    log.addHandler(got)
    try:
        About(log, "acme").warning("acme: worker exited", extra={"event": "exit"})
    finally:
        log.removeHandler(got)
    mine = dict(journal_fields(got.records[0], fmt))
    assert mine["SYSLOG_IDENTIFIER"] == "waportd" and mine["WAPORT_COMPANY"] == "acme"
    assert mine["WAPORT_EVENT"] == "exit" and mine["MESSAGE"].startswith(f"waportd[{os.getpid()}] WARNING ")
    assert "WAPORT_COMPANY" not in dict(journal_fields(record("boot"), fmt))


@pytest.fixture
def journal_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "journal.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def receive_entry(sock: socket.socket) -> dict[str, bytes]:
    """One entry as journald reads it: the datagram, or the sealed memfd passed with it."""
    data, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fd = struct.unpack("i", raw[:4])[0]
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                assert seals & journald.SEALS == journald.SEALS  # journald refuses an unsealed memfd
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
    return dict(journald.decode(data))


def test_the_handler_sends_entries_and_a_huge_one_through_a_memfd(journal_socket):
    sock, path = journal_socket
    fallback = CollectRecords()
    handler = JournalHandler("api", fallback, JournalSender(path))
    handler.handle(record("listening", company=None))
    entry = receive_entry(sock)
    assert entry["SYSLOG_IDENTIFIER"] == b"waport-api" and entry["PRIORITY"] == b"6"
    assert entry["MESSAGE"] == f"api[{os.getpid()}] INFO waport.test: listening".encode()
    huge = "x" * 400_000 + "\nend"  # over the datagram limit (wmem_default)
    handler.handle(record(huge, level=logging.ERROR))
    entry = receive_entry(sock)
    assert entry["MESSAGE"].endswith(b"x\n  | end") and len(entry["MESSAGE"]) > 400_000
    assert not fallback.records


def test_the_handler_falls_back_to_stderr_lines_when_the_socket_is_gone(tmp_path):
    out = io.StringIO()
    stream = logging.StreamHandler(out)
    stream.setFormatter(LineFormatter(journald=True, program="webhooks"))
    handler = JournalHandler("webhooks", stream, JournalSender(str(tmp_path / "absent.sock")))
    handler.handle(record("first", level=logging.WARNING))
    handler.handle(record("second"))
    lines = list(parse_log(out.getvalue()))
    assert [(x.priority, x.message) for x in lines][1:] == [(4, "first"), (6, "second")]
    assert lines[0].logger == "waport.log" and "absent.sock" in lines[0].message  # said once, not per line
    # The socket back: stderr until the retry time (a journald that hangs costs one timeout), then the journal.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "absent.sock"))
        sock.settimeout(5)
        handler.handle(record("third"))
        assert list(parse_log(out.getvalue()))[-1].message == "third"
        handler.retry_at = 0.0
        handler.handle(record("fourth"))
        assert receive_entry(sock)["MESSAGE"].endswith(b"waport.test: fourth")
        assert "fourth" not in out.getvalue()


def test_stderr_handler_picks_the_journal_only_when_stderr_is_the_journal_stream(tmp_path, monkeypatch):
    with open(tmp_path / "stderr", "w") as fh:
        assert isinstance(stderr_handler("simnet", fh), logging.StreamHandler)
        st = os.fstat(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setenv(journald.SOCKET_ENV, str(tmp_path / "j.sock"))
        handler = stderr_handler("simnet", fh)
        assert isinstance(handler, JournalHandler) and handler.sender.path == str(tmp_path / "j.sock")


def test_warnings_and_uncaught_exceptions_become_records():
    import sys
    import threading
    import warnings

    root = logging.getLogger()
    saved = root.handlers[:], root.level, sys.excepthook, threading.excepthook
    try:
        out = io.StringIO()
        logging.captureWarnings(False)  # pytest put its own recorder back after an earlier test's capture
        log_to_stderr("info", "waportctl", out)
        warnings.warn("old option", DeprecationWarning, stacklevel=1)
        try:
            raise KeyError("boom")
        except KeyError:
            sys.excepthook(*sys.exc_info())
        t = threading.Thread(target=lambda: 1 / 0, name="helper")
        t.start()
        t.join()
        lines = list(parse_log(out.getvalue()))
        assert [(x.program, x.logger, x.level) for x in lines] == [
            ("waportctl", "py.warnings", "WARNING"), ("waportctl", "waport.crash", "CRITICAL"),
            ("waportctl", "waport.crash", "CRITICAL")]
        assert "DeprecationWarning: old option" in lines[0].message and "KeyError: 'boom'" in lines[1].message
        assert lines[2].message.startswith("uncaught exception in thread helper\n")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        sys.excepthook, threading.excepthook = saved[2], saved[3]
        logging.captureWarnings(False)
