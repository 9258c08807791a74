"""One log line format for waportd and its workers: journald-aware, company-tagged, phones masked.

Both sides use it: the supervisor for its own records and for the worker records it re-emits
(workers forward theirs over the worker protocol, see `workers/logforward.py`), and a worker
for the few lines it writes to stderr itself (before it reached the supervisor, after it left).

- Under systemd (`JOURNAL_STREAM` names our stderr) a line starts with a `<N>` syslog priority,
  so `journalctl -p warning` works, and carries no timestamp (the journal adds one).
- Every line names its origin: `waportd[pid]`, or `worker[<company>/<pid>]` for a worker's.
- Phone numbers in messages and tracebacks are masked (`ipc.validation.mask_phone`): runs of
  8-15 bare digits (also a JID's user part) and `+` numbers of 7-15 digits, with spaces, dashes or
  parentheses. Bare 7-digit runs stay: process ids reach 7 digits (pid_max 4194304), and a
  number without its country code is not a WhatsApp address. Byte counts and timestamps in our
  own messages are written with units or decimals so they are not mistaken for numbers.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import IO

from ipc.validation import mask_phone

# A `+` number with separators, or a bare 8-15 digit run; not inside words, decimals or longer runs.
PHONE_RE = re.compile(r"(?<![\w.+])(?:\+\d[\d \-()]{5,22}\d|\d{8,15})(?![\w]|\.\d)")

SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

PLAIN_FORMAT = "%(asctime)s %(origin)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "<%(priority)d>%(origin)s %(levelname)s %(name)s: %(message)s"


def mask_phones(text: str) -> str:
    """`text` with every phone-number-looking run masked; other text unchanged."""

    def one(m: re.Match[str]) -> str:
        raw = m.group(0)
        digits = re.sub(r"\D", "", raw)
        if not 7 <= len(digits) <= 15:
            return raw
        return ("+" if raw.startswith("+") else "") + mask_phone(digits)

    return PHONE_RE.sub(one, text)


def priority(levelno: int) -> int:
    """The syslog priority for a logging level (levels between the named ones round down)."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return SYSLOG_PRIORITY[logging.DEBUG]


def under_journald(stream: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` (default stderr's descriptor) is the journal stream systemd gave us.

    systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected; a child whose stderr
    was redirected elsewhere inherits the variable, so the descriptor is compared too.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno() if stream is not None else 2)
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class LineFormatter(logging.Formatter):
    """Formats records as `[time|<prio>] origin LEVEL logger: message`, phone numbers masked."""

    def __init__(self, journald: bool = False, program: str = "waportd") -> None:
        super().__init__(JOURNAL_FORMAT if journald else PLAIN_FORMAT)
        self.journald = journald
        self.program = program  # the origin of records without a company: waportd, api

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        import time

        t = time.localtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}" + time.strftime("%z", t)

    def format(self, record: logging.LogRecord) -> str:
        # A copy: other handlers of the same record must see it unchanged.
        copy = logging.makeLogRecord(record.__dict__)
        copy.msg, copy.args = mask_phones(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            copy.exc_text = self.formatException(record.exc_info)
        if copy.exc_text:
            copy.exc_text = mask_phones(copy.exc_text)
        copy.exc_info = None
        company = getattr(record, "company", None)
        copy.origin = f"worker[{company}/{record.process}]" if company else f"{self.program}[{record.process}]"
        copy.priority = priority(record.levelno)
        return super().format(copy)


class CompanyTag(logging.Filter):
    """Marks a worker's own records with its company, so its stderr lines say whose they are."""

    def __init__(self, company: str) -> None:
        super().__init__()
        self.company = company

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "company", None):
            record.company = self.company
        return True


def log_to_stderr(level: str, program: str = "waportd", stream: IO[str] | None = None) -> logging.Handler:
    """Every process of ours logs one way: the root's one handler, on stderr, journald-aware."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(journald=under_journald(stream), program=program))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler
