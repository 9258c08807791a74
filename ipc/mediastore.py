"""The media store (DESIGN.md §11): `STATE_DIR/media/` (0700), files named by their SHA-256 (0600).

Bytes come in as bytes, in chunks of at most 1 MiB (`Upload`): never as a path someone names. A file
is written to `tmp/`, hashed as it grows, and renamed into place when complete, so a reader never
sees half a file and the same bytes stored twice are one file. Beside each file a small JSON record
keeps its MIME type, size, first file name and the companies that sent or received it (a company
token reads only those).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from ipc.errors import BAD_REQUEST, MEDIA_TOO_LARGE, NOT_FOUND, WaportError, disk_full, is_disk_full
from ipc.files import make_dir, write_json_atomic

CHUNK = 1 << 20  # the most bytes one store write or read takes
# Raw bytes per `media_put` / `media_get` control frame: under 1 MiB once base64-encoded, envelope included
# (the control socket's frame limit). The CLI, the HTTP API and waportd all cut media this way.
WIRE_CHUNK = 760 << 10
DEFAULT_MAX_BYTES = 64 << 20
TMP_KEPT = 86400.0  # an upload left unfinished this long is removed by `prune`
_ID = re.compile(r"^[0-9a-f]{64}$")
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,127}$")
# Which MIME types each send type takes (DESIGN.md §11); a document takes any.
KINDS = {"image": ("image/",), "video": ("video/",), "audio": ("audio/",), "document": ("",)}


def put_args(chunk: bytes, upload: str | None) -> dict[str, Any]:
    """The arguments of one `media_put` frame: the chunk, and the upload it continues (None: a new one)."""
    args: dict[str, Any] = {"data": base64.b64encode(chunk).decode()}
    if upload is not None:
        args["upload"] = upload
    return args


@dataclass
class MediaInfo:
    media_id: str
    size: int
    mimetype: str
    filename: str | None = None
    created: float = field(default_factory=time.time)
    owners: list[str] = field(default_factory=list)  # companies that sent or received it

    @property
    def sha256(self) -> str:
        return self.media_id

    def public(self) -> dict[str, Any]:
        return {"media_id": self.media_id, "size": self.size, "mimetype": self.mimetype, "sha256": self.sha256}


def validate_mimetype(mimetype: Any, kind: str | None = None) -> str:
    """A `type/subtype` (parameters dropped, lower case); with `kind`, one that kind of message takes."""
    if not isinstance(mimetype, str) or not mimetype.strip():
        raise WaportError(BAD_REQUEST, "mimetype: a MIME type such as image/jpeg")
    base = mimetype.split(";", 1)[0].strip().lower()
    if not _MIME.match(base):
        raise WaportError(BAD_REQUEST, f"mimetype: {mimetype[:80]!r} is not a MIME type")
    if kind is not None:
        prefixes = KINDS.get(kind)
        if prefixes is None:
            raise WaportError(BAD_REQUEST, f"{kind!r} carries no media")
        if not base.startswith(prefixes):
            raise WaportError(BAD_REQUEST, f"a {kind} needs a {prefixes[0]}* file, not {base}")
    return base


def validate_id(media_id: Any) -> str:
    if not isinstance(media_id, str) or not _ID.match(media_id):
        raise WaportError(BAD_REQUEST, "media_id: the 64 hex digits of a stored file's SHA-256")
    return media_id


class Upload:
    """One file on its way in; `finish` stores it, `abort` (or an error) leaves nothing behind."""

    def __init__(self, store: MediaStore) -> None:
        self.store = store
        fd, self.tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix="up-")  # 0600
        self.fd: int | None = fd
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.fd is None:
            raise WaportError(BAD_REQUEST, "this upload is finished")
        if len(chunk) > CHUNK:
            self.abort()
            raise WaportError(BAD_REQUEST, f"a chunk carries at most {CHUNK} bytes, not {len(chunk)}")
        if self.size + len(chunk) > self.store.max_bytes:
            self.abort()
            raise WaportError(MEDIA_TOO_LARGE, f"media exceeds media_max_bytes ({self.store.max_bytes} bytes)",
                              max_bytes=self.store.max_bytes)
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.drop(exc)
        self.hash.update(chunk)
        self.size += len(chunk)

    def finish(self, mimetype: str, company: str | None = None, filename: str | None = None) -> MediaInfo:
        if self.fd is None:
            raise WaportError(BAD_REQUEST, "this upload is finished")
        try:
            mimetype = validate_mimetype(mimetype)
            if self.size == 0:
                raise WaportError(BAD_REQUEST, "an empty file is no media")
            os.fsync(self.fd)
        except OSError as exc:
            self.drop(exc)
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        self.fd = None
        media_id = self.hash.hexdigest()
        path = self.store.path(media_id)
        make_dir(os.path.dirname(path), 0o700)
        if os.path.exists(path):
            os.unlink(self.tmp)  # the same bytes are here already
        else:
            os.rename(self.tmp, path)
        return self.store.record(media_id, self.size, mimetype, company, filename)

    def drop(self, exc: OSError) -> NoReturn:
        """A write failed: nothing of the upload stays, and a full disk is said as such."""
        self.abort()
        if is_disk_full(exc):
            raise disk_full("the upload was dropped") from None
        raise exc

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class MediaStore:
    def __init__(self, root: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.tmp_dir = os.path.join(root, "tmp")
        make_dir(root, 0o700)
        make_dir(self.tmp_dir, 0o700)

    def path(self, media_id: str) -> str:
        validate_id(media_id)
        return os.path.join(self.root, media_id[:2], media_id)

    def begin(self) -> Upload:
        return Upload(self)

    def put(self, data: bytes, mimetype: str, company: str | None = None, filename: str | None = None) -> MediaInfo:
        upload = self.begin()
        for start in range(0, len(data), CHUNK):
            upload.write(data[start:start + CHUNK])
        return upload.finish(mimetype, company, filename)

    def record(self, media_id: str, size: int, mimetype: str, company: str | None, filename: str | None) -> MediaInfo:
        """Create or extend the record beside a stored file (a second owner, a later sender)."""
        info = self.info(media_id) or MediaInfo(media_id, size, mimetype, _safe_name(filename))
        if company is not None and company not in info.owners:
            info.owners.append(company)
        write_json_atomic(self.path(media_id) + ".json", asdict(info), 0o600)
        return info

    def info(self, media_id: str) -> MediaInfo | None:
        path = self.path(media_id)
        try:
            with open(path + ".json") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        if not os.path.exists(path):
            return None
        return MediaInfo(**{k: data[k] for k in ("media_id", "size", "mimetype", "filename", "created", "owners")
                            if k in data})

    def readable(self, media_id: str, company: str | None) -> MediaInfo:
        """The record, if `company` may read it (None: an admin); else not_found, the same either way."""
        info = self.info(validate_id(media_id))
        if info is None or (company is not None and company not in info.owners):
            raise WaportError(NOT_FOUND, f"no media {media_id}")
        return info

    def read(self, media_id: str, offset: int = 0, length: int = CHUNK) -> bytes:
        if not 0 < length <= CHUNK or offset < 0:
            raise WaportError(BAD_REQUEST, f"read 1-{CHUNK} bytes from an offset >= 0")
        with open(self.path(media_id), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def local_path(self, media_id: str) -> str:
        """Where the file is for a process that opens it (a worker's send): here, the store itself."""
        return self.path(media_id)

    def close(self) -> None:
        """Nothing held open (a store in PostgreSQL holds a connection)."""

    def close_if_idle(self, idle: float) -> bool:
        return False

    def release(self, media_id: str, company: str, keep: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
        """`company` no longer holds this file (its message was erased). The same bytes may belong to
        others, or a queued send (`keep`) may need them: the file goes only when nobody does. True if gone."""
        info = self.info(media_id)
        if info is None:
            return False
        owners = [o for o in info.owners if o != company]
        path = self.path(media_id)
        if owners or media_id in keep:
            info.owners = owners
            write_json_atomic(path + ".json", asdict(info), 0o600)
            return False
        for p in (path, path + ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        return True

    def prune(self, now: float, retention: float, keep: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """Files older than `retention` go, unless a queued send still needs them (`keep`); stale uploads too."""
        removed = []
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            with contextlib.suppress(FileNotFoundError):
                if now - os.stat(path).st_mtime > TMP_KEPT:
                    os.unlink(path)
        for sub in os.listdir(self.root):
            folder = os.path.join(self.root, sub)
            if sub == "tmp" or not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if not _ID.match(name) or name in keep:
                    continue
                info = self.info(name)
                if info is None or now - info.created > retention:
                    for path in (os.path.join(folder, name), os.path.join(folder, name) + ".json"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                    removed.append(name)
        return removed


def _safe_name(filename: str | None) -> str | None:
    """A sender's file name is kept to show, never used as a path: its last part, printable, bounded."""
    if not filename:
        return None
    name = os.path.basename(str(filename).replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable())[:200]
    return name or None
