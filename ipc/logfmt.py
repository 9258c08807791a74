"""One log line format for every process of ours: journald-aware, company-tagged, phones masked.

Every process uses it: waportd (its own records and the worker records it re-emits: workers
forward theirs over the worker protocol, see `workers/logforward.py`), a worker for the few
lines it writes to stderr itself, the fork server, the HTTP API server (uvicorn's loggers
included), webhook delivery, the simulated network and waportctl.

- A line is `TIME ORIGIN LEVEL logger: message`; ORIGIN is `PROGRAM[pid]`, or
  `worker[<company>/<pid>]` for a worker's. A record of several lines (a traceback) continues on
  lines that start with `  | `. `parse_log` reads it back (tests, operators' scripts).
- Under systemd (`JOURNAL_STREAM` names our stderr) records go to journald's native socket
  with fields (`journal_fields`; MESSAGE is the line without its time); if that socket is absent
  or a send fails, the line goes to stderr, starting with a `<N>` syslog priority so
  `journalctl -p warning` works, and without a timestamp (the journal adds one).
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
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import IO, Any, NamedTuple

from ipc.journald import JournalSender
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
BARE_FORMAT = "%(origin)s %(levelname)s %(name)s: %(message)s"  # journald's MESSAGE field
CONTINUATION = "  | "
RETRY_AFTER = 5.0  # seconds on stderr after journald's socket failed, before trying it again

# One parser for every line of every process (the `<N>` prefix under journald, the time otherwise).
LINE_RE = re.compile(
    r"^(?:<(?P<priority>[0-7])>)?"
    r"(?:(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}) )?"
    r"(?P<program>[a-z][a-z0-9-]*)\[(?:(?P<company>[A-Za-z0-9_-]{1,50})/)?(?P<pid>\d+)\] "
    r"(?P<level>[A-Z]+|Level \d+) (?P<logger>\S+?): (?P<message>.*)$")
CONTINUATION_RE = re.compile(r"^(?:<[0-7]>)?  \| (?P<text>.*)$")

# The SYSLOG_IDENTIFIER of each program's records (journalctl -t waport-worker).
IDENTIFIERS = {"waportd": "waportd", "waportctl": "waportctl"}


def identifier(program: str) -> str:
    """`waportd`, `waportctl`, else `waport-<program>` (waport-worker, waport-api, waport-simnet, ...)."""
    return IDENTIFIERS.get(program, f"waport-{program}")


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


def record_program(record: logging.LogRecord, default: str) -> str:
    """The program a record comes from: `worker` for a worker's (tagged), else the process's own."""
    return getattr(record, "program", None) or default


class LineFormatter(logging.Formatter):
    """Formats records as `[time|<prio>]origin LEVEL logger: message`, phone numbers masked.

    `journald` leaves the time out and, unless `prefix` is False (the native MESSAGE field), starts
    every line with the record's `<N>` priority.
    """

    def __init__(self, journald: bool = False, program: str = "waportd", prefix: bool = True) -> None:
        fmt = (JOURNAL_FORMAT if prefix else BARE_FORMAT) if journald else PLAIN_FORMAT
        super().__init__(fmt)
        self.journald = journald
        self.prefix = journald and prefix
        self.program = program  # the origin of records of this process: waportd, api, simnet, ...

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
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
        if copy.stack_info:
            copy.stack_info = mask_phones(copy.stack_info)
        program = record_program(record, self.program)
        company = getattr(record, "company", None)
        pid = record.process
        copy.origin = f"{program}[{company}/{pid}]" if program == "worker" and company else f"{program}[{pid}]"
        copy.priority = priority(record.levelno)
        text = super().format(copy)
        if "\n" in text or "\r" in text:  # one record, one header line: the rest are continuation lines
            lead = f"<{copy.priority}>{CONTINUATION}" if self.prefix else CONTINUATION
            text = ("\n" + lead).join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
        return text


class LogLine(NamedTuple):
    """One record read back from a log: a header line and its continuation lines."""

    program: str
    pid: int
    company: str | None
    level: str
    logger: str
    message: str  # continuation lines joined with "\n"
    time: str | None  # absent under journald
    priority: int | None  # present on journald stream lines


def parse_line(line: str) -> LogLine | None:
    """The record a header line starts, or None if `line` is not one."""
    m = LINE_RE.match(line.rstrip("\n"))
    if not m:
        return None
    prio = m.group("priority")
    return LogLine(m.group("program"), int(m.group("pid")), m.group("company"), m.group("level"),
                   m.group("logger"), m.group("message"), m.group("time"), int(prio) if prio else None)


def parse_log(lines: str | Iterable[str]) -> Iterator[LogLine]:
    """The records of a log (text or lines); ValueError names the first line that is not ours."""
    current: LogLine | None = None
    for number, line in enumerate(lines.splitlines() if isinstance(lines, str) else lines, 1):
        line = line.rstrip("\n")
        parsed = parse_line(line)
        if parsed is not None:
            if current is not None:
                yield current
            current = parsed
            continue
        more = CONTINUATION_RE.match(line)
        if more is None or current is None:
            raise ValueError(f"line {number} is not a waport log line: {line[:200]!r}")
        current = current._replace(message=current.message + "\n" + more.group("text"))
    if current is not None:
        yield current


def journal_fields(record: logging.LogRecord, formatter: LineFormatter) -> list[tuple[str, str | int]]:
    """The journald entry of a record: MESSAGE (the line without time), PRIORITY, who and where."""
    program = record_program(record, formatter.program)
    fields: list[tuple[str, str | int]] = [
        ("MESSAGE", formatter.format(record)),
        ("PRIORITY", priority(record.levelno)),
        ("SYSLOG_IDENTIFIER", identifier(program)),
        ("SYSLOG_PID", record.process or os.getpid()),
        ("SYSLOG_FACILITY", 3),  # daemon, as journald gives our stderr lines
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", record.lineno),
        ("CODE_FUNC", record.funcName or ""),
        ("LOGGER", record.name),  # as python-systemd's JournalHandler names it
    ]
    company = getattr(record, "company", None)
    if company:
        fields.append(("WAPORT_COMPANY", company))
    event = getattr(record, "event", None)
    if event:
        fields.append(("WAPORT_EVENT", event))
    return fields


class JournalHandler(logging.Handler):
    """Records to journald's native socket; the `fallback` handler (stderr) when it cannot take them."""

    def __init__(self, program: str, fallback: logging.Handler, sender: JournalSender | None = None) -> None:
        super().__init__()
        self.line = LineFormatter(journald=True, program=program, prefix=False)
        self.fallback = fallback
        self.sender = sender or JournalSender()
        self.failing = False
        self.retry_at = 0.0  # after a failure, stderr only until then: a stuck journald costs one timeout

    def emit(self, record: logging.LogRecord) -> None:
        if self.failing and time.monotonic() < self.retry_at:
            self.fallback.handle(record)
            return
        try:
            self.sender.send(journal_fields(record, self.line))
            self.failing = False
        except (OSError, ValueError) as exc:
            self.retry_at = time.monotonic() + RETRY_AFTER
            if not self.failing:  # say once why the journal lost its fields; the lines go on
                self.failing = True
                note = logging.LogRecord("waport.log", logging.WARNING, __file__, 0,
                                         "journald's socket %s failed (%s); logging to stderr", (self.sender.path, exc),
                                         None, "emit")
                self.fallback.handle(note)
            self.fallback.handle(record)
        except Exception:  # noqa: BLE001 - logging must never break the process
            self.handleError(record)


