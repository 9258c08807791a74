"""The media store in PostgreSQL (cluster mode, DESIGN.md §11 and §12): the truth is in waport_media and
waport_media_chunks, so a company's media is readable on whichever host runs it next (after a failover the
old host's disk is gone); `STATE_DIR/media/` is only this host's cache of the bytes.

A file still comes in as `Upload` writes it (tmp, hashed, renamed), then `record` copies it into PostgreSQL
in 1 MiB chunks, record row and chunks in one transaction: a row is never visible without all its bytes.
The id is the hash, so a second copy of the same bytes conflicts and is skipped. A local miss is served from
PostgreSQL: `read` fetches the range asked for (the supervisor's `media_get`, never a whole file at once),
`local_path` brings the whole file into the cache (tmp + rename, its hash checked) for a worker that sends
it by path. Records (owners) are always read from PostgreSQL, so every host sees the same readers. Only one
chunk is in memory at a time, either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from typing import Any

from ipc.errors import BAD_REQUEST, INTERNAL, NOT_FOUND, TIMEOUT, WaportError, disk_full, is_disk_full
from ipc.files import make_dir
from ipc.mediastore import _ID, CHUNK, TMP_KEPT, MediaInfo, MediaStore, _safe_name, validate_id
from ipc.pgdb import PgDb, PgUnavailable
from ipc.pgjournal import NEEDED_MEDIA_SQL  # whichever company's and host's: the whole outbox

log = logging.getLogger("waport.media")

BYTES_PER_SECOND = 8 << 20  # the slowest copy into or out of PostgreSQL a call allows for, past its base bound
CACHE_SETTLE = 600.0  # seconds a cached file PostgreSQL has not got is left alone (its record may be under way)
PRUNE_BATCH = 500  # media rows one prune statement removes (the next hourly look takes the rest)
_UNNEEDED = f"NOT IN (SELECT m FROM ({NEEDED_MEDIA_SQL}) AS needed(m) WHERE m IS NOT NULL)"  # by no send yet
_COLUMNS = "media_id, size, mimetype, filename, created, owners"


def unavailable(exc: PgUnavailable, what: str) -> WaportError:
    """The one wording of a media store that PostgreSQL did not answer for: nothing was stored or changed."""
    reason = str(exc).split(": ", 1)[-1]
    return WaportError(TIMEOUT, f"the media store (PostgreSQL) is unavailable: {what} failed ({reason}); "
                                "nothing was changed, try again")


class PgMediaStore(MediaStore):
    def __init__(self, root: str, max_bytes: int, db: PgDb) -> None:
        super().__init__(root, max_bytes)
        self.db = db

    def _call(self, what: str, fn: Any, size: int = 0) -> Any:
        """A bounded call; one that moves `size` bytes gets time for them on top of the usual bound."""
        try:
            return self.db.call(what, fn, self.db.call_timeout + size / BYTES_PER_SECOND if size else None)
        except PgUnavailable as exc:
            raise unavailable(exc, what) from None

    def close(self) -> None:
        self.db.close()

    def close_if_idle(self, idle: float) -> bool:
        return self.db.close_if_idle(idle)

    # ------------------------------------------------------------ in

    def record(self, media_id: str, size: int, mimetype: str, company: str | None, filename: str | None) -> MediaInfo:
        """Store a file `Upload` just put in the cache (its bytes, once: the id is their hash), or add an owner
        to one PostgreSQL has; each in one transaction."""
        path = self.path(media_id)
        params = {"id": media_id, "size": size, "mimetype": mimetype, "filename": _safe_name(filename),
                  "created": time.time(), "company": company,
                  "owners": [company] if company else []}

        def run(conn: Any) -> tuple | None:
            with conn.transaction():
                known = conn.execute("SELECT 1 FROM waport_media WHERE media_id = %(id)s", params).fetchone()
                if known is None and os.path.exists(path):
                    self._insert(conn, path, params)
                if company is not None:
                    conn.execute("UPDATE waport_media SET owners = array_append(owners, %(company)s)"
                                 " WHERE media_id = %(id)s AND NOT (%(company)s = ANY(owners))", params)
                return conn.execute(f"SELECT {_COLUMNS} FROM waport_media WHERE media_id = %(id)s", params).fetchone()

        row = self._call("media_put", run, size)
        if row is None:
            raise WaportError(NOT_FOUND, f"no media {media_id}")
        return _info(row)

    def _insert(self, conn: Any, path: str, params: dict[str, Any]) -> None:
        """The row, then the file's chunks read one at a time (a 64 MiB file is never held in memory); a row
        that another host inserted meanwhile (the same bytes) wins, and its chunks are not written twice."""
        inserted = conn.execute(
            "INSERT INTO waport_media (media_id, size, mimetype, filename, created, owners) VALUES (%(id)s, %(size)s,"
            " %(mimetype)s, %(filename)s, %(created)s, %(owners)s) ON CONFLICT DO NOTHING RETURNING 1",
            params).fetchone()
        if inserted is None:
            return
        written = n = 0
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    conn.execute("INSERT INTO waport_media_chunks (media_id, n, data) VALUES (%s, %s, %b)",
                                 (params["id"], n, chunk))
                    written += len(chunk)
                    n += 1
        except FileNotFoundError:  # the cache dropped it meanwhile (a prune): raising rolls the row back
            raise WaportError(NOT_FOUND, f"no media {params['id']}") from None
        if written != params["size"]:  # raising rolls the row back with its chunks
            raise WaportError(INTERNAL, f"media {params['id'][:12]}…: {written} bytes in the cache, not "
                                        f"{params['size']}")

    # ------------------------------------------------------------ out

    def info(self, media_id: str) -> MediaInfo | None:
        """The record in PostgreSQL (a row there has all its chunks), whether or not this host caches the bytes."""
        validate_id(media_id)
        row = self._call("media_info", lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM waport_media WHERE media_id = %s", (media_id,)).fetchone())
        return None if row is None else _info(row)

    def read(self, media_id: str, offset: int = 0, length: int = CHUNK) -> bytes:
        """From the cache, else the chunks of PostgreSQL that hold the range (one or two)."""
        if not 0 < length <= CHUNK or offset < 0:
            raise WaportError(BAD_REQUEST, f"read 1-{CHUNK} bytes from an offset >= 0")
        with contextlib.suppress(FileNotFoundError):
            return super().read(media_id, offset, length)
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        rows = self._call("media_get", lambda conn: conn.execute(
            "SELECT data FROM waport_media_chunks WHERE media_id = %s AND n BETWEEN %s AND %s ORDER BY n",
            (media_id, first, last), binary=True).fetchall(), 2 * CHUNK)
        data = b"".join(bytes(r[0]) for r in rows)
        start = offset - first * CHUNK
        return data[start:start + length]

    def local_path(self, media_id: str) -> str:
        """The cached file, brought from PostgreSQL first when this host has not got it (a worker sends by
        path). A file PostgreSQL has not got either: the path, absent (the send fails with not_found)."""
        path = self.path(media_id)
        if not os.path.exists(path):
            self.fetch(media_id)
        return path

    def fetch(self, media_id: str) -> bool:
        """Copy a file from PostgreSQL into the cache, chunk by chunk (each call bounded), checked against its
        hash, renamed into place when whole; False if PostgreSQL has not got it."""
        info = self.info(media_id)
        if info is None:
            return False
        path = self.path(media_id)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="pg-")  # 0600
        digest, got = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as fh:
                for n in range((info.size + CHUNK - 1) // CHUNK):
                    row = self._call("media_fetch", lambda conn, n=n: conn.execute(
                        "SELECT data FROM waport_media_chunks WHERE media_id = %s AND n = %s", (media_id, n),
                        binary=True).fetchone(), CHUNK)
                    if row is None:  # removed meanwhile (a prune, a release)
                        raise WaportError(NOT_FOUND, f"no media {media_id}")
                    fh.write(row[0])
                    digest.update(row[0])
                    got += len(row[0])
                fh.flush()
                os.fsync(fh.fileno())
            if got != info.size or digest.hexdigest() != media_id:
                raise WaportError(INTERNAL, f"media {media_id[:12]}… in PostgreSQL does not match its SHA-256")
            make_dir(os.path.dirname(path), 0o700)
            os.replace(tmp, path)  # another thread fetching the same file renames the same bytes
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if is_disk_full(exc):
                raise disk_full("the media file was not cached") from None
            raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        log.info("media %s… fetched from PostgreSQL into the cache (%d bytes)", media_id[:12], info.size)
        return True

    # ------------------------------------------------------------ gone

    def release(self, media_id: str, company: str, keep: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
        """As `MediaStore.release`, in PostgreSQL: the row goes (its chunks with it) when it has no owner left
        and no send not yet out needs it, of any company on any host (`keep` adds this host's view). Best
        effort: PostgreSQL away, the file stays, and `prune` removes it past media_retention."""
        validate_id(media_id)
        params = {"id": media_id, "company": company}

        def run(conn: Any) -> bool | None:
            with conn.transaction():
                row = conn.execute("UPDATE waport_media SET owners = array_remove(owners, %(company)s)"
                                   " WHERE media_id = %(id)s RETURNING owners", params).fetchone()
                if row is None or row[0] or media_id in keep:
                    return None if row is None else False
                return conn.execute(f"DELETE FROM waport_media WHERE media_id = %(id)s AND owners = '{{}}'"
                                    f" AND %(id)s {_UNNEEDED}"
                                    " RETURNING 1", params).fetchone() is not None

        try:
            gone = self._call("media_release", run)
        except WaportError as exc:
            log.warning("media %s…: not released for %s: %s", media_id[:12], company, exc.message)
            return False
        if gone is not False:  # gone, or never in PostgreSQL: the cached copy is stale
            self._uncache(media_id)
        return bool(gone)

    def prune(self, now: float, retention: float, keep: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """Media older than `retention` goes from PostgreSQL unless a send not yet out needs it — the whole
        outbox is asked in the same statement, so another host's queued send keeps its file — and `keep`
        (this host's view) too; then the cache drops what PostgreSQL no longer has (what it dropped itself at
        once, the rest once settled), and stale uploads."""
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            with contextlib.suppress(FileNotFoundError):
                if now - os.stat(path).st_mtime > TMP_KEPT:
                    os.unlink(path)
        params = {"before": now - retention, "keep": sorted(keep), "limit": PRUNE_BATCH}
        removed = [r[0] for r in self._call("media_prune", lambda conn: conn.execute(
            "DELETE FROM waport_media WHERE media_id IN (SELECT media_id FROM waport_media WHERE created < %(before)s"
            " AND NOT (media_id = ANY(%(keep)s::text[]))"
            f" AND media_id {_UNNEEDED}"
            " ORDER BY created LIMIT %(limit)s) RETURNING media_id", params).fetchall())]
        for media_id in removed:
            self._uncache(media_id)
        cached = self.cached()
        if cached:
            present = {r[0] for r in self._call("media_prune", lambda conn: conn.execute(
                "SELECT media_id FROM waport_media WHERE media_id = ANY(%s::text[])", (cached,)).fetchall())}
            for media_id in cached:
                if media_id not in present and self._settled(media_id, now):
                    self._uncache(media_id)
                    removed.append(media_id)
        return removed

    def _settled(self, media_id: str, now: float) -> bool:
        """A cached file is older than CACHE_SETTLE: not one whose upload is being recorded right now (renamed
        into the cache, its transaction not committed yet), which PostgreSQL would not show yet."""
        try:
            return now - os.stat(self.path(media_id)).st_mtime > CACHE_SETTLE
        except FileNotFoundError:
            return False

    def cached(self) -> list[str]:
        """The ids of the files this host caches."""
        found = []
        for sub in os.listdir(self.root):
            folder = os.path.join(self.root, sub)
            if sub != "tmp" and os.path.isdir(folder):
                found.extend(name for name in os.listdir(folder) if _ID.match(name))
        return sorted(found)

    def _uncache(self, media_id: str) -> None:
        path = self.path(media_id)
        for p in (path, path + ".json"):  # .json: a record a single host wrote before it joined a cluster
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def _info(row: tuple) -> MediaInfo:
    media_id, size, mimetype, filename, created, owners = row
    return MediaInfo(media_id, int(size), mimetype, filename, float(created), list(owners or []))
