"""ipc/mediastore.py: bytes in by chunks, content-addressed, private, bounded, readable only by owners."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from ipc.errors import WaportError
from ipc.mediastore import CHUNK, MediaStore, validate_mimetype


@pytest.fixture
def store(tmp_path) -> MediaStore:
    return MediaStore(str(tmp_path / "media"), max_bytes=3 * CHUNK)


def test_chunks_in_one_file_named_by_its_sha256_private(store: MediaStore) -> None:
    data = os.urandom(CHUNK + 1234)
    up = store.begin()
    up.write(data[:CHUNK])
    up.write(data[CHUNK:])
    info = up.finish("image/jpeg; charset=binary", company="acme", filename="../../etc/price list.jpg")
    assert info.media_id == hashlib.sha256(data).hexdigest() == info.sha256
    assert info.public() == {"media_id": info.media_id, "size": len(data), "mimetype": "image/jpeg",
                             "sha256": info.media_id}
    assert info.filename == "price list.jpg"  # shown, never a path
    path = store.path(info.media_id)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    assert store.read(info.media_id) + store.read(info.media_id, CHUNK) == data
    assert os.listdir(store.tmp_dir) == []


def test_the_same_bytes_are_one_file_with_both_owners(store: MediaStore) -> None:
    a = store.put(b"x" * 100, "application/pdf", company="acme")
    b = store.put(b"x" * 100, "application/pdf", company="beta")
    assert a.media_id == b.media_id and store.info(a.media_id).owners == ["acme", "beta"]
    assert store.readable(a.media_id, "beta") and store.readable(a.media_id, None)
    with pytest.raises(WaportError) as err:
        store.readable(a.media_id, "gamma")
    assert err.value.code == "not_found"


def test_too_large_or_oversized_chunks_are_refused_and_leave_nothing(store: MediaStore) -> None:
    up = store.begin()
    for _ in range(3):
        up.write(b"\0" * CHUNK)
    with pytest.raises(WaportError) as err:
        up.write(b"\0")
    assert err.value.code == "media_too_large"
    with pytest.raises(WaportError, match="at most"):
        store.begin().write(b"\0" * (CHUNK + 1))
    with pytest.raises(WaportError, match="empty"):
        store.begin().finish("image/png")
    assert os.listdir(store.tmp_dir) == []


@pytest.mark.parametrize("bad", ["", "image", "../etc/passwd", "image/png\nx", 5, "a" * 300])
def test_mimetypes_are_checked(bad: object) -> None:
    with pytest.raises(WaportError):
        validate_mimetype(bad)


def test_each_kind_takes_its_mimetypes() -> None:
    assert validate_mimetype("IMAGE/PNG", "image") == "image/png"
    assert validate_mimetype("application/zip", "document") == "application/zip"
    with pytest.raises(WaportError, match="audio"):
        validate_mimetype("image/png", "audio")


@pytest.mark.parametrize("bad", ["../../x", "A" * 64, "0" * 63, None])
def test_ids_are_only_hashes(store: MediaStore, bad: object) -> None:
    with pytest.raises(WaportError):
        store.readable(bad, None)  # type: ignore[arg-type]


def test_prune_keeps_what_a_queued_send_needs(store: MediaStore) -> None:
    old = store.put(b"old", "image/png")
    kept = store.put(b"kept", "image/png")
    new = store.put(b"new", "image/png")
    later = new.created + 10
    assert sorted(store.prune(later, retention=5, keep={kept.media_id})) == sorted([old.media_id, new.media_id])
    assert store.info(kept.media_id) is not None and store.info(old.media_id) is None
