"""Which event topics anyone listens to, as the events socket (XPUB) reports them.

An event nobody subscribed to would be encoded only for ZeroMQ to drop it: at 1,000 sends/s
that is two thirds of the supervisor's event work. XPUB passes on the first subscription to a
prefix and the last unsubscription (a subscriber that disconnects unsubscribes), so a set of
prefixes mirrors what the socket itself filters by.
"""

from __future__ import annotations


class Subscriptions:
    def __init__(self) -> None:
        self.prefixes: set[bytes] = set()

    def feed(self, frame: bytes) -> None:
        """One message read from the XPUB socket: b"\\x01" + prefix subscribes, b"\\x00" + prefix leaves."""
        if frame[:1] == b"\x01":
            self.prefixes.add(bytes(frame[1:]))
        elif frame[:1] == b"\x00":
            self.prefixes.discard(bytes(frame[1:]))

    def wants(self, topic: bytes) -> bool:
        return any(topic.startswith(prefix) for prefix in self.prefixes)
