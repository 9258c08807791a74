"""The message journal in PostgreSQL (cluster mode, DESIGN.md §6 and §12): what `ipc/journal.py` keeps in a
company's SQLite file, in the shared tables waport_outbox and waport_inbox, so a company's queued sends and
undelivered messages move with it to whichever host claims it.

The same methods and the same rules as `Journal`. What differs: any host may append a send (it is durable
once committed, and the owner's worker sends it), but a worker's writes carry its lease epoch and are
refused once the lease holds another (a late worker on a host that lost its lease can neither take a send
nor record an outcome nor journal a message: the new owner's worker does, and a send the old one had begun
stays `sending` until the new one marks it `uncertain` — never resent blindly).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ipc.journal import (
    _IN_SELECT,
    _OUT_COLUMNS,
    ENDED,
    PENDING,
    PENDING_MEDIA,
    QUEUED,
    SENDING,
    Outgoing,
    Purged,
    _inbound,
    _media_status,
    _payload,
    chat_forms,
    extra_fields,
    listed_inbound,
    message_id_for,
)
from ipc.pgdb import PgDb, PgUnavailable

# A worker's write holds only while the lease is at its epoch. FOR SHARE: a claim bumping the epoch waits
# until the write's transaction ends, so the check holds for the whole statement.
_LEASE_HELD = "(SELECT l.epoch FROM waport_leases l WHERE l.company = %(company)s FOR SHARE) = %(epoch)s"
_INSERT_OUT = (
    "INSERT INTO waport_outbox (company, message_id, idempotency_key, recipient, text, status, created, updated,"
    " source, type, payload) VALUES (%(company)s, %(message_id)s, %(key)s, %(recipient)s, %(text)s, 'queued',"
    " %(now)s, %(now)s, %(source)s, %(type)s, %(payload)s) ON CONFLICT DO NOTHING RETURNING seq")


def enqueue_all(db: PgDb, batches: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Outgoing, bool]]]:
    """`PgJournal.enqueue_many` for every company of a loop turn in one transaction, its statements sent in one
    pipeline (one round trip for the turn, not one per send or per company)."""

    def run(conn: Any) -> dict[str, list[tuple[Outgoing, bool]]]:
        now = time.time()
        made: list[tuple[str, Outgoing, Any]] = []
        with conn.transaction():
            with conn.pipeline():
                for company, items in batches.items():
                    for recipient, text, key, source, *rest in items:
                        m = Outgoing(message_id_for(company, key), key, recipient, text, QUEUED, None, None, now, now,
                                     0, source, rest[0] if rest else "text",
                                     _payload(rest[1] if len(rest) > 1 else None))
                        made.append((company, m, conn.execute(_INSERT_OUT, {
                            "company": company, "message_id": m.message_id, "key": key, "recipient": recipient,
                            "text": text, "now": now, "source": source, "type": m.type, "payload": m.payload})))
            out: dict[str, list[tuple[Outgoing, bool]]] = {c: [] for c in batches}
            for company, m, cur in made:
                if cur.fetchone() is not None:
                    out[company].append((m, True))
                    continue
                first = conn.execute(
                    f"SELECT {_OUT_COLUMNS} FROM waport_outbox WHERE company = %(company)s AND"
                    " (idempotency_key = %(key)s OR message_id = %(id)s)",
                    {"company": company, "key": m.idempotency_key, "id": m.message_id}).fetchone()
                if first is None:  # raced with an erasure: the key is free again
                    raise PgUnavailable("the cluster journal (enqueue): a send vanished while it was appended")
                out[company].append((Outgoing(*first), False))
        return out

    return db.call("enqueue", run)


# The media a send not yet out still needs (kept past media_retention): of one company here, of the whole
# outbox in the media store's retention (ipc/pgmediastore.py), which any host runs for every host's sends.
NEEDED_MEDIA_SQL = ("SELECT o.payload::jsonb ->> 'media' FROM waport_outbox o WHERE o.status IN ('queued', 'sending')"
                    " AND o.payload IS NOT NULL")


class Fenced(PgUnavailable):
    """The company's lease holds another epoch: this worker's write was refused."""


class PgJournal:
    def __init__(self, db: PgDb, company: str, epoch: int | None = None) -> None:
        """`epoch`: the worker's lease epoch, carried by each of its writes; None for the supervisor, which
        only appends sends and reads."""
        self.db = db
        self.company = company
        self.epoch = epoch
        self.path = f"postgresql:waport_outbox/{company}"  # what logs and errors name; there is no file

    def close(self) -> None:
        """The connection is the caller's (the supervisor shares one among its journals)."""

    def close_if_idle(self, idle: float) -> bool:
        return self.db.close_if_idle(idle)

    # ------------------------------------------------------------ helpers

    def _params(self, **more: Any) -> dict[str, Any]:
        return {"company": self.company, "epoch": self.epoch, **more}

    def _guard(self) -> str:
        return _LEASE_HELD if self.epoch is not None else "TRUE"

    def _rows(self, what: str, sql: str, **params: Any) -> list[tuple]:
        return self.db.call(what, lambda conn: conn.execute(sql, self._params(**params)).fetchall())

    def _outgoing(self, where: str, what: str, **params: Any) -> list[Outgoing]:
        return [Outgoing(*r) for r in self._rows(
            what, f"SELECT {_OUT_COLUMNS} FROM waport_outbox WHERE company = %(company)s AND {where}", **params)]

    # ------------------------------------------------------------ outbox

    def by_key(self, key: str) -> Outgoing | None:
        found = self._outgoing("idempotency_key = %(key)s", "by_key", key=key)
        return found[0] if found else None

    def by_id(self, message_id: str) -> Outgoing | None:
        found = self._outgoing("message_id = %(id)s", "by_id", id=message_id)
        return found[0] if found else None

    def enqueue(self, company: str, recipient: str, text: str, key: str | None, source: str = "control",
                type_: str = "text", fields: dict[str, Any] | None = None) -> tuple[Outgoing, bool]:
        return self.enqueue_many(company, [(recipient, text, key, source, type_, fields)])[0]

    def enqueue_many(
        self, company: str, items: list[tuple[Any, ...]], wait: bool = True
    ) -> list[tuple[Outgoing, bool]]:
        """Append sends in one transaction; (the message, True), or (the first one, False) for a key seen
        before. `wait` is the SQLite journal's (PostgreSQL has no writer lock to wait for)."""
        return enqueue_all(self.db, {company: items})[company]

    def take_queued(self, limit: int) -> list[Outgoing]:
        """The oldest queued sends, marked `sending` with this worker's epoch (none once the lease moved)."""
        rows = self._rows("take_queued", f"""
            UPDATE waport_outbox SET status = 'sending', updated = %(now)s, attempts = attempts + 1, epoch = %(epoch)s
            WHERE seq IN (SELECT seq FROM waport_outbox WHERE company = %(company)s AND status = 'queued'
                          ORDER BY seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
              AND {self._guard()}
            RETURNING seq, {_OUT_COLUMNS}""", now=time.time(), limit=int(limit))
        rows.sort()
        return [Outgoing(*r[1:]) for r in rows]

    def mark(self, message_id: str, status: str, error: str | None = None, sent_ts: float | None = None) -> None:
        self.mark_many([(message_id, status, error, sent_ts)])

    def mark_many(self, marks: list[tuple[Any, ...]]) -> None:
        """(message_id, status, error, sent_ts[, wa_id]) for each, in one statement; refused (`Fenced`) once
        the lease holds another epoch, so the outcomes of a late worker never overwrite the new owner's.
        One statement, not a transaction over several round trips: its lease check holds its row lock only
        while the server runs it, so a worker starved of CPU never holds up its host's lease renewal."""
        if not marks:
            return
        rows = self._rows("mark", f"""
            UPDATE waport_outbox AS o SET status = m.status, error = m.error, sent_ts = COALESCE(m.sent_ts, o.sent_ts),
                   wa_id = COALESCE(m.wa_id, o.wa_id), updated = %(now)s, attempts = o.attempts + m.more
            FROM unnest(%(ids)s::text[], %(statuses)s::text[], %(errors)s::text[], %(sent)s::float8[],
                        %(wa)s::text[], %(more)s::int[]) AS m(id, status, error, sent_ts, wa_id, more)
            WHERE o.company = %(company)s AND o.message_id = m.id AND {self._guard()}
            RETURNING 1""",
            now=time.time(), ids=[m[0] for m in marks], statuses=[m[1] for m in marks],
            errors=[m[2] for m in marks], sent=[m[3] for m in marks],
            wa=[m[4] if len(m) > 4 else None for m in marks], more=[1 if m[1] == SENDING else 0 for m in marks])
        if not rows and self.epoch is not None and not self._held():
            raise Fenced(f"the lease of {self.company} is no longer at epoch {self.epoch}")

    def _held(self) -> bool:
        row = self._rows("lease", f"SELECT {_LEASE_HELD}")
        return bool(row and row[0][0])

    def interrupted(self) -> list[Outgoing]:
        """At a worker's start: sends begun (by any epoch: a host that died, or this one before a crash)
        whose outcome is unknown become `uncertain`."""
        rows = self._rows("interrupted", f"""
            UPDATE waport_outbox SET status = 'uncertain', error = %(error)s, updated = %(now)s
            WHERE company = %(company)s AND status = 'sending' AND {self._guard()}
            RETURNING seq, {_OUT_COLUMNS}""", error="worker ended during the send; not resent", now=time.time())
        rows.sort()
        return [Outgoing(*r[1:]) for r in rows]

    def pending(self) -> int:
        return self._rows("pending", "SELECT count(*) FROM waport_outbox WHERE company = %(company)s"
                                     " AND status IN ('queued', 'sending')")[0][0]

    def counts(self) -> dict[str, int]:
        return dict(self._rows("counts", "SELECT status, count(*) FROM waport_outbox WHERE company = %(company)s"
                                         " GROUP BY status"))

    def recent_outbound(self, limit: int = 20) -> list[Outgoing]:
        return self._outgoing("TRUE ORDER BY seq DESC LIMIT %(limit)s", "recent_outbound", limit=int(limit))

    def queued_media(self) -> set[str]:
        rows = self._rows("queued_media", NEEDED_MEDIA_SQL + " AND o.company = %(company)s")
        return {m for (m,) in rows if m}

    # ------------------------------------------------------------ inbox

    def inbox_add(self, msg: dict[str, Any]) -> bool:
        """Journal an inbound message; False for a redelivery. Refused (`Fenced`) once the lease moved:
        not journaled, so not acknowledged, and WhatsApp hands it to the new owner."""
        values = self._params(id=msg["id"], chat=msg.get("chat"), sender=msg.get("from"),
                              push_name=msg.get("push_name"), type=msg.get("type"), text=msg.get("text"),
                              ts=msg.get("ts"), is_group=1 if msg.get("is_group") else 0, received=time.time(),
                              payload=_payload(extra_fields(msg)))
        guard = self._guard()

        def run(conn: Any) -> bool:
            row = conn.execute(f"""
                INSERT INTO waport_inbox AS i (company, id, chat, sender, push_name, type, text, ts, is_group, received,
                                             payload)
                SELECT %(company)s, %(id)s, %(chat)s, %(sender)s, %(push_name)s, %(type)s, %(text)s, %(ts)s,
                       %(is_group)s, %(received)s, %(payload)s
                WHERE {guard}
                ON CONFLICT (company, id) DO UPDATE SET copies = i.copies + 1
                RETURNING (xmax = 0)""", values).fetchone()
            if row is None:
                raise Fenced(f"the lease of {self.company} is no longer at epoch {self.epoch}")
            return bool(row[0])

        return self.db.call("inbox_add", run)

    def undelivered(self, received_before: float | None = None, limit: int = 100,
                    downloading: bool = False) -> list[dict[str, Any]]:
        rows = self._rows("undelivered", f"SELECT {_IN_SELECT} FROM waport_inbox WHERE company = %(company)s"
                                         " AND delivered = 0 AND received <= %(before)s ORDER BY received"
                                         " LIMIT %(limit)s",
                          before=time.time() if received_before is None else received_before, limit=int(limit))
        found = [_inbound(r) for r in rows]
        return [m for m in found if downloading == (_media_status(m) == PENDING_MEDIA)]

    def inbound(self, msg_id: str) -> dict[str, Any] | None:
        rows = self._rows("inbound", f"SELECT {_IN_SELECT} FROM waport_inbox WHERE company = %(company)s"
                                     " AND id = %(id)s", id=msg_id)
        return _inbound(rows[0]) if rows else None

    def set_inbound_fields(self, msg_id: str, fields: dict[str, Any]) -> None:
        self.db.call("set_inbound_fields", lambda conn: conn.execute(
            f"UPDATE waport_inbox SET payload = %(payload)s WHERE company = %(company)s AND id = %(id)s"
            f" AND {self._guard()}", self._params(payload=_payload(fields), id=msg_id)))

    def reference(self, msg_id: str) -> dict[str, Any] | None:
        rows = self._rows("reference", "SELECT chat, sender, type, text FROM waport_inbox"
                                       " WHERE company = %(company)s AND id = %(id)s", id=msg_id)
        if rows:
            chat, sender, type_, text = rows[0]
            return {"id": msg_id, "chat": chat, "from": sender, "from_me": False, "type": type_, "text": text or ""}
        rows = self._rows("reference", "SELECT recipient, type, text, wa_id, status FROM waport_outbox"
                                       " WHERE company = %(company)s AND (message_id = %(id)s OR wa_id = %(id)s)"
                                       " LIMIT 1", id=msg_id)
        if rows:
            recipient, type_, text, wa_id, status = rows[0]
            return {"id": wa_id or msg_id, "chat": recipient, "from": "", "from_me": True, "type": type_,
                    "text": text or "", "status": status}
        return None

    def delivered(self, ids: list[str]) -> None:
        if ids:
            self.db.call("delivered", lambda conn: conn.execute(
                "UPDATE waport_inbox SET delivered = 1 WHERE company = %(company)s AND id = ANY(%(ids)s)",
                self._params(ids=list(ids))))

    def senders(self, ids: list[str]) -> dict[str, str]:
        if not ids:
            return {}
        rows = self._rows("senders", "SELECT id, sender FROM waport_inbox WHERE company = %(company)s"
                                     " AND id = ANY(%(ids)s)", ids=list(ids))
        return {i: sender for i, sender in rows if sender}

    def recent_inbound(self, limit: int = 20) -> list[dict[str, Any]]:
        return listed_inbound(self._rows(
            "recent_inbound", f"SELECT {_IN_SELECT}, received, delivered, copies FROM waport_inbox"
                              " WHERE company = %(company)s ORDER BY received DESC LIMIT %(limit)s", limit=int(limit)))

    # ------------------------------------------------------------ retention and erasure

    def purge(self, before: float, chat: str | None = None, limit: int | None = None) -> Purged:
        """As `Journal.purge`: ended sends and delivered inbound messages accepted before `before` go; sends
        not yet out stay."""
        chats = list(chat_forms(chat)) if chat else None
        cap = f" LIMIT {int(limit)}" if limit else ""

        def run(conn: Any) -> Purged:
            p = self._params(before=before, chats=chats, ended=list(ENDED), pending=list(PENDING))
            with conn.transaction():
                out = conn.execute(
                    "DELETE FROM waport_outbox WHERE seq IN (SELECT seq FROM waport_outbox WHERE company = %(company)s"
                    " AND status = ANY(%(ended)s) AND created < %(before)s"
                    " AND (%(chats)s::text[] IS NULL OR recipient = ANY(%(chats)s))"
                    f" ORDER BY seq{cap}) RETURNING seq", p).fetchall()
                inn = conn.execute(
                    "DELETE FROM waport_inbox WHERE company = %(company)s AND id IN (SELECT id FROM waport_inbox"
                    " WHERE company = %(company)s AND delivered = 1 AND received < %(before)s"
                    " AND (%(chats)s::text[] IS NULL OR chat = ANY(%(chats)s))"
                    f" ORDER BY received{cap}) RETURNING payload", p).fetchall()
                kept = conn.execute(
                    "SELECT count(*) FROM waport_outbox WHERE company = %(company)s AND status = ANY(%(pending)s)"
                    " AND created < %(before)s AND (%(chats)s::text[] IS NULL OR recipient = ANY(%(chats)s))",
                    p).fetchone()[0]
            media = {str(m["id"]) for (pl,) in inn
                     if pl and isinstance(m := json.loads(pl).get("media"), dict) and m.get("id")}
            return Purged(len(out), len(inn), kept, sorted(media))

        return self.db.call("purge", run)

    def compact(self) -> None:
        """Nothing to fold: PostgreSQL's autovacuum reclaims erased rows."""
