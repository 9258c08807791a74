"""The per-company message journal (DESIGN.md §6): SQLite in WAL mode under the session directory.

The supervisor appends accepted sends (so `send` is durable before it answers, even while
the worker is restarting) and reads it for `messages`; the worker sends from it, records
outcomes and journals inbound messages. SQLite's locking makes the two writers safe.

`synchronous=NORMAL` in WAL mode survives any process crash (kill -9 included); only a
power loss can drop the last transactions.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from ipc.errors import INTERNAL, WaportError, disk_full

FILENAME = "journal.db"
_ids = random.Random()  # seeded from os.urandom: unique ids, not secrets, without a syscall each

QUEUED = "queued"
SENDING = "sending"
SENT = "sent"
SEND_FAILED = "send_failed"
UNCERTAIN = "uncertain"
PENDING = (QUEUED, SENDING)
ENDED = (SENT, SEND_FAILED, UNCERTAIN)
_OPEN_SQL = "status != 'sent'"  # literally the outbox_open index's condition

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,  -- no AUTOINCREMENT (a page write per insert): a seq reused after an erasure is
                              -- still above every row left, so the queue keeps its order
    message_id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT,
    recipient TEXT NOT NULL,
    text TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    sent_ts REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT 'control',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_key ON outbox(idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Only the rows not sent (queued, sending, failed, uncertain): small, so a send's status changes write
-- few pages, and the queue and the counts are read from it.
DROP INDEX IF EXISTS outbox_status;
DROP INDEX IF EXISTS outbox_pending;
CREATE INDEX IF NOT EXISTS outbox_open ON outbox(status, seq) WHERE status != 'sent';
CREATE TABLE IF NOT EXISTS inbox (
    id TEXT PRIMARY KEY,
    chat TEXT, sender TEXT, push_name TEXT, type TEXT, text TEXT, ts REAL, is_group INTEGER,
    received REAL NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    copies INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS inbox_undelivered ON inbox(delivered, received);
"""
# Schema versions (PRAGMA user_version; the schema above is version 1). A journal written by an older
# version upgrades in place, one step after another, each in one transaction (DESIGN.md §11).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1 -> 2: rich messages: a send's type, that type's fields (JSON) and WhatsApp's id for it (a reply or
    # a reaction quotes that one); an inbound message's extra fields (media, location, reaction, reply).
    ("ALTER TABLE outbox ADD COLUMN type TEXT NOT NULL DEFAULT 'text'",
     "ALTER TABLE outbox ADD COLUMN payload TEXT",
     "ALTER TABLE outbox ADD COLUMN wa_id TEXT",
     "ALTER TABLE inbox ADD COLUMN payload TEXT"),
)
SCHEMA_VERSION = 1 + len(MIGRATIONS)


class NewerJournal(Exception):
    """A journal written by a newer waport: opening it with this one could lose what it records."""


