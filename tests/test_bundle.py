"""The session bundle format (ipc/bundle.py): what goes in comes out, and anything else is refused.

Pure: files in a temp directory, no process. A bundle that is truncated anywhere, has any byte
changed or something appended, comes from a newer waport, or is decrypted with the wrong passphrase
is a `BundleError` that says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import struct

import pytest

from ipc import bundle
from ipc.bundle import BundleError


def make_sources(tmp_path, creds: bytes = b'{"token": "t0k"}') -> dict[str, str]:
    files = {"session/sim-creds.json": creds, "journal.db": b"J" * 3000,
             "media/" + hashlib.sha256(b"picture").hexdigest(): b"picture", "state.json": b'{"wanted": true}'}
    sources = {}
    for i, (name, data) in enumerate(files.items()):
        path = tmp_path / f"src{i}"
        path.write_bytes(data)
        sources[name] = str(path)
    return sources


def plain_bundle(tmp_path, kind: str = bundle.EXPORT) -> tuple[bytes, dict[str, str]]:
    sources = make_sources(tmp_path)
    manifest = bundle.manifest_for("acme", kind, sources, 1700000000.0, "host-a", "0.test")
    out = io.BytesIO()
    digest = bundle.write(out, manifest, sources)
    assert hashlib.sha256(out.getvalue()).hexdigest() == digest
    return out.getvalue(), sources


def read_into(tmp_path, data: bytes, name: str = "dest") -> bundle.Manifest:
    dest = tmp_path / name
    dest.mkdir()
    return bundle.read(io.BytesIO(data), str(dest))


def test_round_trip_gives_back_every_member_and_the_manifest(tmp_path) -> None:
    data, sources = plain_bundle(tmp_path)
    manifest = read_into(tmp_path, data)
    assert (manifest.company, manifest.kind, manifest.source_host) == ("acme", "export", "host-a")
    assert manifest.created == 1700000000.0
    assert sorted(m.name for m in manifest.members) == sorted(sources)
    for name, src in sources.items():
        got = tmp_path / "dest" / name
        assert got.read_bytes() == open(src, "rb").read()
        assert got.stat().st_mode & 0o777 == 0o600


def test_a_truncated_bundle_is_refused_wherever_it_ends(tmp_path) -> None:
    data, _ = plain_bundle(tmp_path)
    for i, cut in enumerate(range(0, len(data), 7)):
        with pytest.raises(BundleError, match="truncated|damaged|not a waport"):
            read_into(tmp_path, data[:cut], f"d{i}")


def test_any_flipped_byte_is_refused(tmp_path) -> None:
    data, _ = plain_bundle(tmp_path)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(BundleError):
            read_into(tmp_path, bytes(bad), f"d{i}")


def test_bytes_after_the_end_are_refused(tmp_path) -> None:
    data, _ = plain_bundle(tmp_path)
    with pytest.raises(BundleError, match="bytes follow"):
        read_into(tmp_path, data + b"x")


def test_a_bundle_of_a_newer_format_says_to_upgrade(tmp_path) -> None:
    data, _ = plain_bundle(tmp_path)
    newer = data[:4] + struct.pack(">H", bundle.FORMAT_VERSION + 1) + data[6:]
    with pytest.raises(BundleError, match="newer waport .*upgrade"):
        read_into(tmp_path, newer)


def test_a_manifest_naming_a_path_outside_is_refused(tmp_path) -> None:
    for name in ("../escape", "session/../../x", "/etc/passwd", "session/.hidden", "other/x", "session/session.lock",
                 "session/x.db-wal"):
        raw = json.dumps({"format": 1, "company": "acme", "kind": "export", "created": 1.0, "source_host": "h",
                          "waport_version": "v", "members": [{"name": name, "size": 0, "sha256": "0" * 64}]})
        with pytest.raises(BundleError, match="not allowed|not a file a session carries"):
            bundle.Manifest.from_json(raw.encode())


def test_a_manifest_with_a_bad_company_or_kind_is_refused() -> None:
    base = {"format": 1, "company": "acme", "kind": "export", "created": 1.0, "source_host": "h",
            "waport_version": "v", "members": []}
    with pytest.raises(BundleError, match="company id"):
        bundle.Manifest.from_json(json.dumps({**base, "company": "a/b"}).encode())
    with pytest.raises(BundleError, match="kind"):
        bundle.Manifest.from_json(json.dumps({**base, "kind": "move"}).encode())
    with pytest.raises(BundleError, match="newer"):
        bundle.Manifest.from_json(json.dumps({**base, "format": 2}).encode())


def encrypt(data: bytes, passphrase: str, chunk: int = 1024) -> bytes:
    out = io.BytesIO()
    writer = bundle.EncryptingWriter(out, passphrase, chunk_size=chunk, log2_n=10)
    for start in range(0, len(data), 333):  # writes of any size
        writer.write(data[start:start + 333])
    writer.close()
    return out.getvalue()


def decrypt(data: bytes, passphrase: str) -> bytes:
    return bundle.DecryptingReader(io.BytesIO(data), passphrase).read()


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 4096, 5000])
def test_encryption_round_trips_any_size(size: int) -> None:
    plain = os.urandom(size)
    sealed = encrypt(plain, "correct horse")
    assert plain not in sealed or size < 8
    assert bundle.sniff(sealed) == "encrypted"
    assert decrypt(sealed, "correct horse") == plain


def test_an_encrypted_bundle_reads_back_through_the_bundle_reader(tmp_path) -> None:
    data, _ = plain_bundle(tmp_path)
    sealed = encrypt(data, "pass")
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = bundle.read(bundle.DecryptingReader(io.BytesIO(sealed), "pass"), str(dest))
    assert manifest.company == "acme"


def test_a_wrong_passphrase_is_named_as_such() -> None:
    sealed = encrypt(b"secret session" * 100, "right")
    with pytest.raises(BundleError, match="wrong passphrase"):
        decrypt(sealed, "wrong")
    with pytest.raises(BundleError, match="empty"):
        decrypt(sealed, "")


def test_an_encrypted_bundle_with_any_byte_changed_is_refused() -> None:
    sealed = encrypt(os.urandom(2500), "pw")
    for i in range(0, len(sealed), 5):
        bad = bytearray(sealed)
        bad[i] ^= 0x80
        with pytest.raises(BundleError):
            decrypt(bytes(bad), "pw")


def test_an_encrypted_bundle_cut_anywhere_or_extended_is_refused() -> None:
    sealed = encrypt(os.urandom(2500), "pw")
    for cut in [*range(0, len(sealed), 11), len(sealed) - 1]:
        with pytest.raises(BundleError):
            decrypt(sealed[:cut], "pw")
    with pytest.raises(BundleError):
        decrypt(sealed + b"\0" * 16, "pw")


def test_encrypted_chunks_cannot_be_dropped_or_reordered() -> None:
    sealed = encrypt(os.urandom(3000), "pw", chunk=1024)
    head = len(sealed) - (1024 + 16) * 2 - (3000 - 2048 + 16)
    c0, c1 = sealed[head:head + 1040], sealed[head + 1040:head + 2080]
    rest = sealed[head + 2080:]
    with pytest.raises(BundleError):
        decrypt(sealed[:head] + c1 + c0 + rest, "pw")
    with pytest.raises(BundleError):
        decrypt(sealed[:head] + c0 + rest, "pw")


def test_a_plain_reader_on_an_encrypted_file_asks_for_the_passphrase(tmp_path) -> None:
    with pytest.raises(BundleError, match="encrypted"):
        read_into(tmp_path, encrypt(b"x", "pw"))


def test_only_the_session_files_travel() -> None:
    assert bundle.carried("sim-creds.json")
    assert bundle.carried("neonize.db")
    for name in ("session.lock", "journal.db", "journal.db-wal", "journal.db-shm", "neonize.db-wal",
                 "neonize.db-shm", "x.db-journal", "sim-creds.json.tmp.123", ".hidden"):
        assert not bundle.carried(name), name


def test_copy_sqlite_takes_what_is_only_in_the_wal(tmp_path) -> None:
    src = str(tmp_path / "live.db")
    db = sqlite3.connect(src, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (x)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
    assert os.path.getsize(src + "-wal") > 0  # the rows are in the WAL, not yet in the file
    dst = str(tmp_path / "copy.db")
    bundle.copy_sqlite(src, dst)
    db.close()
    assert bundle.is_sqlite(dst)
    assert not os.path.exists(dst + "-wal")
    assert os.stat(dst).st_mode & 0o777 == 0o600
    assert sqlite3.connect(dst).execute("SELECT count(*) FROM t").fetchone()[0] == 100


def test_state_json_is_checked_before_anything_is_installed(tmp_path) -> None:
    from waportd.transfer import parse_state

    manifest = bundle.Manifest("acme", "export", 1.0, "h", "v")
    path = tmp_path / "state.json"
    good = {"wanted": True, "proxy": None, "media": {}, "webhook": {"url": "http://x/h", "secret": "whsec_x",
                                                                     "events": ["message"]}}
    path.write_text(json.dumps(good))
    assert parse_state(str(path), manifest) == good
    for bad in ({"wanted": "yes"}, {"wanted": True, "proxy": 5}, {"wanted": True, "media": []},
                {"wanted": True, "webhook": {"url": "http://x"}}, [1]):
        path.write_text(json.dumps(bad))
        with pytest.raises(BundleError, match="state.json"):
            parse_state(str(path), manifest)
    path.write_text("{")
    with pytest.raises(BundleError, match="not JSON"):
        parse_state(str(path), manifest)
    with pytest.raises(BundleError, match="no state.json"):
        parse_state(str(tmp_path / "missing"), manifest)
