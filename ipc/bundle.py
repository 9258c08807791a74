"""Session bundles: one company's session in one file (`waportctl export`, `backup`, `import`).

A plain bundle is a byte stream in which every byte is covered by the digest at its end, so a
truncated file, a flipped byte or a tail appended are all caught before anything is installed:

    b"WAPB" | format version (u16) | manifest length (u32) | manifest JSON | the members' bytes, in
    manifest order | SHA-256 of everything before it (32 bytes)

The manifest names the format version, the company, the kind (`export`: the company was stopped
first, the bundle is its only live copy; `backup`: copied while it ran), when and where it was
made, and each member's name, size and SHA-256. Members: `session/<file>` (the backend's
credentials or session store), `journal.db`, `media/<sha256>` and `state.json` (desired state,
webhook endpoint, media records).

An encrypted bundle wraps a plain one (the passphrase never reaches waportd: waportctl encrypts
and decrypts): scrypt derives a key from the passphrase, and the plain bytes go in chunks sealed
with AES-GCM (the STREAM construction: each nonce carries the chunk's number and whether it is
the last, and every chunk authenticates the header), so large bundles stream, and a wrong
passphrase, a changed byte, a chunk dropped or a truncated file are each a clear error:

    b"WAPE" | version (u16) | log2 N, r, p (u8 each) | salt (16) | nonce prefix (7) |
    chunk size (u32) | passphrase check (16) | sealed chunks (chunk size + 16 bytes; the last shorter)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import sqlite3
import struct
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ipc.errors import WaportError
from ipc.files import create_private
from ipc.validation import validate_company

MAGIC = b"WAPB"
ENCRYPTED_MAGIC = b"WAPE"
FORMAT_VERSION = 1
KINDS = ("export", "backup")
EXPORT, BACKUP = KINDS
MAX_MANIFEST = 1 << 20
MAX_MEMBERS = 100_000
DIGEST_SIZE = 32
COPY_CHUNK = 1 << 20
STATE_MEMBER = "state.json"
JOURNAL_MEMBER = "journal.db"
_MEMBER_RE = re.compile(r"(session|media)/[A-Za-z0-9][A-Za-z0-9._-]{0,127}|journal\.db|state\.json")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEAD = struct.Struct(">4sHI")  # magic, version, manifest length

# Encryption (scrypt + AES-256-GCM).
ENC_VERSION = 1
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 15, 8, 1  # 32 MiB and about 0.1 s per derivation
MAX_LOG2_N = 20  # a header asking for more is refused (it would cost a reader 1 GiB)
ENC_CHUNK = 1 << 16
TAG = 16
_ENC_HEAD = struct.Struct(">4sHBBB16s7sI")  # magic, version, log2 N, r, p, salt, nonce prefix, chunk size
CHECK = 16


class BundleError(Exception):
    """A bundle that cannot be trusted or read; the message says why, for the operator."""


@dataclass
class Member:
    name: str
    size: int
    sha256: str


@dataclass
class Manifest:
    company: str
    kind: str
    created: float
    source_host: str
    waport_version: str
    members: list[Member] = field(default_factory=list)
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise BundleError("the manifest is not JSON: the file is damaged") from None
        if not isinstance(data, dict):
            raise BundleError("the manifest is not a JSON object: the file is damaged")
        version = data.get("format")
        if version != FORMAT_VERSION:
            raise BundleError(newer(version) if isinstance(version, int) and version > FORMAT_VERSION
                              else f"the manifest's format {version!r} is not one this waport reads")
        try:
            company = validate_company(data.get("company"))
        except WaportError as exc:
            raise BundleError(f"manifest: {exc.message}") from None
        kind = data.get("kind")
        if kind not in KINDS:
            raise BundleError(f"manifest: kind {kind!r} is neither export nor backup")
        created = data.get("created")
        if not isinstance(created, int | float) or isinstance(created, bool):
            raise BundleError("manifest: created must be a timestamp")
        host, version_ = data.get("source_host"), data.get("waport_version")
        if not isinstance(host, str) or not isinstance(version_, str):
            raise BundleError("manifest: source_host and waport_version must be strings")
        raw_members = data.get("members")
        if not isinstance(raw_members, list) or len(raw_members) > MAX_MEMBERS:
            raise BundleError("manifest: members must be a list")
        members, names = [], set()
        for m in raw_members:
            if not isinstance(m, dict):
                raise BundleError("manifest: a member is not an object")
            name, size, digest = m.get("name"), m.get("size"), m.get("sha256")
            if not isinstance(name, str) or not _MEMBER_RE.fullmatch(name) or name in names:
                raise BundleError(f"manifest: member name {str(name)[:80]!r} is not allowed (or repeated)")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BundleError(f"manifest: {name}: size must be a whole number >= 0")
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise BundleError(f"manifest: {name}: sha256 must be 64 hex digits")
            if name.startswith("session/") and not carried(name[len("session/"):]):
                raise BundleError(f"manifest: {name} is not a file a session carries")
            if name.startswith("media/") and name[len("media/"):] != digest:
                raise BundleError(f"manifest: {name} is not named by its SHA-256")
            names.add(name)
            members.append(Member(name, size, digest))
        return cls(company, kind, float(created), host, version_, members)


def newer(version: object) -> str:
    return (f"this bundle was written by a newer waport (format {version}); this one reads format "
            f"{FORMAT_VERSION}: upgrade waport on this host")


def file_digest(path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def manifest_for(company: str, kind: str, sources: dict[str, str], created: float, host: str,
                 version: str) -> Manifest:
    """The manifest of the files `sources` (member name -> path; private copies that do not change)."""
    members = []
    for name, path in sources.items():
        if not _MEMBER_RE.fullmatch(name):
            raise ValueError(f"member name {name!r} is not allowed")
        size, digest = file_digest(path)
        members.append(Member(name, size, digest))
    return Manifest(validate_company(company), kind, created, host, version, members)


def write(out: BinaryIO, manifest: Manifest, sources: dict[str, str]) -> str:
    """Write a plain bundle of `sources` (as `manifest` lists them) to `out`; the SHA-256 of all it wrote."""
    digest = hashlib.sha256()

    def put(data: bytes) -> None:
        digest.update(data)
        out.write(data)

    raw = manifest.to_json()
    put(_HEAD.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw)
    for member in manifest.members:
        left = member.size
        with open(sources[member.name], "rb") as fh:
            while left:
                chunk = fh.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise BundleError(f"{member.name} shrank while it was written")
                put(chunk)
                left -= len(chunk)
    tail = digest.digest()
    out.write(tail)
    digest.update(tail)
    return digest.hexdigest()


def read(stream: BinaryIO, dest: str) -> Manifest:
    """Read and verify a plain bundle, its members written under `dest` (0700 dirs, 0600 files).

    Everything is checked — the magic, the version, each member's size and SHA-256, the digest of the
    whole stream and that nothing follows it — before this returns; on any fault `BundleError` says
    which, and the caller throws `dest` away.
    """
    digest = hashlib.sha256()

    def take(n: int, what: str) -> bytes:
        data = _read_exactly(stream, n)
        if len(data) < n:
            raise BundleError(f"the file ends inside {what}: it is truncated")
        digest.update(data)
        return data

    head = _read_exactly(stream, _HEAD.size)
    if head[:4] == ENCRYPTED_MAGIC:
        raise BundleError("the bundle is encrypted: give its passphrase")
    if len(head) < _HEAD.size or head[:4] != MAGIC:
        raise BundleError("not a waport bundle (no WAPB header)" if len(head) >= 4 else "the file is truncated")
    digest.update(head)
    magic, version, length = _HEAD.unpack(head)
    if version > FORMAT_VERSION:
        raise BundleError(newer(version))
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format {version} is not one this waport reads")
    if length > MAX_MANIFEST:
        raise BundleError(f"the manifest claims {length} bytes (at most {MAX_MANIFEST}): the file is damaged")
    manifest = Manifest.from_json(take(length, "the manifest"))
    for member in manifest.members:
        path = os.path.join(dest, member.name)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        mine = hashlib.sha256()
        with os.fdopen(create_private(path), "wb") as fh:
            left = member.size
            while left:
                chunk = take(min(COPY_CHUNK, left), member.name)
                mine.update(chunk)
                fh.write(chunk)
                left -= len(chunk)
        if mine.hexdigest() != member.sha256:
            raise BundleError(f"{member.name} does not match its SHA-256 in the manifest: the file is damaged "
                              "or was changed")
    tail = _read_exactly(stream, DIGEST_SIZE)
    if len(tail) < DIGEST_SIZE:
        raise BundleError("the file ends before its final digest: it is truncated")
    if not hmac.compare_digest(tail, digest.digest()):
        raise BundleError("the bundle's final digest does not match its contents: the file is damaged or was "
                          "changed")
    if stream.read(1):
        raise BundleError("bytes follow the bundle's end: the file is damaged or was changed")
    return manifest


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def sniff(head: bytes) -> str | None:
    """`plain`, `encrypted`, or None (not a bundle), from a file's first 4 bytes."""
    return {MAGIC: "plain", ENCRYPTED_MAGIC: "encrypted"}.get(head[:4])


