"""workers/mediafetch.py: inbound media into the store, with retries and clear failures; no process."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from ipc.errors import INTERNAL, NOT_IMPLEMENTED, TIMEOUT
from ipc.mediastore import MediaStore
from workers import mediafetch
from workers.backend import BackendError, SendItem, WorkerContext
from workers.sim_backend import SimBackend


class Downloads(SimBackend):
    """The sim backend's interface, its network replaced by a script of outcomes per attempt."""

    def __init__(self, script: list[Any]) -> None:
        super().__init__(WorkerContext("acme", "/nonexistent", {"sim_endpoint": "ipc:///nowhere"}), lambda *_: None)
        self.script = script
        self.calls = 0

    def fetch_media(self, handle: Any, write: Any) -> None:
        self.calls += 1
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        for i in range(0, len(outcome), 1 << 20):
            write(outcome[i:i + (1 << 20)])

    def send(self, item: SendItem) -> dict[str, Any]:
        raise AssertionError("not used")


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mediafetch, "PAUSES", (0.0,))


def fetcher(tmp_path: Any, script: list[Any], max_bytes: int = 1 << 22) -> tuple[mediafetch.MediaFetcher, Downloads]:
    backend = Downloads(script)
    return mediafetch.MediaFetcher("acme", backend, MediaStore(str(tmp_path / "media"), max_bytes), print), backend


def message(size: int, sha: str | None = None, **media: Any) -> dict[str, Any]:
    return {"id": "WA-1", "type": "image", "_fetch": {"id": "WA-1"},
            "media": {"mimetype": "image/jpeg", "size": size, "status": "pending", **({"sha256": sha} if sha else {}),
                      **media}}


def test_a_download_that_fails_twice_is_stored_on_the_third_attempt(tmp_path) -> None:
    data = os.urandom(3 << 20)
    f, backend = fetcher(tmp_path, [BackendError(TIMEOUT, "slow"), RuntimeError("reset"), data])
    media = f.fetch(message(len(data), hashlib.sha256(data).hexdigest()))
    assert (media["status"], media["size"], backend.calls) == ("stored", len(data), 3)
    with open(f.store.path(media["id"]), "rb") as fh:
        assert fh.read() == data
    assert os.listdir(f.store.tmp_dir) == []  # failed attempts leave nothing behind


def test_after_every_attempt_fails_the_message_says_why(tmp_path) -> None:
    f, backend = fetcher(tmp_path, [BackendError(INTERNAL, "media server unavailable")] * 3)
    media = f.fetch(message(10))
    assert media["status"] == "failed" and "unavailable" in media["error"] and backend.calls == 3


def test_what_trying_again_cannot_fix_is_tried_once(tmp_path) -> None:
    f, backend = fetcher(tmp_path, [BackendError(NOT_IMPLEMENTED, "no downloads here")])
    assert f.fetch(message(10))["status"] == "failed" and backend.calls == 1


def test_an_announced_size_over_the_limit_is_refused_before_any_download(tmp_path) -> None:
    f, backend = fetcher(tmp_path, [], max_bytes=1000)
    media = f.fetch(message(1001))
    assert media["status"] == "failed" and "media_too_large" in media["error"] and backend.calls == 0


def test_more_bytes_than_announced_and_the_limit_stop_the_download(tmp_path) -> None:
    f, backend = fetcher(tmp_path, [os.urandom(3000)], max_bytes=2000)
    media = f.fetch(message(100))  # announced small, arrives large
    assert media["status"] == "failed" and "media_too_large" in media["error"] and backend.calls == 1
    assert os.listdir(f.store.tmp_dir) == []


def test_bytes_that_do_not_match_the_announced_sha256_are_not_called_stored(tmp_path) -> None:
    f, _ = fetcher(tmp_path, [b"tampered"] * 3)
    media = f.fetch(message(8, "00" * 32))
    assert media["status"] == "failed" and "SHA-256" in media["error"]
