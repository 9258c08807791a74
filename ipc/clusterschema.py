"""Cluster mode's PostgreSQL schema and the SQL that both the supervisor and the workers run (DESIGN.md §12).

A leaf (no database driver imported here): `waportd/clusterstore.py` migrates and uses it, and a worker
(the sim backend's credentials) runs the same statements from its own connection, so there is one copy.
Statements use psycopg's named placeholders (`%(name)s`). Every time is the database's clock (`now()`).
"""

from __future__ import annotations

import hashlib
import re

SCHEMA_VERSION = 7
# One number for every waportd sharing a database: `migrate` holds it while it creates or upgrades the schema.
MIGRATION_LOCK = 0x77706F7274  # "wport"

# Version N's statements bring a version N-1 schema to N. Only ever append.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS waport_hosts (
            host_id text PRIMARY KEY,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now(),
            capacity int NOT NULL DEFAULT 0,
            state text NOT NULL DEFAULT 'up' CHECK (state IN ('up', 'draining', 'down')),
            companies int NOT NULL DEFAULT 0)""",
        """CREATE TABLE IF NOT EXISTS waport_companies (
            company text PRIMARY KEY,
            wanted boolean NOT NULL,
            proxy text,
            preferred_host text,
            updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE IF NOT EXISTS waport_leases (
            company text PRIMARY KEY,
            owner text NOT NULL,
            epoch bigint NOT NULL CHECK (epoch > 0),
            expires_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS waport_leases_owner ON waport_leases (owner)",
        """CREATE TABLE IF NOT EXISTS waport_credentials (
            company text PRIMARY KEY,
            epoch bigint NOT NULL,
            data jsonb NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now())""",
    ),
    # 2: mail between hosts (a command forwarded to a company's owner and its answer; an event too large for
    # a NOTIFY), each row taken by the host it is for; NOTIFY waport_mail tells that host to look.
    2: (
        """CREATE TABLE IF NOT EXISTS waport_mail (
            id bigserial PRIMARY KEY,
            to_host text NOT NULL,
            from_host text NOT NULL,
            kind text NOT NULL,
            body text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now())""",
        "CREATE INDEX IF NOT EXISTS waport_mail_to ON waport_mail (to_host, id)",
    ),
    # 3: the message journals (DESIGN.md §6), the SQLite journal's tables with the company in each row and, on
    # a send being sent, the lease epoch of the worker that took it (ipc/pgjournal.py).
    3: (
        """CREATE TABLE IF NOT EXISTS waport_outbox (
            seq bigserial PRIMARY KEY,
            company text NOT NULL,
            message_id text NOT NULL,
            idempotency_key text,
            recipient text NOT NULL,
            text text NOT NULL,
            status text NOT NULL,
            error text,
            sent_ts float8,
            attempts int NOT NULL DEFAULT 0,
            source text NOT NULL DEFAULT 'control',
            created float8 NOT NULL,
            updated float8 NOT NULL,
            type text NOT NULL DEFAULT 'text',
            payload text,
            wa_id text,
            epoch bigint,
            UNIQUE (company, message_id))""",
        "CREATE UNIQUE INDEX IF NOT EXISTS waport_outbox_key ON waport_outbox (company, idempotency_key)"
        " WHERE idempotency_key IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS waport_outbox_open ON waport_outbox (company, status, seq) WHERE status <> 'sent'",
        "CREATE INDEX IF NOT EXISTS waport_outbox_company ON waport_outbox (company, seq)",
        """CREATE TABLE IF NOT EXISTS waport_inbox (
            company text NOT NULL,
            id text NOT NULL,
            chat text, sender text, push_name text, type text, text text, ts float8, is_group int,
            received float8 NOT NULL,
            delivered int NOT NULL DEFAULT 0,
            copies int NOT NULL DEFAULT 1,
            payload text,
            PRIMARY KEY (company, id))""",
        "CREATE INDEX IF NOT EXISTS waport_inbox_undelivered ON waport_inbox (company, delivered, received)",
    ),
    # 4: which neonize versions have upgraded whatsmeow's store in this database (workers/neonizestore.py)
    4: (
        """CREATE TABLE IF NOT EXISTS waport_store_upgrades (
            neonize text PRIMARY KEY,
            upgraded_at timestamptz NOT NULL DEFAULT now())""",
    ),
    # 5: the webhook store (DESIGN.md §10; ipc/pgwebhookstore.py), the SQLite store's tables with the company
    # in every row: endpoints and their secrets, the companies' `seq`, and every event an endpoint wants (with
    # the host that wrote it: it delivers the events of a company no host runs).
    5: (
        """CREATE TABLE IF NOT EXISTS waport_webhook_endpoints (
            company text PRIMARY KEY,
            url text NOT NULL,
            secret text NOT NULL,
            old_secret text,
            old_until float8,
            events text NOT NULL,
            created float8 NOT NULL,
            updated float8 NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS waport_webhook_disabled (
            company text NOT NULL,
            url text NOT NULL,
            reason text NOT NULL,
            at float8 NOT NULL,
            PRIMARY KEY (company, url))""",
        "CREATE TABLE IF NOT EXISTS waport_webhook_seqs (company text PRIMARY KEY, seq bigint NOT NULL)",
        """CREATE TABLE IF NOT EXISTS waport_webhook_events (
            n bigserial PRIMARY KEY,
            id text NOT NULL UNIQUE,
            company text NOT NULL,
            host text NOT NULL,
            seq bigint NOT NULL,
            type text NOT NULL,
            body text NOT NULL,
            created float8 NOT NULL,
            status text NOT NULL DEFAULT 'pending',
            attempts int NOT NULL DEFAULT 0,
            next_at float8 NOT NULL,
            last_at float8,
            last_status int,
            last_error text,
            done_at float8)""",
        "CREATE INDEX IF NOT EXISTS waport_webhook_events_pending ON waport_webhook_events (company, seq)"
        " WHERE status = 'pending'",
        "CREATE INDEX IF NOT EXISTS waport_webhook_events_company ON waport_webhook_events (company, created)",
        "CREATE INDEX IF NOT EXISTS waport_webhook_events_done ON waport_webhook_events (done_at)"
        " WHERE status <> 'pending'",
    ),
    # 6: API tokens (DESIGN.md §9): one row per token, its record as the token file keeps it (the SHA-256,
    # never the token), so a token made on any host works on every host.
    6: (
        """CREATE TABLE IF NOT EXISTS waport_tokens (
            id text PRIMARY KEY,
            record jsonb NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now())""",
    ),
    # 7: the media store (DESIGN.md §11): each file's record and its bytes in chunks, so a company's media
    # is readable on whichever host runs it next.
    7: (
        """CREATE TABLE IF NOT EXISTS waport_media (
            media_id text PRIMARY KEY,
            size bigint NOT NULL,
            mimetype text NOT NULL,
            filename text,
            created float8 NOT NULL,
            owners text[] NOT NULL DEFAULT '{}')""",
        """CREATE TABLE IF NOT EXISTS waport_media_chunks (
            media_id text NOT NULL REFERENCES waport_media (media_id) ON DELETE CASCADE,
            n int NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (media_id, n))""",
    ),
}
assert max(MIGRATIONS) == SCHEMA_VERSION

SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS waport_schema (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version int NOT NULL)"""

# --- Between hosts: channels, and what a NOTIFY may carry (PostgreSQL refuses 8,000 bytes or more) -----------

MAIL_CHANNEL = "waport_mail"  # payload: the host_id that has mail
EVENTS_CHANNEL = "waport_events"  # payload: {"h": origin host_id, "e": the event}
NOTIFY_MAX_BYTES = 7900
MAIL_KEEP_SECONDS = 300  # mail nobody took (its host died) goes after this

# --- Credentials (the sim backend's session): written only by the holder of the lease's current epoch ---

# `data`: JSON text (or psycopg's Jsonb). Refused (0 rows) when the lease row's epoch is not `epoch`, or a
# newer epoch already wrote. FOR SHARE: a claim bumping the epoch at the same moment waits for this write, or
# this write sees the new epoch.
PUT_CREDENTIALS_SQL = """
INSERT INTO waport_credentials AS c (company, epoch, data, updated_at)
SELECT %(company)s, %(epoch)s, %(data)s::jsonb, now()
WHERE (SELECT l.epoch FROM waport_leases l WHERE l.company = %(company)s FOR SHARE) = %(epoch)s
ON CONFLICT (company) DO UPDATE SET epoch = EXCLUDED.epoch, data = EXCLUDED.data, updated_at = now()
    WHERE c.epoch <= EXCLUDED.epoch
RETURNING c.epoch"""

GET_CREDENTIALS_SQL = "SELECT data FROM waport_credentials WHERE company = %(company)s"

# --- application_name: which company and epoch a database connection works for (fencing) ---------------

APP_PREFIX = "waport/"
NAME_MAX_BYTES = 63  # PostgreSQL cuts application_name at NAMEDATALEN - 1
_TOKEN_MAX = 30  # 'waport/' + 30 + '/' + 19 digits of a bigint epoch = 57 bytes: never cut
_APP_RE = re.compile(r"waport/([A-Za-z0-9_~-]{1,30})/([0-9]{1,19})")


def company_token(company: str) -> str:
    """The company as it appears in an application_name: itself up to 30 characters, else its first 19 and a
    hash ('~' never occurs in a company id, so a token never equals another company's name)."""
    if len(company) <= _TOKEN_MAX:
        return company
    digest = hashlib.blake2b(company.encode(), digest_size=5).hexdigest()
    return f"{company[:19]}~{digest}"


def application_name(company: str, epoch: int) -> str:
    """'waport/<company>/<epoch>' for a connection made on behalf of `company` under lease `epoch`."""
    name = f"{APP_PREFIX}{company_token(company)}/{int(epoch)}"
    assert len(name.encode()) <= NAME_MAX_BYTES
    return name


def supervisor_name(host_id: str, role: str = "") -> str:
    """'waportd/<host>[/<role>]' for a connection of a host's own processes (its links, journals, webhooks,
    media), never of a company's epoch: fencing never ends it."""
    return (f"waportd/{host_id}/{role}" if role else f"waportd/{host_id}")[:NAME_MAX_BYTES]


def parse_application_name(name: str) -> tuple[str, int] | None:
    """(company token, epoch) of a name made by `application_name`, else None. The token is the company
    itself unless the company is longer than 30 characters (compare with `company_token`)."""
    m = _APP_RE.fullmatch(name or "")
    if m is None:
        return None
    return m.group(1), int(m.group(2))


def like_prefix(company: str) -> str:
    """A LIKE pattern matching every application_name of `company`, whatever the epoch."""
    token = company_token(company).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{APP_PREFIX}{token}/%"