# ---------------------------------------------------------------- what goes in, how it is copied


def carried(name: str) -> bool:
    """Whether a file of a session directory travels in a bundle: not the lock, not the journal (a member
    of its own), not SQLite's side files (a database is copied whole, through its backup API), not a
    temporary file of an atomic write."""
    if name in ("session.lock", JOURNAL_MEMBER) or name.startswith(JOURNAL_MEMBER):
        return False
    if name.endswith(("-wal", "-shm", "-journal")) or ".tmp." in name:
        return False
    return bool(_MEMBER_RE.fullmatch("session/" + name))


def is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def copy_sqlite(src: str, dst: str) -> None:
    """A consistent copy of a live SQLite database (WAL included) through SQLite's backup API."""
    source = sqlite3.connect(src, timeout=10)  # read only in effect; a read-only open would leave -wal/-shm files
    try:
        os.close(create_private(dst))
        target = sqlite3.connect(dst)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        finally:
            target.close()
    finally:
        source.close()


def copy_file(src: str, dst: str) -> None:
    """A private copy (0600) of a file that is replaced atomically, never written in place."""
    with os.fdopen(create_private(dst), "wb") as out, open(src, "rb") as fh:
        shutil.copyfileobj(fh, out, COPY_CHUNK)


# ---------------------------------------------------------------- encryption


