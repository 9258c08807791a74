"""ipc/files.py: a write leaves the old file or the new one, never half of one, and always 0600 (by default)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator

import pytest

from ipc.files import write_atomic, write_json_atomic


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def leftovers(directory: str, keep: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name != keep)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_mode_is_0600_whatever_the_umask(tmp_path, umask, mask: int) -> None:
    path = str(tmp_path / "creds.json")
    os.umask(mask)
    write_atomic(path, b"secret")
    assert mode_of(path) == 0o600
    write_json_atomic(str(tmp_path / "other.json"), {"a": 1})
    assert mode_of(str(tmp_path / "other.json")) == 0o600


def test_an_asked_mode_is_set_exactly(tmp_path, umask) -> None:
    path = str(tmp_path / "shared")
    os.umask(0o077)  # narrower than asked: the file still gets what was asked for
    write_atomic(path, "text", mode=0o640)
    assert mode_of(path) == 0o640


def test_overwrite_replaces_content_and_mode(tmp_path) -> None:
    path = str(tmp_path / "state.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write("old, and too open")
    os.chmod(path, 0o644)
    write_atomic(path, "new")
    assert read(path) == "new" and mode_of(path) == 0o600
    write_atomic(path, b"newer, and longer than before")
    assert read(path) == "newer, and longer than before"
    write_atomic(path, "")
    assert read(path) == ""
    assert leftovers(str(tmp_path), "state.json") == []


def test_json_formatting_is_passed_through(tmp_path) -> None:
    path = str(tmp_path / "simnet.json")
    data = {"b": [1, 2], "a": {"z": None, "y": "ü"}}
    write_json_atomic(path, data, indent=1, sort_keys=True)
    assert read(path) == json.dumps(data, indent=1, sort_keys=True)
    write_json_atomic(path, data)
    assert read(path) == json.dumps(data)


def test_an_unserializable_object_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = str(tmp_path / "state.json")
    write_json_atomic(path, {"version": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"version": 2, "oops": object()})
    assert json.loads(read(path)) == {"version": 1}
    assert leftovers(str(tmp_path), "state.json") == []


def test_a_failure_after_the_temporary_is_written_removes_it(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "state.json")
    write_atomic(path, "old")

    def no_rename(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, "new")
    monkeypatch.undo()
    assert read(path) == "old"
    assert leftovers(str(tmp_path), "state.json") == []


def test_durable_fsyncs_and_not_durable_does_not(tmp_path, monkeypatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(str(tmp_path / "a"), "x")
    assert len(synced) == 1
    write_atomic(str(tmp_path / "b"), "x", durable=False)
    assert len(synced) == 1
    assert read(str(tmp_path / "b")) == "x"
