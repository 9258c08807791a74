"""Media in and out through the control socket (DESIGN.md §11): `media_put`, `media_get`.

The daemon never opens a path a caller names (ZeroMQ ipc says nothing of who the caller is, and
under the systemd unit it would not even see the caller's files): bytes come as base64 chunks of
at most 760 KiB (under 1 MiB encoded, so a chunk and its envelope fit one control frame), and go back the same way.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipc.errors import BAD_REQUEST, WaportError
from ipc.mediastore import WIRE_CHUNK, MediaStore, Upload
from ipc.validation import validate_company
from waportd.services import Services

log = logging.getLogger("waport.media")

MAX_UPLOADS = 64  # unfinished uploads at once
UPLOAD_IDLE = 60.0  # seconds an unfinished upload may wait for its next chunk
PRUNE_EVERY = 3600.0  # seconds between two looks for media past media_retention
IDLE_CLOSE = 60.0  # seconds unused before the store's PostgreSQL connection (cluster mode) closes


@dataclass
class Pending:
    upload: Upload
    last: float


class MediaDesk:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.uploads: dict[str, Pending] = {}
        self._store: MediaStore | None = None
        self.next_prune = 0.0

    @property
    def store(self) -> MediaStore:
        cfg = self.services.cfg
        if self._store is None:
            self._store = self.open_store()
        self._store.max_bytes = cfg.media_max_bytes  # a reload may change it
        return self._store

    def open_store(self) -> MediaStore:
        """`STATE_DIR/media/`; in cluster mode (DESIGN.md §12) PostgreSQL, with that directory as this host's
        cache, so a company's media is there for whichever host runs it next."""
        cfg = self.services.cfg
        root = os.path.join(cfg.state_dir, "media")
        if not cfg.cluster_dsn:
            return MediaStore(root, cfg.media_max_bytes)
        from ipc.clusterschema import supervisor_name
        from ipc.pgdb import PgDb  # psycopg: only in cluster mode
        from ipc.pgmediastore import PgMediaStore

        return PgMediaStore(root, cfg.media_max_bytes, PgDb(cfg.cluster_dsn, supervisor_name(cfg.host_id, "media")))

    def close(self) -> None:
        for pending in self.uploads.values():
            pending.upload.abort()
        self.uploads.clear()
        if self._store is not None:
            self._store.close()

    def prune(self, wall: float, needed: Callable[[], set[str]] = set) -> None:
        """Media older than `media_retention` goes (an hourly look from the loop), except what a send not yet
        out still needs (`needed()`, asked only when the hour comes: it reads every journal; in a cluster the
        store in PostgreSQL asks the whole outbox itself)."""
        cfg = self.services.cfg
        if self._store is not None:
            self._store.close_if_idle(IDLE_CLOSE)  # cluster mode: no connection held for an hourly look
        if wall < self.next_prune or not (cfg.cluster_dsn or os.path.isdir(os.path.join(cfg.state_dir, "media"))):
            return
        self.next_prune = wall + PRUNE_EVERY
        try:
            removed = self.store.prune(wall, cfg.media_retention, set() if cfg.cluster_dsn else needed())
        except (WaportError, sqlite3.Error) as exc:  # PostgreSQL away (cluster mode): the next hour's look
            log.warning("media retention deferred: %s", getattr(exc, "message", exc))
            return
        if removed:
            log.info("%d media files past media_retention removed", len(removed))

    def forget_idle(self, now: float) -> None:
        for upload_id, pending in list(self.uploads.items()):
            if now - pending.last > UPLOAD_IDLE:
                pending.upload.abort()
                del self.uploads[upload_id]

    def cmd_media_put(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """`{data, upload?, last?, mimetype?, filename?, company?}`: chunks in order; the last one stores the file
        and answers `{media_id, size, mimetype, sha256}`, the others `{upload, size}`."""
        now = self.services.clock.monotonic()
        self.forget_idle(now)
        chunk = decode(args.get("data"))
        upload_id = args.get("upload")
        if upload_id is None:
            if len(self.uploads) >= MAX_UPLOADS:
                raise WaportError(BAD_REQUEST, f"{MAX_UPLOADS} uploads are unfinished; finish or wait for them")
            upload_id = "up_" + secrets.token_hex(8)
            self.uploads[upload_id] = Pending(self.store.begin(), now)
        pending = self.uploads.get(upload_id) if isinstance(upload_id, str) else None
        if pending is None:
            raise WaportError(BAD_REQUEST, f"no upload {str(upload_id)[:40]!r} (unknown, finished, or idle "
                                           f"more than {UPLOAD_IDLE:g} s)")
        pending.last = now
        try:
            pending.upload.write(chunk)
            if not args.get("last"):
                ok({"upload": upload_id, "size": pending.upload.size})
                return
            del self.uploads[upload_id]
            company = args.get("company")
            if company is not None:
                validate_company(company)
            filename = args.get("filename")
            info = pending.upload.finish(args.get("mimetype"), company,
                                         filename if isinstance(filename, str) else None)
        except WaportError:
            self.uploads.pop(upload_id, None)  # the upload aborted itself
            raise
        log.info("media %s… stored (%d bytes, %s)", info.media_id[:12], info.size, info.mimetype)
        ok(info.public())

    def cmd_media_get(self, args: dict[str, Any], ok: Callable, fail: Callable) -> None:
        """`{media_id, offset?, company?}` -> `{data, offset, size, mimetype, eof}`; `company` is the reader's
        scope (the HTTP API passes a company token's): it reads only media its company sent or received."""
        company = args.get("company")
        if company is not None:
            validate_company(company)
        info = self.store.readable(args.get("media_id"), company)
        offset = args.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= info.size:
            raise WaportError(BAD_REQUEST, f"offset must be a whole number from 0 to {info.size}")
        data = self.store.read(info.media_id, offset, WIRE_CHUNK) if offset < info.size else b""
        ok({"data": base64.b64encode(data).decode(), "offset": offset, "size": info.size,
            "mimetype": info.mimetype, "sha256": info.sha256, "eof": offset + len(data) >= info.size})


def decode(data: Any) -> bytes:
    if not isinstance(data, str):
        raise WaportError(BAD_REQUEST, "data: base64 of the chunk's bytes")
    try:
        chunk = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise WaportError(BAD_REQUEST, "data: not base64") from None
    if len(chunk) > WIRE_CHUNK:
        raise WaportError(BAD_REQUEST, f"data: a chunk carries at most {WIRE_CHUNK} bytes")
    return chunk