def _keys(passphrase: str, salt: bytes, log2_n: int, r: int, p: int) -> tuple[bytes, bytes]:
    if not passphrase:
        raise BundleError("the passphrase is empty")
    material = Scrypt(salt=salt, length=64, n=1 << log2_n, r=r, p=p).derive(passphrase.encode())
    return material[:32], material[32:]


def _nonce(prefix: bytes, n: int, last: bool) -> bytes:
    if n >= 1 << 32:
        raise BundleError("the bundle is too large to encrypt (2^32 chunks)")
    return prefix + n.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class EncryptingWriter:
    """A file-like `write` that seals what it is given into `out`; `close()` seals the last chunk."""

    def __init__(self, out: BinaryIO, passphrase: str, chunk_size: int = ENC_CHUNK,
                 log2_n: int = SCRYPT_LOG2_N) -> None:
        self.out = out
        self.chunk_size = chunk_size
        salt, self.prefix = os.urandom(16), os.urandom(7)
        key, check_key = _keys(passphrase, salt, log2_n, SCRYPT_R, SCRYPT_P)
        head = _ENC_HEAD.pack(ENCRYPTED_MAGIC, ENC_VERSION, log2_n, SCRYPT_R, SCRYPT_P, salt, self.prefix, chunk_size)
        self.header = head + hmac.new(check_key, head, hashlib.sha256).digest()[:CHECK]
        self.aead = AESGCM(key)
        self.buffer = bytearray()
        self.n = 0
        self.closed = False
        out.write(self.header)

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) > self.chunk_size:  # strictly more: the last chunk is never empty unless all is
            self._seal(bytes(self.buffer[:self.chunk_size]), last=False)
            del self.buffer[:self.chunk_size]
        return len(data)

    def _seal(self, chunk: bytes, last: bool) -> None:
        self.out.write(self.aead.encrypt(_nonce(self.prefix, self.n, last), chunk, self.header))
        self.n += 1

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self.buffer), last=True)
            self.buffer.clear()
            self.closed = True


class DecryptingReader:
    """A file-like `read` of the plain bytes of an encrypted bundle; every chunk is authenticated before
    any of its bytes are handed out, and the end must be the sealed last chunk."""

    def __init__(self, stream: BinaryIO, passphrase: str) -> None:
        self.stream = stream
        raw = _read_exactly(stream, _ENC_HEAD.size + CHECK)
        if len(raw) < _ENC_HEAD.size + CHECK or raw[:4] != ENCRYPTED_MAGIC:
            raise BundleError("not an encrypted waport bundle, or truncated in its header")
        head, check = raw[:_ENC_HEAD.size], raw[_ENC_HEAD.size:]
        _magic, version, log2_n, r, p, salt, self.prefix, self.chunk_size = _ENC_HEAD.unpack(head)
        if version > ENC_VERSION:
            raise BundleError(f"this bundle was encrypted by a newer waport (encryption version {version}); "
                              f"upgrade waport on this host")
        if version != ENC_VERSION or not 10 <= log2_n <= MAX_LOG2_N or not 1 <= r <= 32 or not 1 <= p <= 16 \
                or not 1024 <= self.chunk_size <= 1 << 24:
            raise BundleError("the encryption header is damaged")
        key, check_key = _keys(passphrase, salt, log2_n, r, p)
        if not hmac.compare_digest(hmac.new(check_key, head, hashlib.sha256).digest()[:CHECK], check):
            raise BundleError("wrong passphrase (or the file's header is damaged)")
        self.header = raw
        self.aead = AESGCM(key)
        self.n = 0
        self.plain = b""
        self.ahead = _read_exactly(stream, self.chunk_size + TAG)
        self.done = False

    def _next(self) -> None:
        sealed = self.ahead
        self.ahead = _read_exactly(self.stream, self.chunk_size + TAG)
        last = not self.ahead
        try:
            self.plain = self.aead.decrypt(_nonce(self.prefix, self.n, last), sealed, self.header)
        except InvalidTag:
            raise BundleError(f"chunk {self.n} of the encrypted bundle does not authenticate: the file is "
                              "truncated, damaged or was changed") from None
        self.n += 1
        self.done = last

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        want = n if n >= 0 else float("inf")
        while want > 0:
            if not self.plain:
                if self.done:
                    break
                self._next()
                continue
            take = self.plain[: int(min(want, len(self.plain)))]
            self.plain = self.plain[len(take):]
            parts.append(take)
            want -= len(take)
        return b"".join(parts)


def fail_message(exc: BaseException) -> str:
    """What an operator reads when a bundle cannot be read: the reason, never a traceback."""
    if isinstance(exc, BundleError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot read or write a file: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
