"""API tokens (DESIGN.md §9): the format of STATE_DIR/api-tokens.json and the checks on it.

Here in ipc because two processes use it: the supervisor creates and revokes tokens (control
commands `token_create`, `token_list`, `token_revoke`) and is the only writer; the API process
only reads the file to check a presented bearer token (`TokenReader`), and may import ipc only. In
cluster mode PostgreSQL holds the tokens and the file is this host's copy, which the supervisor keeps in
step (waportd/tokensync.py, through `TokenStore.merge`): the API process reads it the same way.

A token is `wp_` + 32 random bytes (URL-safe base64) and is shown once, at creation. The file
keeps its SHA-256 and never the token: a copy of the file (a backup, a log) lets nobody in. A
presented token is looked up by its SHA-256, so checking one costs one hash and one dict lookup
whatever the number of tokens, and compared with `hmac.compare_digest` besides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ipc import jsonsafe
from ipc.errors import BAD_REQUEST, WaportError
from ipc.files import write_json_atomic
from ipc.validation import COMPANY_RE, validate_company

TOKENS_FILE = "api-tokens.json"
FORMAT = 1
TOKEN_PREFIX = "wp_"
TOKEN_BYTES = 32
ID_PREFIX = "tok_"
MAX_TOKEN_CHARS = 256  # longer is no token of ours: refused before hashing

ACTIVE, EXPIRED, REVOKED = "active", "expired", "revoked"

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


MAX_LIFETIME = 100 * 365 * 86400.0  # a date every tool can still print


class TokenFileError(Exception):
    """The token file exists but cannot be used (unreadable, not JSON, wrong shape).

    Never treated as "no tokens": a reader would then lock every client out silently, and a
    writer would overwrite tokens it could not read.
    """


def token_hash(token: str) -> str:
    """The SHA-256 (hex) under which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class TokenRecord:
    id: str
    sha256: str
    company: str | None  # None: an admin token, acting on every company
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return REVOKED
        if self.expires_at is not None and now >= self.expires_at:
            return EXPIRED
        return ACTIVE

    def public(self, now: float) -> dict[str, Any]:
        """What listings show: everything but the hash."""
        return {"id": self.id, "company": self.company, "created_at": self.created_at,
                "expires_at": self.expires_at, "revoked_at": self.revoked_at, "state": self.state(now)}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> TokenRecord:
        """One record of the file; ValueError saying what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("a token record is not an object")
        token_id = data.get("id")
        if not isinstance(token_id, str) or not _ID_RE.fullmatch(token_id):
            raise ValueError("a token id is missing or not 1-64 characters from A-Z a-z 0-9 _ -")
        sha = data.get("sha256")
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            raise ValueError(f"token {token_id}: sha256 is not 64 lower-case hex digits")
        company = data.get("company")
        if company is not None and (not isinstance(company, str) or not COMPANY_RE.fullmatch(company)):
            raise ValueError(f"token {token_id}: bad company")
        if not _time(data.get("created_at")):
            raise ValueError(f"token {token_id}: created_at is not a time")
        for name in ("expires_at", "revoked_at"):
            if data.get(name) is not None and not _time(data[name]):
                raise ValueError(f"token {token_id}: {name} is neither a time nor null")
        return cls(token_id, sha, company, data["created_at"], data.get("expires_at"), data.get("revoked_at"))


class TokenStore:
    """The tokens of one file, in memory: pure (no I/O but `load` and `save`), so it is tested as is."""

    def __init__(self, records: Iterable[TokenRecord] = ()) -> None:
        self.records: dict[str, TokenRecord] = {}
        self._by_hash: dict[str, TokenRecord] = {}
        for record in records:
            self._put(record)

    def _put(self, record: TokenRecord) -> None:
        old = self.records.get(record.id)
        if old is not None and self._by_hash.get(old.sha256) is old:
            del self._by_hash[old.sha256]
        self.records[record.id] = record
        self._by_hash[record.sha256] = record

    def _drop(self, token_id: str) -> None:
        old = self.records.pop(token_id, None)
        if old is not None and self._by_hash.get(old.sha256) is old:
            del self._by_hash[old.sha256]

    def __len__(self) -> int:
        return len(self.records)

    # ------------------------------------------------------------ the file

    @classmethod
    def load(cls, path: str) -> TokenStore:
        """The file's tokens; no file means no tokens; a damaged file raises `TokenFileError`."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise TokenFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls.parse(raw, path)

    @classmethod
    def parse(cls, raw: bytes, source: str = TOKENS_FILE) -> TokenStore:
        try:
            data = jsonsafe.loads(raw)
        except jsonsafe.InvalidJSON as exc:
            raise TokenFileError(f"{source}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise TokenFileError(f'{source}: expected an object with a "tokens" list')
        if data.get("version") != FORMAT:
            raise TokenFileError(f"{source}: unsupported version {data.get('version')!r} (this waport reads {FORMAT})")
        store = cls()
        for item in data["tokens"]:
            try:
                record = TokenRecord.from_json(item)
            except ValueError as exc:
                raise TokenFileError(f"{source}: {exc}") from None
            if record.id in store.records:
                raise TokenFileError(f"{source}: token id {record.id} appears twice")
            store._put(record)
        return store

    def save(self, path: str) -> None:
        """Atomically, 0600: a reader sees the old file or the new one."""
        records = sorted(self.records.values(), key=lambda r: (r.created_at, r.id))
        write_json_atomic(path, {"version": FORMAT, "tokens": [r.to_json() for r in records]},
                          mode=0o600, indent=1)

    # ------------------------------------------------------------ changes

    def create(self, company: str | None, expires_in_seconds: float | None, now: float) -> tuple[TokenRecord, str]:
        """A new token: (its record, the token itself — which nothing keeps: show it once)."""
        if company is not None:
            validate_company(company)
        lifetime = expires_in_seconds
        if lifetime is not None and not (_time(lifetime) and 0 < lifetime <= MAX_LIFETIME):
            raise WaportError(BAD_REQUEST, "a token's lifetime must be more than 0 seconds and at most 100 years "
                                           "(no --expires: it never expires)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        token_id = ID_PREFIX + secrets.token_hex(6)
        while token_id in self.records:
            token_id = ID_PREFIX + secrets.token_hex(6)
        expires_at = None if expires_in_seconds is None else round(now + expires_in_seconds, 3)
        record = TokenRecord(token_id, token_hash(token), company, round(now, 3), expires_at)
        self._put(record)
        return record, token

    def revoke(self, token_id: str, now: float) -> TokenRecord:
        """Revoked from now on; revoking a revoked token changes nothing (its first time stays)."""
        record = self.records.get(token_id) if isinstance(token_id, str) else None
        if record is None:
            raise unknown_token(token_id)
        if record.revoked_at is None:
            record = dataclasses.replace(record, revoked_at=round(now, 3))
            self._put(record)
        return record

    def merge(self, records: Iterable[TokenRecord], complete: bool = False, gone: Iterable[str] = ()) -> list[str]:
        """Take another copy's records (cluster mode: PostgreSQL's), each through `merged`; `complete`: they are
        every token there is, so one they lack goes; `gone`: ids to drop (a record that could not be read is
        no token: fail closed). The ids that changed, so the caller rewrites the file only when needed."""
        changed: list[str] = []
        seen: set[str] = set()
        for new in records:
            seen.add(new.id)
            old = self.records.get(new.id)
            record = merged(old, new)
            if record != old:
                self._put(record)
                changed.append(record.id)
        dropped = set(gone) | (set(self.records) - seen if complete else set())
        for token_id in sorted(dropped & set(self.records)):
            self._drop(token_id)
            changed.append(token_id)
        return changed

    # ------------------------------------------------------------ reading

    def get(self, token_id: str) -> TokenRecord | None:
        return self.records.get(token_id)

    def listing(self, now: float) -> list[dict[str, Any]]:
        """Every token without its hash, oldest first."""
        return [r.public(now) for r in sorted(self.records.values(), key=lambda r: (r.created_at, r.id))]

    def verify(self, presented: Any, now: float) -> TokenRecord | None:
        """The record of a presented bearer token if it is known and active (not revoked, not expired)."""
        if not (isinstance(presented, str) and presented.startswith(TOKEN_PREFIX)
                and len(presented) <= MAX_TOKEN_CHARS):
            return None
        digest = token_hash(presented)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.sha256, digest):
            return None
        return record if record.state(now) == ACTIVE else None


def merged(old: TokenRecord | None, new: TokenRecord) -> TokenRecord:
    """What a copy keeps when another copy of a record comes in: the new one, except that a revocation is never
    undone by a copy that had not seen it (same token, same hash), and a token revoked twice keeps its first
    time. A record of another hash under the same id is another token: the new one wins outright."""
    if old is None or old.revoked_at is None or old.sha256 != new.sha256:
        return new
    if new.revoked_at is None or new.revoked_at > old.revoked_at:
        return dataclasses.replace(new, revoked_at=old.revoked_at)
    return new


def unknown_token(token_id: Any) -> WaportError:
    return WaportError(BAD_REQUEST, f"no API token {str(token_id)[:80]!r}; `waportctl token list` shows them")


FileKey = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)


