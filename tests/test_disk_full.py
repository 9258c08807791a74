"""A full disk (issue 17): sends are refused with a clear error, nothing is lost or corrupted, and everything
recovers when space returns. The state directory is a small tmpfs of its own, filled to the last byte."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections import Counter

import pytest
from conftest import EventTap, wait_for

from ipc.control import ControlClient
from ipc.errors import WaportError

WAPORTCTL = os.path.join(os.path.dirname(sys.executable), "waportctl")


@pytest.fixture
def small_disk(short_tmp):
    """The daemon's state directory (conftest's Daemon puts it at BASE/state) on a 16 MiB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = os.path.join(short_tmp, "state")
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", path], check=True)
    yield path
    subprocess.run(["umount", "-l", path], check=False)


def fill(path: str) -> str:
    """Write a file until the file system refuses another byte."""
    filler = os.path.join(path, "filler")
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * size)
    return filler


def test_a_full_disk_refuses_sends_clearly_and_everything_recovers(daemon_factory, simnet, small_disk):
    d = daemon_factory(sim_endpoint=simnet.endpoint, companies=["acme"], rate_limit_max=100_000).start()
    d.wait_state("acme", "connected")
    tap = EventTap(d.run_dir, b"acme.message")
    assert d.ctl("send", company="acme", to="15550100001", text="before")["status"] in ("queued", "sent")

    filler = fill(small_disk)
    client = ControlClient(d.run_dir, timeout=10)
    accepted, refused = [], None
    for i in range(5000):  # SQLite writes into space it holds already until it needs a new page
        try:
            accepted.append(client.call("send", company="acme", to=f"1555010{i % 90:04d}", text=f"during {i}",
                                        idempotency_key=f"full-{i}")["message_id"])
        except WaportError as exc:
            refused = exc
            break
    assert refused is not None, "5,000 sends fitted on a full disk"
    assert refused.code == "disk_full" and "disk is full" in refused.message
    cli = subprocess.run([WAPORTCTL, "--run-dir", d.run_dir, "send", "acme", "15550100001", "hello"],
                         capture_output=True, text=True, timeout=20)
    assert cli.returncode == 1 and "disk is full" in cli.stderr
    photo = os.path.join(os.path.dirname(small_disk), "photo.jpg")  # outside the full file system
    with open(photo, "wb") as fh:
        fh.write(b"\xff\xd8\xff" + os.urandom(256 * 1024))
    upload = subprocess.run([WAPORTCTL, "--run-dir", d.run_dir, "media", "put", photo, "--mimetype", "image/jpeg"],
                            capture_output=True, text=True, timeout=20)
    assert upload.returncode == 1 and "disk is full" in upload.stderr
    assert not os.listdir(os.path.join(small_disk, "media", "tmp"))  # the dropped upload left nothing
    simnet.call("inbound", company="acme", **{"from": "15550100002"}, text="written while full", id="IN-FULL")
    assert client.call("ping")  # the daemon answers through it all

    os.unlink(filler)  # space returns
    after = client.call("send", company="acme", to="15550100001", text="after")
    assert after["status"] in ("queued", "sent")
    tap.wait(lambda e: e["data"]["id"] == "IN-FULL", timeout=60, what="the message that came in while full")

    def settled():
        counts = d.ctl("messages", company="acme", limit=1)["counts"]
        return None if counts.get("queued") or counts.get("sending") else counts
    counts = wait_for(settled, timeout=60, what="the outbox to drain")
    at_network = Counter(m["id"] for m in simnet.call("sent", company="acme")["messages"])
    assert all(at_network[mid] == 1 for mid in accepted), "an accepted send lost or sent twice"
    assert at_network[after["message_id"]] == 1
    assert counts.get("sent") == len(accepted) + 2 and not counts.get("uncertain") and not counts.get("send_failed")
    assert simnet.stats()["replaced"] == 0
    journal = os.path.join(small_disk, "sessions", "acme", "journal.db")
    with contextlib.closing(sqlite3.connect(journal)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert "disk is full" in d.logs()
    assert d.status("acme")["restarts"] == 0  # the worker waited for space; nothing crashed
    client.close()
