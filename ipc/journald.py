"""journald's native protocol: one datagram of fields per log entry, no libsystemd needed.

systemd's "Native Journal Protocol": `KEY=value\\n` per field, or for a value with a newline (or any
byte a line cannot carry) `KEY\\n` + the value's length as 64-bit little endian + the value + `\\n`.
A datagram too large for the socket travels as a sealed memfd passed with SCM_RIGHTS, as
sd_journal_send does. python-systemd's JournalHandler does the same through libsystemd (a C
extension and a system library); the protocol is this small, so it is ours.

Where: `/run/systemd/journal/socket`; `WAPORT_JOURNAL_SOCKET` names another (a journald namespace
run by hand, the tests). Under `LogNamespace=` systemd mounts the namespace's socket at that path.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterable

SOCKET = "/run/systemd/journal/socket"
SOCKET_ENV = "WAPORT_JOURNAL_SOCKET"
SEND_TIMEOUT = 1.0  # a journald that does not read for a second: the line goes to stderr instead
FIELD_RE = re.compile(r"^[A-Z0-9][A-Z0-9_]{0,63}$")  # no leading `_`: those are journald's trusted fields
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

Fields = Iterable[tuple[str, "str | bytes | int"]]


def socket_path(environ: dict[str, str] | None = None) -> str:
    """The journal's native socket: the standard path unless WAPORT_JOURNAL_SOCKET names one."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    return environ.get(SOCKET_ENV) or SOCKET


def encode(fields: Fields) -> bytes:
    """The datagram for `fields`; a value with a newline in the binary-safe form. Bad keys raise ValueError."""
    out = bytearray()
    for key, value in fields:
        if not FIELD_RE.match(key):
            raise ValueError(f"not a journal field name: {key!r}")
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        if b"\n" in raw:
            out += key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += key.encode() + b"=" + raw + b"\n"
    return bytes(out)


def decode(data: bytes) -> list[tuple[str, bytes]]:
    """The fields of a datagram, by the protocol's rules (what journald does; for tests and tools)."""
    fields: list[tuple[str, bytes]] = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            if data[nl + 9 + size:nl + 10 + size] != b"\n":
                raise ValueError(f"field {key!r}: no newline after {size} bytes")
            i = nl + 10 + size
        fields.append((key.decode(), value))
    return fields


class JournalSender:
    """Sends entries to journald's native socket; OSError when it cannot (the caller falls back)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or socket_path()
        self.sock: socket.socket | None = None

    def send(self, fields: Fields) -> None:
        data = encode(fields)
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.settimeout(SEND_TIMEOUT)
        try:
            self.sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """A large entry: written to a sealed memfd whose descriptor journald reads (as sd_journal_send)."""
        assert self.sock is not None
        fd = os.memfd_create("waport-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