class TokenReader:
    """The token file as a reader process sees it: re-read only when it changed.

    One `stat` per call; the file is read again only when its (mtime_ns, size, inode) changed.
    The supervisor replaces the file by a rename, so every new version has a new inode. A damaged
    file raises `TokenFileError` on every call until it changes (fail closed: a revoked token must
    not pass because the file that revokes it could not be read).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.reads = 0  # how often the file was parsed (tests)
        self._key: FileKey | None = None
        self._store = TokenStore()
        self._error: str | None = None

    def store(self) -> TokenStore:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._key, self._store, self._error = None, TokenStore(), None
            return self._store
        except OSError as exc:
            raise TokenFileError(f"{self.path}: cannot stat: {exc.strerror or exc}") from None
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._key:
            self._reload()
        if self._error is not None:
            raise TokenFileError(self._error)
        return self._store

    def _reload(self) -> None:
        """Read the file through one descriptor, so the key and the content are of the same version."""
        self.reads += 1
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read()
        except FileNotFoundError:  # replaced between the stat and the open: the next call sees it
            self._key, self._store, self._error = None, TokenStore(), None
            return
        except OSError as exc:
            self._key, self._error = None, f"{self.path}: cannot read: {exc.strerror or exc}"
            return
        self._key = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            self._store, self._error = TokenStore.parse(raw, self.path), None
        except TokenFileError as exc:
            self._error = str(exc)

    def verify(self, presented: Any, now: float) -> TokenRecord | None:
        return self.store().verify(presented, now)
