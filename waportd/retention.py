"""Retention and erasure of the journals' messages: `journal_retention` and `messages purge`.

Message texts would otherwise stay in the journals forever. The sweep erases, company by company and
a few per loop turn, the ended sends and the delivered inbound messages older than the retention;
`messages_purge` does the same at once for an erasure request (a date, a chat). Sends not yet out are
never erased: they were promised. The media that erased inbound messages had stored go with them.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from typing import Any

from ipc.errors import BAD_REQUEST, TIMEOUT, WaportError
from ipc.journal import Purged
from ipc.validation import normalize_phone
from waportd.media import MediaDesk
from waportd.messages import MessageDesk
from waportd.roster import Roster
from waportd.services import Services

log = logging.getLogger("waport.retention")

SWEEP_BATCH = 20  # journals per loop turn: 2,000 companies are swept within 100 turns
ROWS_PER_PASS = 5000  # rows per table per journal and pass: a year of backlog goes over several passes
MAX_SWEEP_EVERY = 3600.0  # the sweep runs every retention / 4, at most hourly


def sweep_every(retention: float) -> float:
    return min(MAX_SWEEP_EVERY, max(1.0, retention / 4))


class Retention:
    def __init__(self, services: Services, roster: Roster, messages: MessageDesk, media: MediaDesk) -> None:
        self.services = services
        self.roster = roster
        self.messages = messages
        self.media = media
        self.queue: deque[str] = deque()
        self.next_sweep = 0.0

    def tick(self, wall: float) -> None:
        """From the loop (about once a second): start a sweep when due, then sweep a batch of journals."""
        retention = self.services.cfg.journal_retention
        if retention <= 0:
            self.queue.clear()
            return
        if not self.queue:
            if wall < self.next_sweep:
                return
            self.next_sweep = wall + sweep_every(retention)
            self.queue.extend(c.name for c in self.roster)
        for _ in range(min(SWEEP_BATCH, len(self.queue))):
            name = self.queue.popleft()
            if self.roster.get(name) is None:
                continue
            try:
                purged = self.erase(name, wall - retention, None, ROWS_PER_PASS)
            except sqlite3.OperationalError as exc:  # the worker holds the write lock: the next sweep
                log.debug("%s: retention sweep deferred (%s)", name, exc)
                continue
            if purged.outbound == ROWS_PER_PASS or purged.inbound == ROWS_PER_PASS:
                self.queue.append(name)  # more to erase: after the others
            if purged.outbound or purged.inbound:
                self.services.counters[("purged", name)] += purged.outbound + purged.inbound
                log.info("%s: %d sends and %d inbound messages older than the journal retention erased",
                         name, purged.outbound, purged.inbound)

    def erase(self, company: str, before: float, chat: str | None, limit: int | None) -> Purged:
        purged = self.messages.journal(company).purge(before, chat, limit)
        if purged.inbound_media:
            keep = self.messages.journal(company).queued_media()  # other companies' sends own their files
            for media_id in purged.inbound_media:
                self.media.store.release(media_id, company, keep)
        return purged

    def cmd_messages_purge(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """An erasure request: everything of COMPANY (of one chat) before a time, now, in one transaction."""
        name = self.roster.known(args).name
        before = args.get("before")
        now = self.services.clock.time()
        if before is None:
            before = now
        elif isinstance(before, bool) or not isinstance(before, (int, float)) or not 0 <= before <= now + 86400:
            raise WaportError(BAD_REQUEST, "before must be a Unix time (seconds) no later than tomorrow")
        chat = args.get("chat")
        chat = normalize_phone(chat) if chat is not None else None
        try:
            purged = self.erase(name, float(before), chat, None)
        except sqlite3.OperationalError as exc:
            raise WaportError(TIMEOUT, f"the journal is busy ({exc}); try again") from exc
        self.messages.journal(name).compact()
        self.services.counters[("purged", name)] += purged.outbound + purged.inbound
        log.info("%s: erasure request: %d sends and %d inbound messages erased", name, purged.outbound,
                 purged.inbound)
        ok({"company": name, "before": before, "chat": chat, **purged.public()})