def stderr_handler(program: str, stream: IO[str] | None = None) -> logging.Handler:
    """Where this process's records go: journald's native socket under systemd, else `stream` (stderr)."""
    stream = sys.stderr if stream is None else stream
    journald = under_journald(stream)
    handler: logging.Handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(journald=journald, program=program))
    if journald:
        handler = JournalHandler(program, handler)
    return handler


def log_to_stderr(level: str, program: str = "waportd", stream: IO[str] | None = None) -> logging.Handler:
    """Every process of ours logs one way: the root's one handler (stderr or the journal).

    Warnings and uncaught exceptions (main thread and others) become records too, so nothing a
    process of ours writes to stderr escapes the format.
    """
    handler = stderr_handler(program, stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    route_stray_output()
    return handler


def route_stray_output() -> None:
    """Python warnings and uncaught exceptions as log records instead of bare stderr text."""
    logging.captureWarnings(True)
    crash = logging.getLogger("waport.crash")

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        crash.critical("uncaught exception", exc_info=(kind, value, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        crash.critical("uncaught exception in thread %s", name,
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]

    sys.excepthook = excepthook
    threading.excepthook = thread_hook


class CompanyTag(logging.Filter):
    """Marks a worker's own records with its company, so its lines say whose they are."""

    def __init__(self, company: str) -> None:
        super().__init__()
        self.company = company

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "company", None):
            record.company = self.company
        if not getattr(record, "program", None):
            record.program = "worker"
        return True


class About(logging.LoggerAdapter):
    """A logger whose records concern one company (journald's WAPORT_COMPANY); the line is unchanged.

    `log.info(..., extra={"event": "state"})` adds WAPORT_EVENT; the company is merged in, not replaced.
    """

    def __init__(self, logger: logging.Logger, company: str) -> None:
        super().__init__(logger, {"company": company})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs
