"""The supervisor's side of DESIGN.md §6: accept sends durably, route inbound messages to the sinks.

A send is validated, rate limited and journaled (per-company SQLite) before it is answered,
then the worker is nudged to send it. Inbound messages go to the events socket and, with
Redis, to `waport:inbox`; the worker hears an ACK only when every sink has them.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ipc import events, protocol
from ipc.errors import BAD_REQUEST, NOT_CONNECTED, NOT_FOUND, RATE_LIMITED, UNKNOWN_COMPANY, WaportError
from ipc.journal import Busy, Journal, storage_error
from ipc.mediastore import MediaStore
from ipc.richmessage import INBOUND_FIELDS, SEND_ARGS, check_media, parse_send
from ipc.states import REFUSES_SENDS
from ipc.validation import is_utf8, mask_phone, normalize_phone, validate_company
from waportd.journalsync import GroupSync
from waportd.ratelimit import FallbackLimiter, Limits
from waportd.redis_bridge import INBOX, RedisBridge, client_for
from waportd.roster import Roster
from waportd.services import Services

log = logging.getLogger("waport.messages")

Done = Callable[[dict[str, Any]], None]
Failed = Callable[[WaportError], None]
OPEN_JOURNALS = 256
LOCK_WAIT = 0.5  # seconds a read of the journal may wait (a write never waits: it tries again next turn)
SEEN_INBOUND = 100_000
ACK_IDS = 1000  # ids per ACK frame: far below the 1 MiB frame limit whatever a turn brought in


# What a `waport:inbox` entry carries of an inbound message: always, the §11 INBOUND_FIELDS when present, and
# of its media (§6, §11).
INBOX_FIELDS = ("id", "chat", "from", "push_name", "type", "text", "ts", "is_group")
INBOX_MEDIA = {"media_id": "id", "mimetype": "mimetype", "size": "size", "sha256": "sha256", "media_status": "status"}


def limits_of(cfg: Any) -> Limits:
    return Limits(cfg.rate_limit_max, cfg.rate_limit_window, cfg.rate_limit_company_max)


class MessageDesk:
    def __init__(self, services: Services, roster: Roster, bridge: RedisBridge | None,
                 observe_latency: Callable[[float], None], store: Callable[[], MediaStore] | None = None,
                 wake: Callable[[], None] | None = None) -> None:
        self.services = services
        self.store = store
        # journal_sync = "full": answers wait for a grouped fsync of the journal (waportd/journalsync.py)
        # (cluster mode: PostgreSQL's commit is durable itself)
        self.syncer = (GroupSync(wake or (lambda: None))
                       if services.cfg.journal_sync == "full" and not services.cfg.cluster_dsn else None)
        self.roster = roster
        self.bridge = bridge
        self.observe_latency = observe_latency
        cfg = services.cfg
        self.journals: OrderedDict[str, Journal] = OrderedDict()
        self.cluster_db: Any = None  # cluster mode: one connection for every company's journal in PostgreSQL
        self.seen: OrderedDict[tuple[str, str], None] = OrderedDict()  # inbound already published
        self.batch: dict[str, list[tuple[Any, ...]]] = {}  # (recipient, text, key, source, type, fields, on_done)
        self.acks: dict[str, list[str]] = {}  # inbound ids every sink has, sent at the end of the turn
        client = client_for(cfg.redis_url, timeout=0.2) if cfg.redis_url else None
        self.limiter = FallbackLimiter(limits_of(cfg), client)

    def close(self) -> None:
        if self.syncer is not None:
            self.syncer.close()
        for journal in self.journals.values():
            journal.close()
        self.journals.clear()
        if self.cluster_db is not None:
            self.cluster_db.close()

    def reconfigure(self, cfg: Any) -> None:
        self.limiter.memory.limits = limits_of(cfg)
        if self.limiter.redis:
            self.limiter.redis.limits = limits_of(cfg)

    def journal(self, company: str) -> Journal:
        journal = self.journals.get(company)
        if journal is None and self.services.cfg.cluster_dsn:
            journal = self.journals[company] = self.cluster_journal(company)
        if journal is None:
            session_dir = os.path.join(self.services.cfg.state_dir, "sessions", company)
            os.makedirs(session_dir, mode=0o700, exist_ok=True)
            # The loop never checkpoints, and never sleeps on the worker's write lock (see `flush`).
            journal = self.journals[company] = Journal.in_session(session_dir, LOCK_WAIT, checkpoints=False)
            while len(self.journals) > OPEN_JOURNALS:
                self.journals.popitem(last=False)[1].close()
        self.journals.move_to_end(company)
        return journal

    def cluster_journal(self, company: str) -> Any:
        """Cluster mode (DESIGN.md §12): the company's journal is in PostgreSQL, so its queued sends move with
        it. This host appends sends and reads; only the lease holder's worker takes and settles them."""
        from ipc.pgjournal import PgJournal  # psycopg: only in cluster mode

        return PgJournal(self.cluster_connection(), company)

    def cluster_connection(self) -> Any:
        """The one PostgreSQL connection every company's journal shares on this loop."""
        if self.cluster_db is None:
            from ipc.clusterschema import supervisor_name
            from ipc.pgdb import PgDb

            cfg = self.services.cfg
            self.cluster_db = PgDb(cfg.cluster_dsn, supervisor_name(cfg.host_id, "journal"))
        return self.cluster_db

    def forget(self, company: str) -> None:
        journal = self.journals.pop(company, None)
        if journal:
            journal.close()

    # ------------------------------------------------------------ outbound

    def accept(self, args: dict[str, Any], on_done: Done, source: str = "control",
               on_fail: Failed | None = None) -> None:
        """Validate, de-duplicate, rate limit, then journal with the turn's batch: the one path for every send.

        `args` are the `send` command's (DESIGN.md §4, §11). Refusals raise `WaportError` at once;
        `on_done(result)` runs after the batch is committed (`flush`), so an answer is never given
        before the message is durable; `on_fail(error)` if the commit fails (a full disk).
        """
        sv = self.services
        company = validate_company(args.get("company"))
        c = self.roster.get(company)
        if c is None:
            raise WaportError(UNKNOWN_COMPANY, f"no session for company {company!r}; start it first")
        recipient = normalize_phone(args.get("to"))
        spec = parse_send(args)
        key = args.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200 or not is_utf8(key)):
            raise WaportError(BAD_REQUEST, "idempotency_key must be a string of 1-200 characters")
        journal = self.journal(company)
        if key is not None:
            first = journal.by_key(key)
            if first is not None:
                on_done(first.result())
                return
        fields = spec.fields
        info = None
        if spec.media is not None:
            store = self.media_store()
            info = store.info(spec.media)
            fields = check_media(spec, info, store.max_bytes)
        for ref in spec.references:
            if journal.reference(ref) is None:
                raise WaportError(NOT_FOUND, f"no message {ref[:40]!r} in {company}'s journal to "
                                             f"{'react' if ref == fields.get('reaction_to') else 'reply'} to")
        if c.state in REFUSES_SENDS or not self.roster.is_wanted(company):
            raise WaportError(NOT_CONNECTED, f"{company} is {c.state} and will not send until it is started "
                                             "(waportctl restart)", state=c.state)
        decision = self.limiter.check(company, recipient)
        if not decision.allowed:
            sv.counters[("rate_limited", company)] += 1
            sv.publish(company, events.RATE_LIMITED, {"to": recipient, "retry_after_ms": decision.retry_after_ms},
                       None)
            raise WaportError(RATE_LIMITED, f"too many messages to {mask_phone(recipient)}; retry in "
                                            f"{decision.retry_after_ms} ms", retry_after_ms=decision.retry_after_ms)
        if info is not None and company not in info.owners:  # the company sent it: its token may read it back
            self.media_store().record(info.media_id, info.size, info.mimetype, company, None)
        self.batch.setdefault(company, []).append(
            (recipient, spec.text, key, source, spec.type, fields, on_done, on_fail or _log_failure))

    def media_store(self) -> MediaStore:
        if self.store is None:
            raise WaportError(BAD_REQUEST, "this daemon keeps no media")
        return self.store()

    def queued_media(self) -> set[str]:
        """Media that sends not yet out still need, across the companies here (kept past media_retention)."""
        keep: set[str] = set()
        for c in self.roster:
            keep |= self.journal(c.name).queued_media()
        return keep

    def flush(self) -> None:
        """Commit the turn's accepted sends, one transaction per company, then answer and nudge the workers."""
        counters = self.services.counters
        batch, self.batch = self.batch, {}
        appended = self.enqueue_cluster(batch) if self.services.cfg.cluster_dsn and batch else None
        for company, items in batch.items():
            try:
                if appended is not None:
                    results = appended[company]
                    if isinstance(results, BaseException):
                        raise results
                else:
                    results = self.journal(company).enqueue_many(company, [item[:6] for item in items], wait=False)
            except Busy:
                self.batch.setdefault(company, [])[:0] = items  # the worker is writing: next turn, in order
                continue
            except sqlite3.Error as exc:  # nothing was written: every caller hears why, the loop goes on
                self.refuse(company, items, storage_error(exc))
                continue
            created = sum(1 for _, new in results if new)
            counters[("accepted", company)] += created
            answer = functools.partial(self.answer, company, created, results, items)
            if self.syncer is None:
                answer()
            else:
                self.syncer.after(self.journal(company).path, answer)

    def enqueue_cluster(self, batch: dict[str, list[tuple[Any, ...]]]) -> dict[str, Any]:
        """Cluster mode: the turn's sends of every company in one transaction and one round trip; each
        company's results, or the error all of them met."""
        from ipc.pgjournal import enqueue_all

        try:
            return enqueue_all(self.cluster_connection(),
                               {c: [item[:6] for item in items] for c, items in batch.items()})
        except sqlite3.Error as exc:  # PgUnavailable: nothing was committed
            return dict.fromkeys(batch, exc)

    def answer(self, company: str, created: int, results: list[tuple[Any, bool]], items: list[tuple[Any, ...]]) -> None:
        """The batch is durable: the worker may send it, and its callers hear it."""
        c = self.roster.get(company)
        if c is not None:
            c.session.queued += created
            c.nudge()
        for (message, _), item in zip(results, items, strict=True):
            item[6](message.result())

    def refuse(self, company: str, items: list[tuple[Any, ...]], error: WaportError) -> None:
        self.services.counters[("error", company, error.code)] += len(items)
        log.warning("%s: %d sends refused: %s", company, len(items), error.message)
        for item in items:
            item[7](error)

    def take_synced(self) -> None:
        if self.syncer is not None:
            self.syncer.take_done()

    def on_outcome(self, company: str, type_: str, data: dict[str, Any]) -> None:
        counters = self.services.counters
        if type_ == events.SENT:
            counters[("sent", company)] += 1
            latency = data.get("latency")
            if isinstance(latency, (int, float)):
                self.observe_latency(latency)
        else:
            counters[("failed", company, str(data.get("reason", "error")))] += 1

    def listing(self, company: str, limit: int) -> dict[str, Any]:
        journal = self.journal(company)
        return {"company": company, "counts": journal.counts(),
                "outbound": [m.public() for m in journal.recent_outbound(limit)],
                "inbound": journal.recent_inbound(limit)}

    # ------------------------------------------------------------ inbound

    def on_inbound(self, company: str, data: dict[str, Any], ts: float) -> None:
        msg_id = data.get("id")
        if not isinstance(msg_id, str):
            self.services.counters[("malformed", "event")] += 1
            return
        key = (company, msg_id)
        if key not in self.seen:
            self.seen[key] = None
            while len(self.seen) > SEEN_INBOUND:
                self.seen.popitem(last=False)
            self.services.counters[("received", company)] += 1
            self.services.publish(company, events.MESSAGE, data, ts)
        if self.bridge:
            entry = {"company": company, **{k: data.get(k) for k in INBOX_FIELDS},
                     **{k: data[k] for k in INBOUND_FIELDS if k in data}}
            media = data.get("media")
            if isinstance(media, dict):
                entry.update({name: media.get(k) for name, k in INBOX_MEDIA.items()})
            self.bridge.put_stream(INBOX, entry, token=key)
        else:
            self.ack(company, msg_id)

    def ack(self, company: str, msg_id: str) -> None:
        self.acks.setdefault(company, []).append(msg_id)

    def flush_acks(self) -> None:
        """One ACK per worker per turn: a redelivered backlog of 100 messages is acknowledged in one frame."""
        acks, self.acks = self.acks, {}
        for company, ids in acks.items():
            c = self.roster.get(company)
            if c is not None and c.ready:  # else the successor redelivers, and hears the ACK then
                for start in range(0, len(ids), ACK_IDS):
                    c.send(protocol.ACK, {"ids": ids[start:start + ACK_IDS]})

    def take_bridge_results(self) -> None:
        """Inbox entries Redis took are acknowledged; outbox entries from producers are sent."""
        if not self.bridge:
            return
        for kind, item in self.bridge.take_results():
            if kind == "added":
                company, msg_id = item
                self.ack(company, msg_id)
            elif kind == "outbox":
                self.from_stream(*item)
            elif kind == "up":
                self.mirror_all()

    def from_stream(self, entry_id: str, fields: dict[str, str]) -> None:
        """A producer's XADD to waport:outbox: the same send path, the entry id as the default key."""
        company = fields.get("company", "")
        key = fields.get("idempotency_key") or f"redis:{entry_id}"
        bridge = self.bridge
        assert bridge is not None

        def answer(result: dict[str, Any]) -> None:
            bridge.put_outbox_result(entry_id, {"company": company, "idempotency_key": key, "ts": time.time(),
                                                **result})

        def reject(exc: WaportError) -> None:
            answer({"ok": False, "status": "rejected", "error": exc.code, "message": exc.message})

        # a producer's entry is all strings: the §11 fields it may carry, the numbers among them read below
        args: dict[str, Any] = {k: fields[k] for k in ("to", *SEND_ARGS) if k in fields}
        args.update(company=company, idempotency_key=key)
        try:
            for number in ("latitude", "longitude"):
                if number in args:
                    args[number] = _number(args[number], number)
            if "voice" in args:
                args["voice"] = args["voice"].lower() in ("1", "true", "yes")
            self.accept(args, lambda r: answer({"ok": True, **r}), source="redis", on_fail=reject)
        except WaportError as exc:
            reject(exc)

    def mirror_all(self) -> None:
        """Every session record to the Redis mirror (it has a TTL; and Redis may have come back empty)."""
        if self.bridge:
            for c in self.roster:
                self.bridge.put_mirror(c.name, c.record())


def _number(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise WaportError(BAD_REQUEST, f"{name}: a number") from None


def _log_failure(error: WaportError) -> None:
    """A caller that cannot be told (none passed `on_fail`): the warning of `refuse` is all there is."""
