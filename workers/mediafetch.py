"""Inbound media (DESIGN.md §11): the message is journaled first, then its media is downloaded into the
store, then the message is published with the §11 `media` object — stored, or failed with why.

A download runs on a small pool of its own, so a large file never stalls the worker's loop, its
heartbeats or its sends. It is bounded by the backend (each call has a deadline) and tried up to
`ATTEMPTS` times; a failure never suppresses the message, and `waportctl media fetch` tries again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ipc.errors import BAD_REQUEST, MEDIA_TOO_LARGE, NOT_FOUND, NOT_IMPLEMENTED, WaportError
from ipc.mediastore import MediaStore, validate_mimetype
from ipc.richmessage import inbound_media
from workers.backend import Backend, BackendError

log = logging.getLogger("waport.media")

PENDING = "pending"
ATTEMPTS = 3
PAUSES = (0.5, 2.0)  # seconds between attempts
FINAL = frozenset({NOT_IMPLEMENTED, NOT_FOUND, BAD_REQUEST, MEDIA_TOO_LARGE})  # trying again changes nothing


def is_pending(msg: dict[str, Any]) -> bool:
    media = msg.get("media")
    return isinstance(media, dict) and media.get("status") == PENDING


class MediaFetcher:
    def __init__(self, company: str, backend: Backend, store: MediaStore | None,
                 done: Callable[[dict[str, Any]], None]) -> None:
        self.company = company
        self.backend = backend
        self.store = store
        self.done = done  # thread-safe: gets the message with its media settled
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=backend.download_concurrency, thread_name_prefix="media")

    def submit(self, msg: dict[str, Any]) -> None:
        self.pool.submit(self._run, msg)

    def _run(self, msg: dict[str, Any]) -> None:
        try:
            media = self.fetch(msg)
        except Exception as exc:  # noqa: BLE001 - a bug must still let the message out
            log.exception("media download of %s failed", msg.get("id"))
            media = inbound_media(None, msg.get("media") or {}, f"internal error: {exc!r}")
        self.done({**msg, "media": media})

    def fetch(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Download the media of a journaled inbound message: its §11 `media` object, stored or failed."""
        announced = msg.get("media") if isinstance(msg.get("media"), dict) else {}
        if self.store is None:
            return inbound_media(None, announced, "this worker has no media store")
        size = announced.get("size")
        if isinstance(size, int) and size > self.store.max_bytes:
            return inbound_media(None, announced, f"{MEDIA_TOO_LARGE}: announced {size} bytes, more than "
                                                  f"media_max_bytes ({self.store.max_bytes}); not downloaded")
        if "_fetch" not in msg:
            return inbound_media(None, announced, "the message says nothing to download it by")
        error = ""
        for attempt in range(ATTEMPTS):
            upload = self.store.begin()
            try:
                self.backend.fetch_media(msg["_fetch"], upload.write)
                info = upload.finish(_mimetype(announced.get("mimetype")), self.company, announced.get("filename"))
            except (BackendError, WaportError) as exc:
                upload.abort()
                code = getattr(exc, "code", "")
                error = f"{code}: {getattr(exc, 'message', exc)}"
                if code in FINAL:
                    break
            except Exception as exc:  # noqa: BLE001 - an unknown failure is tried again like any other
                upload.abort()
                error = repr(exc)
            else:
                sha = announced.get("sha256")
                if isinstance(sha, str) and sha and sha != info.sha256:
                    error = "the downloaded bytes do not match the announced SHA-256"
                else:
                    log.info("media of %s stored (%d bytes, %s)", msg.get("id"), info.size, info.mimetype)
                    return inbound_media(info, announced)
            if attempt + 1 < ATTEMPTS and self.stopping.wait(PAUSES[min(attempt, len(PAUSES) - 1)]):
                break
        log.warning("media of %s not downloaded: %s", msg.get("id"), error)
        return inbound_media(None, announced, error or "download failed")

    def stop(self) -> None:
        """Downloads in flight are left to finish on their own; their messages stay journaled as pending,
        and the next worker downloads them again."""
        self.stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _mimetype(value: Any) -> str:
    try:
        return validate_mimetype(value)
    except WaportError:
        return "application/octet-stream"
