"""systemd's notify protocol, in a few lines of socket code (no libsystemd binding needed).

`Type=notify`: READY=1 once the sockets are bound, STATUS= when the session counts change
(throttled), WATCHDOG=1 every WATCHDOG_USEC/2 from the main loop (a hung loop gets the daemon
restarted), STOPPING=1 when shutdown begins. Datagrams go to $NOTIFY_SOCKET (a path, or an
abstract address starting with `@`). Without NOTIFY_SOCKET every call is a no-op; a send that
fails is dropped (notification is best effort, as in sd_notify(3)).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Iterable, MutableMapping

from ipc.states import ALL, CONNECTED

log = logging.getLogger("waport.sdnotify")

STATUS_MIN_INTERVAL = 1.0  # seconds between two STATUS= updates


def address_of(value: str) -> str | bytes:
    """The socket address for a NOTIFY_SOCKET value: `@name` is Linux's abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def status_text(states: Iterable[str]) -> str:
    """"42 connected, 3 backoff, 1 failed": connected first, then the other states in table order."""
    counts = Counter(states)
    if not counts:
        return "no sessions"
    order = [CONNECTED, *[s for s in ALL if s != CONNECTED]]
    order += sorted(s for s in counts if s not in order)
    return ", ".join(f"{counts[s]} {s}" for s in order if counts[s])


class Notifier:
    """Sends notify datagrams; the watchdog interval comes from WATCHDOG_USEC when it is ours."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address_of(address) if address else None
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self.sock: socket.socket | None = None
        self.next_watchdog = 0.0
        self.last_status: str | None = None
        self.pending_status: str | None = None
        self.status_sent_at = float("-inf")

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, unset: bool = True) -> Notifier:
        """Read (and by default remove, so workers do not inherit them) the systemd variables."""
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        wd_pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (not wd_pid or wd_pid == str(os.getpid())):
            usec = int(env["WATCHDOG_USEC"]) or None
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of newline-separated `KEY=VALUE` fields; False when it could not go."""
        if self.address is None:
            return False
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self.sock.setblocking(False)
            self.sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", fields[0] if fields else "", exc)
            return False

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str, now: float) -> None:
        """STATUS= when it changed, at most once per STATUS_MIN_INTERVAL (the last change wins)."""
        if text == self.last_status:
            self.pending_status = None
            return
        self.pending_status = text
        self.flush_status(now)

    def flush_status(self, now: float) -> None:
        if self.pending_status is None or now - self.status_sent_at < STATUS_MIN_INTERVAL:
            return
        text, self.pending_status = self.pending_status, None
        if self.send(f"STATUS={text}"):
            self.last_status, self.status_sent_at = text, now

    def watchdog(self, now: float) -> None:
        """WATCHDOG=1 when half the interval has passed; call it from the main loop."""
        if self.watchdog_interval is None or now < self.next_watchdog:
            return
        self.next_watchdog = now + self.watchdog_interval
        self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")
        self.last_status = status

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