def migrate(db: sqlite3.Connection) -> int:
    """Bring the journal to SCHEMA_VERSION; safe when the worker and the supervisor open it at once."""
    for _ in range(len(MIGRATIONS) + 1):
        version = max(1, db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise NewerJournal(f"journal schema {version} is newer than this waport's {SCHEMA_VERSION}")
        if version == SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # a fresh journal says so
            return version
        db.execute("BEGIN IMMEDIATE")
        try:
            if max(1, db.execute("PRAGMA user_version").fetchone()[0]) == version:  # not done meanwhile
                for statement in MIGRATIONS[version - 1]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    raise AssertionError("unreachable: every step raises the version")


@dataclass
class Outgoing:
    message_id: str
    idempotency_key: str | None
    recipient: str
    text: str
    status: str
    error: str | None
    sent_ts: float | None
    created: float
    updated: float
    attempts: int = 0
    source: str = "control"
    type: str = "text"
    payload: str | None = None  # the type's fields, JSON
    wa_id: str | None = None

    @property
    def fields(self) -> dict[str, Any]:
        return json.loads(self.payload) if self.payload else {}

    def result(self) -> dict[str, Any]:
        """What `send` answers, now or for a repeated idempotency key."""
        out: dict[str, Any] = {"message_id": self.message_id, "status": self.status}
        if self.error:
            out["error"] = self.error
        return out

    def public(self) -> dict[str, Any]:
        return {"direction": "out", "message_id": self.message_id, "idempotency_key": self.idempotency_key,
                "to": self.recipient, "text": self.text, "status": self.status, "error": self.error,
                "sent_ts": self.sent_ts, "created": self.created, "updated": self.updated,
                "attempts": self.attempts, "type": self.type, **self.fields}


_OUT_COLUMNS = (
    "message_id, idempotency_key, recipient, text, status, error, sent_ts, created, updated, attempts, source,"
    " type, payload, wa_id"
)
_IN_COLUMNS = ("id", "chat", "sender", "push_name", "type", "text", "ts", "is_group")
_IN_SELECT = "id, chat, sender, push_name, type, text, ts, is_group, payload"
PENDING_MEDIA = "pending"  # an inbound media's status while the worker downloads it: not delivered yet


def message_id_for(company: str, idempotency_key: str | None) -> str:
    """A WhatsApp-style id we choose; derived from the key so a resend of the same message is harmless."""
    if idempotency_key is None:
        return f"3EB0{_ids.getrandbits(64):016X}"
    digest = hashlib.sha256(f"{company}\0{idempotency_key}".encode()).hexdigest()
    return "3EB0" + digest[:16].upper()


def storage_error(exc: sqlite3.Error) -> WaportError:
    """What a failed journal write means to whoever asked: a full disk is said as such, with what to do."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
        return disk_full()
    return WaportError(INTERNAL, f"the journal could not be written: {exc}")


class Busy(Exception):
    """The other writer (worker or supervisor) holds the journal's write lock: try again shortly."""


class Journal:
    def __init__(self, path: str, lock_wait: float = 10.0, checkpoints: bool = True, sync: str = "normal") -> None:
        """`lock_wait`: seconds to wait for a lock; `checkpoints=False` leaves WAL checkpoints to the
        other connection (the supervisor's loop must not stall on one); `sync="full"`: every commit is
        fsynced (the worker's, under journal_sync = "full"; the supervisor groups its own instead)."""
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.path = path
        self.lock_wait_ms = int(lock_wait * 1000)
        self._db = sqlite3.connect(path, timeout=lock_wait, isolation_level=None, check_same_thread=False)
        self._busy_ms = self.lock_wait_ms  # the connection's busy timeout now
        # Small pages for a new journal: a send's three transactions each rewrite a few pages, so the
        # WAL (and the disk writes behind its checkpoints) shrink about fourfold. An existing journal
        # keeps its page size (changing it would rewrite the file).
        self.db.execute("PRAGMA page_size=1024")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL" if sync == "full" else "PRAGMA synchronous=NORMAL")
        if not checkpoints:
            self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.db.executescript(_SCHEMA)
        migrate(self.db)

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, waiting up to `lock_wait` for locks. After a no-wait write the wait comes
        back only when something else uses the connection: a supervisor that only appends never pays
        two PRAGMAs per batch."""
        if self._busy_ms != self.lock_wait_ms:
            self._set_busy(self.lock_wait_ms)
        return self._db

    def _set_busy(self, ms: int) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {ms}")
        self._busy_ms = ms

    @classmethod
    def in_session(cls, session_dir: str, lock_wait: float = 10.0, checkpoints: bool = True,
                   sync: str = "normal") -> Journal:
        return cls(os.path.join(session_dir, FILENAME), lock_wait, checkpoints, sync)

    def close(self) -> None:
        self._db.close()

    def close_if_idle(self, idle: float) -> bool:
        """A file holds no server connection: nothing to close (cluster mode's journal closes its own)."""
        return False

    # ------------------------------------------------------------ outbox

    def by_key(self, key: str) -> Outgoing | None:
        row = self.db.execute(f"SELECT {_OUT_COLUMNS} FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()
        return Outgoing(*row) if row else None

    def by_id(self, message_id: str) -> Outgoing | None:
        row = self.db.execute(f"SELECT {_OUT_COLUMNS} FROM outbox WHERE message_id = ?", (message_id,)).fetchone()
        return Outgoing(*row) if row else None

    def enqueue(
        self, company: str, recipient: str, text: str, key: str | None, source: str = "control",
        type_: str = "text", fields: dict[str, Any] | None = None,
    ) -> tuple[Outgoing, bool]:
        """Append a send; (the message, True) — or (the first one, False) for a key seen before."""
        return self._insert(self.db, company, recipient, text, key, source, type_, fields)

    def _insert(
        self, db: sqlite3.Connection, company: str, recipient: str, text: str, key: str | None, source: str,
        type_: str = "text", fields: dict[str, Any] | None = None,
    ) -> tuple[Outgoing, bool]:
        now = time.time()
        message_id = message_id_for(company, key)
        payload = _payload(fields)
        try:
            db.execute(
                "INSERT INTO outbox (message_id, idempotency_key, recipient, text, status, created, updated, source,"
                " type, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (message_id, key, recipient, text, QUEUED, now, now, source, type_, payload),
            )
        except sqlite3.IntegrityError:
            first = self.by_key(key) if key is not None else None
            if first is None:
                raise
            return first, False
        return Outgoing(message_id, key, recipient, text, QUEUED, None, None, now, now, 0, source, type_,
                        payload), True

    def enqueue_many(
        self, company: str, items: list[tuple[Any, ...]], wait: bool = True
    ) -> list[tuple[Outgoing, bool]]:
        """`enqueue` for (recipient, text, key, source[, type, fields]) items in one transaction: one commit
        for many sends.

        `wait=False`: raise `Busy` (nothing written) at once when the other writer holds the lock.
        """
        db = self.db if wait else self._db
        if not wait and self._busy_ms:
            self._set_busy(0)
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise Busy(str(exc)) from None
            raise
        try:
            out: list[tuple[Outgoing, bool]] = []
            run: list[tuple[Any, ...]] = []  # consecutive sends without a key: one executemany, in order
            for item in items:
                if item[2] is None:
                    run.append(item)
                    continue
                out += self._insert_new(db, company, run)
                run = []
                out.append(self._insert(db, company, *item))
            out += self._insert_new(db, company, run)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT (a full disk) leaves the transaction open
                db.execute("ROLLBACK")
            raise
        return out

    def _insert_new(
        self, db: sqlite3.Connection, company: str, items: list[tuple[Any, ...]]
    ) -> list[tuple[Outgoing, bool]]:
        """Sends without an idempotency key (ids of our own, never seen before): one statement for all."""
        if not items:
            return []
        now = time.time()
        made = []
        for recipient, text, _key, source, *rest in items:
            type_ = rest[0] if rest else "text"
            fields = rest[1] if len(rest) > 1 else None
            payload = _payload(fields)
            made.append(Outgoing(message_id_for(company, None), None, recipient, text, QUEUED, None, None, now, now, 0,
                                 source, type_, payload))
        db.executemany(
            "INSERT INTO outbox (message_id, idempotency_key, recipient, text, status, created, updated, source,"
            " type, payload) VALUES (?, NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(m.message_id, m.recipient, m.text, QUEUED, now, now, m.source, m.type, m.payload) for m in made])
        return [(m, True) for m in made]

    def take_queued(self, limit: int) -> list[Outgoing]:
        """The oldest queued messages, marked `sending` by the same statement (one write, no SELECT first)."""
        rows = self.db.execute(
            f"UPDATE outbox SET status = ?, updated = ?, attempts = attempts + 1 WHERE seq IN"
            f" (SELECT seq FROM outbox WHERE {_OPEN_SQL} AND status = ? ORDER BY seq LIMIT ?)"
            f" RETURNING seq, {_OUT_COLUMNS}",
            (SENDING, time.time(), QUEUED, limit)).fetchall()
        rows.sort()  # RETURNING's order is unspecified; the queue's is seq
        return [Outgoing(*r[1:]) for r in rows]

    def mark(self, message_id: str, status: str, error: str | None = None, sent_ts: float | None = None) -> None:
        self.mark_many([(message_id, status, error, sent_ts)])

    def mark_many(self, marks: list[tuple[Any, ...]]) -> None:
        """(message_id, status, error, sent_ts[, wa_id]) for each message, in one transaction."""
        now = time.time()
        rows = [(m[1], m[2], m[3], m[4] if len(m) > 4 else None, now, 1 if m[1] == SENDING else 0, m[0])
                for m in marks]
        sql = ("UPDATE outbox SET status = ?, error = ?, sent_ts = COALESCE(?, sent_ts), wa_id = COALESCE(?, wa_id),"
               " updated = ?, attempts = attempts + ? WHERE message_id = ?")
        if len(rows) == 1:
            self.db.execute(sql, rows[0])
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(sql, rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def interrupted(self) -> list[Outgoing]:
        """After a crash: sends that began but whose outcome is unknown become `uncertain`."""
        rows = [Outgoing(*r) for r in self.db.execute(
            f"SELECT {_OUT_COLUMNS} FROM outbox WHERE {_OPEN_SQL} AND status = ? ORDER BY seq",
            (SENDING,)).fetchall()]
        if rows:
            self.db.execute(f"UPDATE outbox SET status = ?, error = ?, updated = ? WHERE {_OPEN_SQL} AND status = ?",
                            (UNCERTAIN, "worker ended during the send; not resent", time.time(), SENDING))
        return rows

    def pending(self) -> int:
        return self.db.execute(
            f"SELECT COUNT(*) FROM outbox WHERE {_OPEN_SQL} AND status IN (?, ?)", PENDING).fetchone()[0]

    def counts(self) -> dict[str, int]:
        """Messages per status; the sent ones are the rest of the total (the open index leaves them out)."""
        out = dict(self.db.execute(
            f"SELECT status, COUNT(*) FROM outbox WHERE {_OPEN_SQL} GROUP BY status").fetchall())
        sent = self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] - sum(out.values())
        if sent:
            out[SENT] = sent
        return out

    def recent_outbound(self, limit: int = 20) -> list[Outgoing]:
        rows = self.db.execute(f"SELECT {_OUT_COLUMNS} FROM outbox ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [Outgoing(*r) for r in rows]

    # ------------------------------------------------------------ inbox

    def inbox_add(self, msg: dict[str, Any]) -> bool:
        """Journal an inbound message; False if its id was seen before (a redelivery)."""
        extra = extra_fields(msg)
        values = (msg["id"], msg.get("chat"), msg.get("from"), msg.get("push_name"), msg.get("type"),
                  msg.get("text"), msg.get("ts"), 1 if msg.get("is_group") else 0, time.time(),
                  _payload(extra))
        cur = self.db.execute(
            "INSERT OR IGNORE INTO inbox (id, chat, sender, push_name, type, text, ts, is_group, received, payload)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
        if cur.rowcount == 1:
            return True
        self.db.execute("UPDATE inbox SET copies = copies + 1 WHERE id = ?", (msg["id"],))
        return False

    def undelivered(self, received_before: float | None = None, limit: int = 100,
                    downloading: bool = False) -> list[dict[str, Any]]:
        """Inbound messages no sink has acknowledged; those whose media is still being fetched only
        with `downloading` (they go out once it is stored or has failed)."""
        rows = self.db.execute(
            f"SELECT {_IN_SELECT} FROM inbox WHERE delivered = 0"
            " AND received <= ? ORDER BY received LIMIT ?",
            (time.time() if received_before is None else received_before, limit)).fetchall()
        found = [_inbound(r) for r in rows]
        return [m for m in found if downloading == (_media_status(m) == PENDING_MEDIA)]

    def inbound(self, msg_id: str) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {_IN_SELECT} FROM inbox WHERE id = ?", (msg_id,)).fetchone()
        return _inbound(row) if row else None

    def set_inbound_fields(self, msg_id: str, fields: dict[str, Any]) -> None:
        """Replace the extra fields of an inbound message (its media once fetched)."""
        self.db.execute("UPDATE inbox SET payload = ? WHERE id = ?",
                        (_payload(fields), msg_id))

    def reference(self, msg_id: str) -> dict[str, Any] | None:
        """A message a reply or a reaction points at: WhatsApp's id for it, who wrote it, its text."""
        row = self.db.execute("SELECT chat, sender, type, text FROM inbox WHERE id = ?", (msg_id,)).fetchone()
        if row:
            return {"id": msg_id, "chat": row[0], "from": row[1], "from_me": False, "type": row[2],
                    "text": row[3] or ""}
        row = self.db.execute("SELECT recipient, type, text, wa_id, status FROM outbox WHERE message_id = ?"
                              " OR wa_id = ?", (msg_id, msg_id)).fetchone()
        if row:
            return {"id": row[3] or msg_id, "chat": row[0], "from": "", "from_me": True, "type": row[1],
                    "text": row[2] or "", "status": row[4]}
        return None

    def queued_media(self) -> set[str]:
        """Media ids a send not yet out still needs (the store keeps them past media_retention)."""
        rows = self.db.execute(
            f"SELECT payload FROM outbox WHERE {_OPEN_SQL} AND status IN (?, ?) AND payload IS NOT NULL",
            PENDING).fetchall()
        return {m for (p,) in rows if (m := json.loads(p).get("media"))}

    def delivered(self, ids: list[str]) -> None:
        self.db.executemany("UPDATE inbox SET delivered = 1 WHERE id = ?", [(i,) for i in ids])

    def senders(self, ids: list[str]) -> dict[str, str]:
        """Who sent each of these inbound messages (a group's read receipts name the sender)."""
        if not ids:
            return {}
        rows = self.db.execute(f"SELECT id, sender FROM inbox WHERE id IN ({','.join('?' * len(ids))})", ids)
        return {i: sender for i, sender in rows if sender}

    def recent_inbound(self, limit: int = 20) -> list[dict[str, Any]]:
        return listed_inbound(self.db.execute(
            f"SELECT {_IN_SELECT}, received, delivered, copies FROM inbox"
            " ORDER BY received DESC LIMIT ?", (limit,)).fetchall())

    # ------------------------------------------------------------ retention and erasure

    def purge(self, before: float, chat: str | None = None, limit: int | None = None) -> Purged:
        """Erase ended sends and delivered inbound messages accepted before `before` (of one chat when
        given: the forms of its JID from `chat_forms`). Sends not yet out stay: they were promised, and
        an inbound message no sink has taken stays until it is delivered. Erased pages are overwritten
        (secure_delete), not merely unlinked. `limit` bounds the rows of each table per call."""
        chats = chat_forms(chat) if chat else ()
        where_chat_out = f" AND recipient IN ({','.join('?' * len(chats))})" if chats else ""
        where_chat_in = f" AND chat IN ({','.join('?' * len(chats))})" if chats else ""
        cap = f" LIMIT {int(limit)}" if limit else ""
        db = self.db
        db.execute("PRAGMA secure_delete = ON")
        db.execute("BEGIN IMMEDIATE")
        try:
            out = db.execute(
                f"SELECT seq, payload FROM outbox WHERE status IN (?, ?, ?) AND created < ?{where_chat_out}"
                f" ORDER BY seq{cap}", (*ENDED, before, *chats)).fetchall()
            inn = db.execute(
                f"SELECT id, payload FROM inbox WHERE delivered = 1 AND received < ?{where_chat_in}"
                f" ORDER BY received{cap}", (before, *chats)).fetchall()
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _ in out])
            db.executemany("DELETE FROM inbox WHERE id = ?", [(i,) for i, _ in inn])
            kept = db.execute(
                f"SELECT COUNT(*) FROM outbox WHERE {_OPEN_SQL} AND status IN (?, ?) AND created < ?{where_chat_out}",
                (*PENDING, before, *chats)).fetchone()[0]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        media = {str(m["id"]) for _, p in inn
                 if p and isinstance(m := json.loads(p).get("media"), dict) and m.get("id")}
        return Purged(len(out), len(inn), kept, sorted(media))

    def compact(self) -> None:
        """After an erasure: the WAL's copies of the erased pages are folded in and the file truncated."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


@dataclass
class Purged:
    outbound: int  # ended sends erased
    inbound: int  # delivered inbound messages erased
    pending: int  # sends in the range not yet out, kept
    inbound_media: list[str]  # media ids that the erased inbound messages had stored

    def public(self) -> dict[str, Any]:
        return {"outbound": self.outbound, "inbound": self.inbound, "pending_kept": self.pending,
                "media": len(self.inbound_media)}


def chat_forms(chat: str) -> tuple[str, ...]:
    """The ways one chat appears in the journal: a send's recipient is digits or a JID as given, an
    inbound message's chat a JID."""
    if "@" not in chat:
        return (chat, f"{chat}@s.whatsapp.net")
    user, _, server = chat.partition("@")
    return (chat, user) if server == "s.whatsapp.net" else (chat,)


def _inbound(row: tuple) -> dict[str, Any]:
    msg = dict(zip(_IN_COLUMNS, row[:8], strict=True))
    msg["from"] = msg.pop("sender")
    msg["is_group"] = bool(msg["is_group"])
    if len(row) > 8 and row[8]:
        msg.update(json.loads(row[8]))
    return msg


def listed_inbound(rows: list[tuple]) -> list[dict[str, Any]]:
    """`recent_inbound`'s rows (the inbox's columns, then received, delivered, copies) as listed."""
    out = []
    for r in rows:
        msg = public_inbound(_inbound(r[:9]))
        msg.update(direction="in", received=r[9], delivered=bool(r[10]), copies=r[11])
        out.append(msg)
    return out


def _payload(fields: dict[str, Any] | None) -> str | None:
    """A row's extra fields as stored: compact JSON, or NULL when there are none."""
    return json.dumps(fields, separators=(",", ":")) if fields else None


def extra_fields(msg: dict[str, Any]) -> dict[str, Any]:
    """What an inbound message carries beyond the inbox's columns (kept as its payload)."""
    return {k: v for k, v in msg.items() if k not in _IN_COLUMNS and k != "from"}


def public_inbound(msg: dict[str, Any]) -> dict[str, Any]:
    """An inbound message as consumers see it: without what only the worker reads (`_fetch`)."""
    return {k: v for k, v in msg.items() if not k.startswith("_")}


def _media_status(msg: dict[str, Any]) -> str | None:
    media = msg.get("media")
    return media.get("status") if isinstance(media, dict) else None
